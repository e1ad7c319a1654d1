"""Evaluation metrics computed exactly from sums that add up across sites.

A worker's evaluation reports a few named sum tensors (``syncfed.tasks``
fills them a batch at a time); :func:`combine` adds them across sites, and
the functions here turn any such sum into metrics. Because every sum is a
count or a plain sum, per-site and federated figures agree with the same
computation on the pooled examples (scikit-learn's, in the tests):

- ``confusion``, int64 ``(C, C)``, rows the true class, columns the predicted:
  accuracy, balanced accuracy, macro F1, per-class precision and recall;
  for a binary task also sensitivity and specificity at its threshold;
- ``scores``, int64 ``(2, bins)``: per true class (0 negative, 1 positive) the
  histogram of the predicted positive probability over ``[0, 1]`` in equal
  bins (the last includes 1.0): ROC AUC and PR AUC of the binned scores;
- ``auc``, ``pr_auc``, float64 ``(1,)``: a site's exact figures from its own
  raw scores. Not additive: kept only when a single site is combined (the
  evaluator), and dropped otherwise;
- ``regression``, float64 ``(6,)``: ``[n, sum(pred - y), sum|pred - y|,
  sum (pred - y)^2, sum y, sum y^2]`` in the target's own units: MSE, RMSE,
  MAE and R^2.

**The binning error of the federated AUC.** The AUC is the probability that a
positive scores above a negative, ties counted half (Mann-Whitney): over the
``P * N`` positive-negative pairs, ``AUC = (#ordered + #tied / 2) / (P N)``.
Binned, a pair whose scores fall in different bins is ordered exactly as its
raw scores are, since binning is monotone; a pair within one bin counts half.
Only the ``pos_b * neg_b`` pairs inside each bin ``b`` can differ, each by at
most a half, so ``|AUC_bins - AUC| <= sum_b pos_b * neg_b / (2 P N)``:
:func:`auc_error_bound`, computed from the histograms alone.

A figure that is undefined on the data (the recall of a class without
examples, the AUC without both classes) is ``None``, never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from .exceptions import AggregationError

__all__ = [
    "ADDITIVE",
    "SITE_LOCAL",
    "ClassificationMetrics",
    "BinaryMetrics",
    "RegressionMetrics",
    "combine",
    "score_histogram",
    "classification_metrics",
    "binary_metrics",
    "regression_metrics",
    "histogram_auc",
    "histogram_pr_auc",
    "auc_error_bound",
    "roc_auc",
    "average_precision",
    "report",
]

#: The sums that add up across sites.
ADDITIVE: Final = ("confusion", "scores", "regression")
#: A site's own exact figures: meaningful for that site alone, so combined only from a single site.
SITE_LOCAL: Final = ("auc", "pr_auc")

Sums = Mapping[str, np.ndarray]


def combine(sums: Sequence[Sums], *, what: str = "site") -> dict[str, np.ndarray]:
    """The sum of several sites' metric sums, after checking they agree in names, shapes and kinds.

    Site-local figures (:data:`SITE_LOCAL`) are kept from a single site and
    dropped from two or more; any other name (a user task's own sums) is added.
    ``what`` names the parts in messages (evaluation adds up batches).

    Raises:
        AggregationError: if there are no sums, or two sites' names, shapes or kinds differ,
            or a sum is not a finite numeric array.
    """
    if not sums:
        raise AggregationError("no metric sums to combine")
    first = sums[0]
    names = first.keys() - set(SITE_LOCAL)  # a site with one class has no exact AUC of its own
    for index, site in enumerate(sums):
        if site.keys() - set(SITE_LOCAL) != names:
            raise AggregationError(
                f"metric sums of {what} {index} name {sorted(site)}, those of {what} 0 name {sorted(first)}"
            )
        for name, array in site.items():
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
                raise AggregationError(f"metric sum {name} of {what} {index} is not a numeric array")
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise AggregationError(f"metric sum {name} of {what} {index} is not finite")
            if name in SITE_LOCAL:
                if array.shape != (1,) or array.dtype.kind != "f":
                    raise AggregationError(f"metric {name} of {what} {index} has shape {array.shape}, not (1,)")
                continue
            if array.shape != first[name].shape or (array.dtype.kind == "f") != (first[name].dtype.kind == "f"):
                raise AggregationError(
                    f"metric sum {name} of {what} {index} has shape {array.shape} and dtype {array.dtype},"
                    f" {what} 0's {first[name].shape} and {first[name].dtype}"
                )
    if len(sums) == 1:
        return {name: array.copy() for name, array in first.items()}
    return {name: np.sum([site[name] for site in sums], axis=0, dtype=first[name].dtype) for name in sorted(names)}


def score_histogram(positive: np.ndarray, probabilities: np.ndarray, bins: int) -> np.ndarray:
    """The ``scores`` sum of a batch: per true class (row 0 negative, 1 positive) counts of ``probabilities``
    in ``bins`` equal bins of ``[0, 1]``, the last one closed (1.0 falls in it)."""
    index = np.minimum((np.clip(probabilities, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    rows = np.asarray(positive, dtype=np.int64)
    return np.bincount(rows * bins + index, minlength=2 * bins).reshape(2, bins).astype(np.int64)


# -- Classification -------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


@dataclass(frozen=True)
class ClassificationMetrics:
    """Figures of a confusion matrix.

    Classes with neither examples nor predictions are left out of the
    averages (as scikit-learn leaves out labels absent from both ``y_true``
    and ``y_pred``); a class's precision without predictions, or recall
    without examples, is ``None``; in macro F1 a present class's undefined F1
    counts 0 (scikit-learn's ``zero_division=0``).
    """

    accuracy: float | None
    balanced_accuracy: float | None  # the mean recall over classes with examples
    f1_macro: float | None
    precision: tuple[float | None, ...]
    recall: tuple[float | None, ...]
    confusion: tuple[tuple[int, ...], ...]


def classification_metrics(confusion: np.ndarray) -> ClassificationMetrics:
    """Accuracy, balanced accuracy, macro F1, per-class precision and recall of a ``(C, C)`` confusion matrix."""
    matrix = np.asarray(confusion, dtype=np.int64)
    hits = np.diag(matrix)
    support = matrix.sum(axis=1)  # examples per true class
    predicted = matrix.sum(axis=0)
    precision = tuple(_ratio(t, p) for t, p in zip(hits, predicted, strict=True))
    recall = tuple(_ratio(t, s) for t, s in zip(hits, support, strict=True))
    present = (support + predicted) > 0
    f1 = [2 * t / (s + p) for t, s, p in zip(hits[present], support[present], predicted[present], strict=True)]
    recalls = [r for r in recall if r is not None]
    return ClassificationMetrics(
        accuracy=_ratio(hits.sum(), matrix.sum()),
        balanced_accuracy=float(np.mean(recalls)) if recalls else None,
        f1_macro=float(np.mean(f1)) if f1 else None,
        precision=precision,
        recall=recall,
        confusion=tuple(tuple(int(n) for n in row) for row in matrix),
    )


# -- Binary: ROC and PR AUC -----------------------------------------------------------------------


def _auc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Mann-Whitney AUC of scores given as counts per score group in ascending order; ties count half."""
    n, p = int(negatives.sum()), int(positives.sum())
    if n == 0 or p == 0:
        return None
    below = np.cumsum(negatives) - negatives  # negatives in lower groups
    pairs = positives.astype(np.float64) @ (below + negatives / 2)
    return float(pairs / (p * n))


def _average_precision(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Average precision (scikit-learn's): ``sum_k (R_k - R_{k-1}) P_k`` with one threshold per score group."""
    total = int(positives.sum())
    if total == 0:
        return None
    tp = np.cumsum(positives[::-1]).astype(np.float64)  # thresholds from the highest group down
    fp = np.cumsum(negatives[::-1]).astype(np.float64)
    taken = (tp + fp) > 0
    precision = tp[taken] / (tp[taken] + fp[taken])
    recall_steps = np.diff(np.concatenate([[0.0], tp[taken] / total]))
    return float(recall_steps @ precision)


def histogram_auc(scores: np.ndarray) -> float | None:
    """ROC AUC of the binned scores (ties within a bin count half); ``None`` without both classes."""
    return _auc(scores[0], scores[1])


def histogram_pr_auc(scores: np.ndarray) -> float | None:
    """PR AUC (average precision) of the binned scores, a bin one threshold; ``None`` without positives."""
    return _average_precision(scores[0], scores[1])


def auc_error_bound(scores: np.ndarray) -> float | None:
    """How far :func:`histogram_auc` can be from the exact AUC: ``sum_b pos_b neg_b / (2 P N)`` (module docstring)."""
    n, p = int(scores[0].sum()), int(scores[1].sum())
    if n == 0 or p == 0:
        return None
    return float(scores[0].astype(np.float64) @ scores[1] / (2 * p * n))


def _groups(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negatives and positives per distinct score, in ascending score order."""
    _, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    positive = np.asarray(labels).astype(bool)
    size = int(group.max()) + 1 if len(group) else 0
    return np.bincount(group[~positive], minlength=size), np.bincount(group[positive], minlength=size)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact ROC AUC of raw ``scores`` for 0/1 ``labels`` (as ``sklearn.metrics.roc_auc_score``)."""
    return _auc(*_groups(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact PR AUC of raw ``scores`` for 0/1 ``labels`` (as ``sklearn.metrics.average_precision_score``)."""
    return _average_precision(*_groups(labels, scores))


@dataclass(frozen=True)
class BinaryMetrics:
    """The binary figures: ROC and PR AUC, and sensitivity and specificity at the task's threshold.

    ``exact`` tells whether the AUCs are a site's exact ones or from the
    combined histograms, whose ROC AUC is within ``auc_bound`` of the exact one.
    """

    auc: float | None
    pr_auc: float | None
    auc_bound: float | None
    exact: bool
    sensitivity: float | None  # recall of the positives
    specificity: float | None  # recall of the negatives


def binary_metrics(
    confusion: np.ndarray, scores: np.ndarray, auc: float | None = None, pr_auc: float | None = None
) -> BinaryMetrics:
    """Binary figures from a ``(2, 2)`` confusion matrix and ``(2, bins)`` score histograms.

    ``auc`` and ``pr_auc``, a single site's exact figures, replace those of the histograms.
    """
    exact = auc is not None
    return BinaryMetrics(
        auc=auc if exact else histogram_auc(scores),
        pr_auc=pr_auc if exact else histogram_pr_auc(scores),
        auc_bound=0.0 if exact else auc_error_bound(scores),
        exact=exact,
        sensitivity=_ratio(confusion[1, 1], confusion[1].sum()),
        specificity=_ratio(confusion[0, 0], confusion[0].sum()),
    )


# -- Regression -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegressionMetrics:
    """MSE, RMSE, MAE and R^2 in the target's own units; ``mean_error`` is the bias ``mean(pred - y)``."""

    mse: float
    rmse: float
    mae: float
    r2: float
    mean_error: float


def regression_metrics(sums: np.ndarray) -> RegressionMetrics | None:
    """Figures of the ``regression`` sum ``[n, sum e, sum|e|, sum e^2, sum y, sum y^2]``; ``None`` when ``n`` is 0.

    ``R^2 = 1 - SSE / SST`` with ``SST = sum y^2 - (sum y)^2 / n``. A constant
    target (``SST`` 0, up to the sums' rounding) gives 1 for a perfect fit and
    0 otherwise, as scikit-learn's ``r2_score`` does.
    """
    n, error, absolute, squared, total, total_squared = (float(v) for v in sums)
    if n <= 0:
        return None
    sst = total_squared - total * total / n
    # The sums lose about eps * sum y^2 to rounding: a smaller SST is a constant target.
    if sst <= 8 * np.finfo(np.float64).eps * n * total_squared:
        r2 = 1.0 if squared == 0 else 0.0
    else:
        r2 = 1.0 - squared / sst
    return RegressionMetrics(
        mse=squared / n, rmse=math.sqrt(squared / n), mae=absolute / n, r2=r2, mean_error=error / n
    )


# -- The metrics JSONL fields ----------------------------------------------------------------------


def report(sums: Sums, classes: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics a set of (combined) sums gives, under the names of the metrics JSONL's eval events.

    ``classes`` names the classes for ``per_class`` (by default their indices).
    A binary evaluation (``scores`` present) adds ``auc``, ``pr_auc``,
    ``auc_bound`` (0 when exact), ``sensitivity`` and ``specificity``.
    """
    fields: dict[str, Any] = {}
    confusion = sums.get("confusion")
    if confusion is not None:
        figures = classification_metrics(confusion)
        names = list(classes) or [str(i) for i in range(len(figures.confusion))]
        fields.update(
            accuracy=figures.accuracy,
            balanced_accuracy=figures.balanced_accuracy,
            f1_macro=figures.f1_macro,
            confusion=[list(row) for row in figures.confusion],
            per_class={
                name: {"precision": p, "recall": r}
                for name, p, r in zip(names, figures.precision, figures.recall, strict=True)
            },
        )
        scores = sums.get("scores")
        if scores is not None:
            auc, pr_auc = sums.get("auc"), sums.get("pr_auc")
            binary = binary_metrics(
                confusion,
                scores,
                float(auc[0]) if auc is not None else None,
                float(pr_auc[0]) if pr_auc is not None else None,
            )
            fields.update(
                auc=binary.auc,
                pr_auc=binary.pr_auc,
                auc_bound=binary.auc_bound,
                sensitivity=binary.sensitivity,
                specificity=binary.specificity,
            )
    regression = sums.get("regression")
    if regression is not None and (figures_r := regression_metrics(regression)) is not None:
        fields.update(mse=figures_r.mse, rmse=figures_r.rmse, mae=figures_r.mae, r2=figures_r.r2)
    return fields
