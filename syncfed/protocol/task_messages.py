"""The task on the wire: what a run asks the model to learn, how its built-in model is shaped, and what it scored.

A :class:`Recipe` travels as the optional ``recipe`` field of fit, evaluate
and describe requests. Without it a request means what it always meant:
classification with cross-entropy, so the classic demo's messages are
unchanged. With it a worker knows the task (classification, binary,
regression, or a task of the worker operator's own, named by import path),
its loss and settings, and the shape of a built-in model sized from the
data plan (``syncfed.shaped_models``).

An evaluation's reply may carry the task's metric sums (:data:`METRICS`):
named int64 or float64 tensors that add up across sites, so every metric a
coordinator prints is computed exactly from them (docs/protocol.md, "Tasks").
A user task may add sums of its own, named ``user.<name>``
(:data:`USER_SUM`), bounded in number and size but otherwise its own affair.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol

import numpy as np

from ..exceptions import describe
from ..tensors import Weights, decode_weights, encode_weights
from .base import MAX_CLASSES, MAX_SHARD, _check, _check_name, _check_weights, _fields, _is_int, _is_number

__all__ = [
    "TASK_KINDS",
    "LOSSES",
    "MIN_SCORE_BINS",
    "MAX_SCORE_BINS",
    "MAX_HIDDEN",
    "MAX_WIDTH",
    "METRICS",
    "REGRESSION_SUMS",
    "MAX_CONFUSION_CLASSES",
    "USER_SUM",
    "MAX_USER_SUMS",
    "MAX_USER_SUM_SIZE",
    "MAX_USER_INT",
    "MAX_HUBER_DELTA",
    "Recipe",
    "check_recipe",
    "recipe_field",
    "recipe_from",
    "check_metrics",
    "metrics_field",
    "metrics_from",
]

#: The built-in tasks; any other task is an import path the worker was started with.
TASK_KINDS: Final = ("classification", "binary", "regression")
#: The losses each built-in task trains with; the first is its default.
LOSSES: Final[dict[str, tuple[str, ...]]] = {
    "classification": ("cross_entropy",),
    "binary": ("bce",),
    "regression": ("mse", "mae", "huber"),
}
#: Score-histogram bins a binary evaluation fills for federated AUC: at least 1,000, so the binning error is
#: small. (Not the analytics queries' ``MAX_BINS``: these bins are of a score in [0, 1].)
MIN_SCORE_BINS: Final = 1000
MAX_SCORE_BINS: Final = 65_536
#: The most hidden layers, and the widest, a shaped model may be asked for.
MAX_HIDDEN: Final = 16
MAX_WIDTH: Final = 65_536

#: The metric sums an evaluation may return. Classification sends ``confusion``; binary ``confusion`` and
#: ``scores``, plus ``auc`` and ``pr_auc`` where the site's own scores define them; regression ``regression``.
METRICS: Final = ("confusion", "scores", "auc", "pr_auc", "regression")
#: What each entry of the ``regression`` sums holds, in the target's own units (error = prediction - y).
REGRESSION_SUMS: Final = ("n", "error", "abs_error", "squared_error", "y", "y_squared")
#: The most classes a confusion matrix may have: 1,024 classes make 8 MiB of int64. A worker scoring more
#: classes sends no metrics; accuracy and per-class recall still travel in the result's other fields.
MAX_CONFUSION_CLASSES: Final = 1024
#: A user task's own sums: ``user.`` and a short lowercase name; at most 16 of them, each int64 or float64 of at
#: most 65,536 elements (8 MiB in all). An int64 entry lies within +-2**42, so 2**20 sites' sum cannot wrap.
USER_SUM: Final = re.compile(r"user\.[a-z][a-z0-9_]{0,31}")
MAX_USER_SUMS: Final = 16
MAX_USER_SUM_SIZE: Final = 65_536
MAX_USER_INT: Final = 2**42
#: The Huber loss's largest delta, in standardised target units: far beyond it Huber is MSE.
MAX_HUBER_DELTA: Final = 1000.0

_COUNTS: Final = ("confusion", "scores")  # int64; the other metrics are float64
#: Per task, the metrics it must send and those it may.
_REQUIRED: Final = {
    "classification": frozenset({"confusion"}),
    "binary": frozenset({"confusion", "scores"}),
    "regression": frozenset({"regression"}),
}
_ALLOWED: Final = {**_REQUIRED, "binary": frozenset({"confusion", "scores", "auc", "pr_auc"})}
# Settings that only one built-in task reads, with the task: anywhere else a non-default value is a mistake.
_OWN_SETTINGS: Final = {
    "threshold": "binary",
    "bins": "binary",
    "target_mean": "regression",
    "target_std": "regression",
}


@dataclass(frozen=True)
class Recipe:
    """What a run trains: the task and its loss, their settings, and the built-in model's shape.

    - ``task``: one of :data:`TASK_KINDS`, or an import path ``mypkg.tasks:Task``
      (a worker builds only the task paths it was started with);
    - ``loss``: one of the task's :data:`LOSSES`, empty for its default (a user task reads it as it likes);
    - ``class_weights``: classification only, one weight per agreed class, or empty for none;
    - ``threshold``: binary only, the score above which an example counts as positive;
    - ``bins``: binary only, the score histogram's bins for federated ROC and PR AUC;
    - ``huber_delta``: the Huber loss's delta, in standardised target units;
    - ``target_mean``, ``target_std``: regression only, the agreed standardisation of the target
      (the model learns ``(y - mean) / std``; metrics are reported in the target's own units);
    - ``hidden``, ``dropout``: the shaped ``mlp``'s hidden layer widths (empty: its default) and dropout.

    A built-in task refuses the settings of another task away from their
    defaults (a threshold for a regression, ``huber_delta`` without the Huber
    loss): a recipe says one thing only. A user task may read any of them.
    """

    task: str = "classification"
    loss: str = ""
    class_weights: tuple[float, ...] = ()
    threshold: float = 0.5
    bins: int = MIN_SCORE_BINS
    huber_delta: float = 1.0
    target_mean: float = 0.0
    target_std: float = 1.0
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_name(self.task, "task")
        builtin = self.task in TASK_KINDS
        _check(builtin or ":" in self.task, f"task must be one of {', '.join(TASK_KINDS)} or mypkg.tasks:Task")
        if builtin:
            if self.loss == "":
                object.__setattr__(self, "loss", LOSSES[self.task][0])
            _check(
                self.loss in LOSSES[self.task],
                f"loss of a {self.task} task must be one of {', '.join(LOSSES[self.task])}, not {describe(self.loss)}",
            )
        elif self.loss != "":
            _check_name(self.loss, "loss")
        _check(
            isinstance(self.class_weights, (list, tuple))
            and len(self.class_weights) <= MAX_CLASSES
            and all(_is_number(w) and w > 0 for w in self.class_weights),
            f"class_weights must be at most {MAX_CLASSES} positive finite numbers",
        )
        _check(
            _is_number(self.threshold) and 0 < self.threshold < 1,
            f"threshold must be a number strictly between 0 and 1, not {describe(self.threshold)}",
        )
        _check(
            _is_int(self.bins) and MIN_SCORE_BINS <= self.bins <= MAX_SCORE_BINS,
            f"bins must be an integer from {MIN_SCORE_BINS} to {MAX_SCORE_BINS}, not {describe(self.bins)}",
        )
        _check(
            _is_number(self.huber_delta) and 0 < self.huber_delta <= MAX_HUBER_DELTA,
            f"huber_delta must be a number above 0 and at most {MAX_HUBER_DELTA:g}, not {describe(self.huber_delta)}",
        )
        _check(_is_number(self.target_mean), f"target_mean must be a finite number, not {describe(self.target_mean)}")
        _check(
            _is_number(self.target_std) and self.target_std > 0,
            f"target_std must be a positive finite number, not {describe(self.target_std)}",
        )
        _check(
            isinstance(self.hidden, (list, tuple))
            and len(self.hidden) <= MAX_HIDDEN
            and all(_is_int(width) and 0 < width <= MAX_WIDTH for width in self.hidden),
            f"hidden must be at most {MAX_HIDDEN} layer widths from 1 to {MAX_WIDTH}, not {describe(self.hidden)}",
        )
        _check(
            _is_number(self.dropout) and 0 <= self.dropout < 1,
            f"dropout must be a number from 0 to below 1, not {describe(self.dropout)}",
        )
        if builtin:
            self._check_settings_fit_the_task()
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for name in ("threshold", "huber_delta", "target_mean", "target_std", "dropout"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _is_default(self, name: str) -> bool:
        return bool(getattr(self, name) == next(field.default for field in fields(self) if field.name == name))

    def _check_settings_fit_the_task(self) -> None:
        _check(
            not self.class_weights or self.task == "classification",
            f"class_weights go with a classification task, not {self.task}",
        )
        for name, task in _OWN_SETTINGS.items():
            _check(
                self._is_default(name) or self.task == task,
                f"{name} goes with a {task} task, not {self.task}",
            )
        _check(
            self._is_default("huber_delta") or self.loss == "huber",
            f"huber_delta goes with the huber loss, not {self.loss}",
        )

    @property
    def outputs_per_class(self) -> bool:
        """Whether the model has one output per class (classification), rather than one output (binary, regression)."""
        return self.task == "classification"

    def num_outputs(self, num_classes: int) -> int:
        """The model's output width over data of ``num_classes`` agreed classes (a user task: one per class)."""
        return 1 if self.task in ("binary", "regression") else num_classes

    def check_classes(self, classes: tuple[str, ...] | None) -> None:
        """Refuse a built-in task that the agreed classes (``None``: a continuous label) cannot serve.

        Raises:
            LocalProtocolError: e.g. a regression over class folders, a binary task over three classes.
        """
        if self.task not in TASK_KINDS:
            return
        if classes is None:
            _check(self.task == "regression", f"a {self.task} task needs classes, not a continuous label")
            return
        _check(self.task != "regression", f"a regression task needs a continuous label, not {len(classes)} classes")
        _check(self.task != "binary" or len(classes) == 2, f"a binary task needs 2 classes, not {len(classes)}")
        _check(
            not self.class_weights or len(self.class_weights) == len(classes),
            f"class_weights has {len(self.class_weights)} weights for {len(classes)} classes",
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"task": self.task, "loss": self.loss}
        # Settings at their default stay off the wire.
        for name in ("threshold", "bins", "huber_delta", "target_mean", "target_std", "dropout"):
            if not self._is_default(name):
                body[name] = getattr(self, name)
        if self.class_weights:
            body["class_weights"] = list(self.class_weights)
        if self.hidden:
            body["hidden"] = list(self.hidden)
        return body

    @classmethod
    def from_body(cls, body: Any) -> Recipe:
        _check(isinstance(body, Mapping), "recipe must be a map")
        _fields(
            body,
            "recipe",
            {"task", "loss"},
            frozenset(
                {"class_weights", "threshold", "bins", "huber_delta", "target_mean", "target_std", "hidden", "dropout"}
            ),
        )
        return cls(**body)


class _Classes(Protocol):
    """What a request's data plan tells about its label (``syncfed.protocol.DataPlan``)."""

    @property
    def classes(self) -> tuple[str, ...] | None: ...


def check_recipe(recipe: Any, data: _Classes | None) -> None:
    """A request's optional recipe: a :class:`Recipe`, which fits the classes of the request's data plan."""
    _check(recipe is None or isinstance(recipe, Recipe), "recipe must be a Recipe")
    if recipe is not None and data is not None:
        recipe.check_classes(data.classes)


def recipe_from(body: Mapping[str, Any]) -> Recipe | None:
    """A request's optional ``recipe`` field, or ``None`` (classification with cross-entropy, as ever)."""
    return Recipe.from_body(body["recipe"]) if body.get("recipe") is not None else None


def recipe_field(recipe: Recipe | None) -> dict[str, Any]:
    """The ``recipe`` field of a request body; absent without a recipe, so a classic request reads as before."""
    return {"recipe": recipe.to_body()} if recipe is not None else {}


def _counts(array: np.ndarray) -> bool:
    """Whether every entry is a count a site may hold: bounded, so no sum of up to 2**20 of them wraps int64."""
    return bool(((array >= 0) & (array <= MAX_SHARD)).all())


def check_metrics(
    metrics: Any,
    num_examples: int,
    correct: int,
    predictions: tuple[int, ...],
    per_class: tuple[tuple[int, ...], tuple[int, ...]] | None,
) -> None:
    """An evaluation's metric sums, consistent with the result's own counts (already checked).

    ``per_class`` is the result's class counts and class correct, when it has them. A user task's own
    sums (:data:`USER_SUM`) are only bounded; the built-in sums beside them, if any, are checked in full.

    Raises:
        LocalProtocolError: if a name, dtype, shape or count is wrong, or the sums disagree with the counts.
    """
    _check_weights(metrics)
    own = {name for name in metrics if name.startswith("user.")}
    _check_user_sums({name: metrics[name] for name in own})
    names = set(metrics) - own
    if own and not names:  # a user task's own sums alone
        return
    task = "regression" if "regression" in names else "binary" if "scores" in names else "classification"
    _check(
        _REQUIRED[task] <= names <= _ALLOWED[task],
        f"metrics {describe(sorted(names))} are not a task's: confusion (classification);"
        " confusion, scores and optionally auc, pr_auc (binary); regression (regression); user.<name> (a user task)",
    )
    for name in names:
        array, dtype = metrics[name], np.dtype(np.int64 if name in _COUNTS else np.float64)
        _check(array.dtype == dtype, f"metric {name} must be {dtype}, not {array.dtype}")
    if task == "regression":
        _check_regression(metrics["regression"], num_examples, correct, predictions)
        return
    classes = len(predictions)
    _check(
        classes <= MAX_CONFUSION_CLASSES,
        f"a confusion matrix of {classes} classes exceeds limit of {MAX_CONFUSION_CLASSES} classes",
    )
    confusion = metrics["confusion"]
    _check(
        confusion.shape == (classes, classes),
        f"confusion must have shape ({classes}, {classes}), a row and a column per class, not {confusion.shape}",
    )
    _check(_counts(confusion), f"confusion must hold counts from 0 to {MAX_SHARD}")
    _check(confusion.sum(axis=0).tolist() == list(predictions), "confusion's columns must sum to predictions")
    _check(int(np.trace(confusion)) == correct, "confusion's diagonal must sum to correct")
    if per_class is not None:
        counts, right = per_class
        _check(confusion.sum(axis=1).tolist() == list(counts), "confusion's rows must sum to class_counts")
        _check(np.diagonal(confusion).tolist() == list(right), "confusion's diagonal must be class_correct")
    if task == "binary":
        _check(classes == 2, f"a binary result has 2 classes, not {classes}")
        _check_scores(metrics, confusion.sum(axis=1).tolist())


def _check_user_sums(sums: Mapping[str, np.ndarray]) -> None:
    _check(len(sums) <= MAX_USER_SUMS, f"{len(sums)} user sums exceed limit of {MAX_USER_SUMS}")
    for name, array in sums.items():
        _check(bool(USER_SUM.fullmatch(name)), f"user sum name {describe(name)} must look like user.name_2")
        _check(array.dtype in (np.int64, np.float64), f"user sum {name} must be int64 or float64, not {array.dtype}")
        _check(
            array.size <= MAX_USER_SUM_SIZE,
            f"user sum {name} of {array.size} elements exceeds limit of {MAX_USER_SUM_SIZE} elements",
        )
        if array.dtype == np.float64:
            _check(bool(np.isfinite(array).all()), f"user sum {name} must be finite")
        else:
            within = (array >= -MAX_USER_INT) & (array <= MAX_USER_INT)  # not abs(): abs(-2**63) wraps
            _check(bool(within.all()), f"user sum {name} must lie within +-2**42")


def _check_regression(sums: np.ndarray, num_examples: int, correct: int, predictions: tuple[int, ...]) -> None:
    _check(
        sums.shape == (len(REGRESSION_SUMS),),
        f"regression must have shape ({len(REGRESSION_SUMS)},): {', '.join(REGRESSION_SUMS)}; not {sums.shape}",
    )
    _check(bool(np.isfinite(sums).all()), "regression sums must be finite")
    n, _, abs_error, squared_error, _, y_squared = sums.tolist()
    _check(n == num_examples, f"regression n of {n} differs from num_examples {num_examples}")
    _check(
        min(abs_error, squared_error, y_squared) >= 0,
        "regression sums of absolute errors, squared errors and squared targets must be non-negative",
    )
    _check(
        correct == 0 and tuple(predictions) == (num_examples,),
        "a regression result has correct 0 and predictions [num_examples]",
    )


def _check_scores(metrics: Mapping[str, np.ndarray], per_class: list[int]) -> None:
    """A binary result's score histograms, and its site's exact AUCs where its own scores define them."""
    scores = metrics["scores"]
    _check(
        scores.ndim == 2 and scores.shape[0] == 2 and MIN_SCORE_BINS <= scores.shape[1] <= MAX_SCORE_BINS,
        f"scores must have shape (2, bins) with bins from {MIN_SCORE_BINS} to {MAX_SCORE_BINS}, not {scores.shape}",
    )
    _check(_counts(scores), f"scores must hold counts from 0 to {MAX_SHARD}")
    _check(scores.sum(axis=1).tolist() == per_class, "scores' rows must sum to confusion's rows")
    for name in ("auc", "pr_auc"):
        if name in metrics:
            value = metrics[name]
            _check(
                value.shape == (1,) and bool(np.isfinite(value).all()) and 0 <= value[0] <= 1,
                f"{name} must be one number from 0 to 1, not {describe(value.tolist())}",
            )
    negatives, positives = per_class
    _check("auc" not in metrics or (negatives > 0 and positives > 0), "auc needs examples of both classes")
    _check("pr_auc" not in metrics or positives > 0, "pr_auc needs a positive example")


def metrics_from(body: Mapping[str, Any]) -> Weights | None:
    """A result's optional ``metrics`` field: exact sums, so no tensor of it may carry a lossy encoding."""
    value = body.get("metrics")
    if value is None:
        return None
    _check(
        isinstance(value, Mapping) and all(isinstance(t, Mapping) and "encoding" not in t for t in value.values()),
        "metrics must be a map of tensors without an encoding: they are exact sums",
    )
    return decode_weights(value, max_tensors=len(METRICS) + MAX_USER_SUMS)


def metrics_field(metrics: Weights | None) -> dict[str, Any]:
    """The ``metrics`` field of a result body; absent without metrics, so a classic result reads as before."""
    return {"metrics": encode_weights(metrics)} if metrics is not None else {}
