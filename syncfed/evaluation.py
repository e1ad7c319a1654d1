"""Federated evaluation and cross-site validation: the pure parts.

- Every training worker holds out a seeded validation split that it never
  trains on (:func:`holdout`), so the global model can be scored on each
  site's own distribution, which the central evaluator's test set may not
  resemble (federated evaluation, as in Flower's evaluate rounds).
- :func:`pool` turns per-site scores into the example-weighted average: the
  score the union of the validation splits would get, metric sums included
  (``syncfed.metrics.combine``), so every metric of the average is exact.
- :func:`headline` and :func:`result_json` show a score as its task reads:
  AUC, sensitivity and specificity for a binary task; MAE, RMSE and R² for
  a regression, in the target's units (:class:`Readout`); accuracy, balanced
  accuracy and macro F1 for classes; and a user task's own figures.
- :class:`CrossSiteMatrix` holds cross-site validation (as in NVIDIA FLARE):
  each site's final local model and the global model, scored on every site's
  validation split and on the evaluator's test set. With non-IID sites the
  off-diagonal cells show how little a local model transfers.

No asyncio and no websockets: the coordinator gathers the scores, this module
combines, prints and saves them. The heat map uses matplotlib when it is
installed (``pip install 'syncfed[plots]'``), drawn on the Agg canvas without
pyplot, like ``scripts/plot_metrics.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .exceptions import AggregationError, ConfigError
from .metrics import binary_metrics, classification_metrics, combine, regression_metrics, report
from .protocol import EvalResult

__all__ = [
    "VALIDATION",
    "TEST",
    "holdout",
    "validation_seed",
    "pool",
    "Readout",
    "headline",
    "is_regression",
    "result_json",
    "scalar_metrics",
    "Cell",
    "CrossSiteMatrix",
    "write_cross_site",
]

#: The split a training worker scores on for federated evaluation (``Evaluate.split``).
VALIDATION: Final = "validation"
#: What the evaluator scores on: its own test set.
TEST: Final = "test"

#: A cross-site cell: the score, or why there is none.
Cell = EvalResult | str


def holdout(num_examples: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, validation)`` of a seeded random hold-out, each sorted, disjoint, together all examples.

    The validation split has ``round(fraction * num_examples)`` examples, at
    least one when ``fraction > 0``, and leaves at least one to train on.

    Raises:
        ConfigError: if ``fraction`` is not in [0, 1) or ``num_examples`` is negative.
    """
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise ConfigError(f"validation fraction {fraction!r} is not in [0, 1)")
    if num_examples < 0:
        raise ConfigError(f"number of examples {num_examples} is negative")
    size = min(max(round(fraction * num_examples), 1 if fraction > 0 else 0), max(num_examples - 1, 0))
    held = np.zeros(num_examples, dtype=bool)
    held[rng.permutation(num_examples)[:size]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def validation_seed(worker_id: str) -> int:
    """A stable seed from a worker id, so a restarted worker holds out the same examples.

    Python's ``hash`` of a string changes between processes; a digest does not.
    """
    digest = hashlib.sha256(b"syncfed-validation\0" + worker_id.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def pool(results: Iterable[EvalResult]) -> EvalResult:
    """The example-weighted average of several sites' scores.

    Loss is each site's mean loss weighted by its number of examples,
    accuracy the total correct over the total examples, and the predicted
    class histograms add up: the score of the sites' data pooled.

    Raises:
        AggregationError: if there is nothing to pool or the class counts differ.
    """
    results = list(results)
    if not results:
        raise AggregationError("no site results to pool")
    classes = {len(result.predictions) for result in results}
    if len(classes) > 1:
        raise AggregationError(f"site results have {sorted(classes)} classes, not one number of classes")
    total = sum(result.num_examples for result in results)
    loss = math.fsum(result.loss * result.num_examples for result in results) / total
    predictions = tuple(sum(counts) for counts in zip(*(result.predictions for result in results), strict=True))
    counts = correct = None
    if all(result.class_counts is not None for result in results):  # per-class recall pools too
        counts = tuple(sum(column) for column in zip(*(result.class_counts or () for result in results), strict=True))
        correct = tuple(sum(column) for column in zip(*(result.class_correct or () for result in results), strict=True))
    metrics = None
    if all(result.metrics is not None for result in results):  # sums add up; a site's exact AUC only alone
        metrics = combine([result.metrics or {} for result in results])
    return EvalResult(loss, sum(result.correct for result in results), total, predictions, counts, correct, metrics)


def is_regression(result: EvalResult) -> bool:
    """Whether ``result`` scores a regression (its sums are ``regression``): it has no accuracy."""
    return result.metrics is not None and "regression" in result.metrics


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@dataclass(frozen=True)
class Readout:
    """What a run knows beyond the sums to show its scores: a regression target's ``units`` (``--target-units``)
    or else its ``label`` (the agreed label column's name), and for a user task ``user``, which turns combined
    sums into the JSON fields of the task's own figures (``user.<name>``) or of its raw sums (``user_sums``)."""

    units: str = ""
    label: str | None = None
    user: Callable[[Mapping[str, np.ndarray]], dict[str, Any]] | None = None

    def user_fields(self, result: EvalResult) -> dict[str, Any]:
        """A user task's fields for ``result``; ``{}`` for a built-in task or a score without sums."""
        return self.user(result.metrics) if self.user is not None and result.metrics is not None else {}


def headline(result: EvalResult, readout: Readout = Readout()) -> str:
    """The task's headline figures of a score with metric sums, as the console shows them; "" without sums.

    Binary: "AUC 0.962 (±0.0004 from binning), PR AUC 0.951, sensitivity 91.2%, specificity 94.0%" (the
    bound only when the AUC comes from pooled histograms); regression: "MAE 3.12 days, RMSE 4.01 days, R² 0.41"
    with units, "MAE 3.12 (length_of_stay), RMSE 4.01, R² 0.41" with the label's name alone; classification:
    "accuracy 91.2%, balanced accuracy 90.0%, macro F1 0.903"; then a user task's figures ("brier 0.0712").
    """
    if result.metrics is None:
        return ""
    own = ", ".join(
        f"{name.removeprefix('user.')} {value:.4g}"
        for name, value in readout.user_fields(result).items()
        if isinstance(value, float)
    )
    return ", ".join(part for part in (_builtin_headline(result.metrics, readout), own) if part)


def _builtin_headline(sums: Mapping[str, np.ndarray], readout: Readout) -> str:
    if "regression" in sums:
        figures = regression_metrics(sums["regression"])
        if figures is None:
            return ""
        units = f" {readout.units}" if readout.units else ""
        named = "" if readout.units or readout.label is None else f" ({readout.label})"
        return f"MAE {figures.mae:.4g}{units}{named}, RMSE {figures.rmse:.4g}{units}, R² {figures.r2:.3g}"
    if "confusion" not in sums:
        return ""  # a user task's own sums alone
    if "scores" in sums:
        auc, pr_auc = sums.get("auc"), sums.get("pr_auc")
        binary = binary_metrics(
            sums["confusion"],
            sums["scores"],
            float(auc[0]) if auc is not None else None,
            float(pr_auc[0]) if pr_auc is not None else None,
        )
        bound = f" (±{binary.auc_bound:.2g} from binning)" if not binary.exact and binary.auc_bound else ""
        return (
            f"AUC {_number(binary.auc)}{bound}, PR AUC {_number(binary.pr_auc)},"
            f" sensitivity {_share(binary.sensitivity)}, specificity {_share(binary.specificity)}"
        )
    figures_c = classification_metrics(sums["confusion"])
    return (
        f"accuracy {_share(figures_c.accuracy)}, balanced accuracy {_share(figures_c.balanced_accuracy)},"
        f" macro F1 {_number(figures_c.f1_macro)}"
    )


def result_json(result: EvalResult, classes: Sequence[str] = (), readout: Readout = Readout()) -> dict[str, Any]:
    """A score as the JSON fields the metrics file uses for it: loss, accuracy where it applies (not for a
    regression), per-class counts when the score has them, and its task's metrics
    (:func:`syncfed.metrics.report`: ``balanced_accuracy``, ``auc``, ``mae``, ...) when it has metric sums,
    with the regression's ``target_units`` when given and a user task's own fields."""
    fields: dict[str, Any] = {"loss": result.loss}
    if not is_regression(result):
        fields |= {"accuracy": result.accuracy, "correct": result.correct}
    fields["n"] = result.num_examples
    if result.class_counts is not None:
        fields |= {"class_counts": list(result.class_counts), "class_correct": list(result.class_correct or ())}
    if result.metrics is not None:
        fields |= report(result.metrics, classes)
        if "mae" in fields and readout.units:
            fields["target_units"] = readout.units
        fields |= readout.user_fields(result)
    return fields


def scalar_metrics(result: EvalResult) -> dict[str, float]:
    """The numbers among a score's JSON fields (loss, accuracy, auc, mae, ...), without counts and undefined
    figures: what TensorBoard plots and the model registry ranks versions by."""
    skip = {"n", "correct"}
    return {
        name: float(value)
        for name, value in result_json(result).items()
        if name not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


@dataclass(frozen=True)
class CrossSiteMatrix:
    """Cross-site validation: rows are models, columns are data sites.

    ``models`` are the training workers' final local models (the weights each
    returned in the last round it contributed to) and the global model;
    ``sites`` the training workers, scored on their validation split, and the
    evaluator, on its test set (``splits`` says which per site). A cell holds
    the score or, when a site could not score a model, the reason. The table
    and heat map show the task's headline :attr:`metric`; ``readout`` names a
    regression's units and gives a user task's figures in the JSON.
    """

    round: int  # the last round of the run
    models: tuple[str, ...]
    sites: tuple[str, ...]
    splits: tuple[str, ...]
    cells: tuple[tuple[Cell, ...], ...]
    readout: Readout = field(default=Readout(), compare=False)

    def __post_init__(self) -> None:
        for what, names in (("model", self.models), ("site", self.sites)):
            if not names or len(set(names)) != len(names):
                raise ConfigError(f"{what} names {list(names)} must be distinct and at least one")
        if len(self.splits) != len(self.sites) or not set(self.splits) <= {VALIDATION, TEST}:
            raise ConfigError(f"splits {list(self.splits)} must name {VALIDATION} or {TEST} for each site")
        shape = [len(row) for row in self.cells]
        if shape != [len(self.sites)] * len(self.models):
            raise ConfigError(f"cells have rows of {shape}, expected {len(self.models)} rows of {len(self.sites)}")

    def cell(self, model: str, site: str) -> Cell:
        """The score of ``model`` on ``site``'s data, or why there is none."""
        return self.cells[self.models.index(model)][self.sites.index(site)]

    @property
    def metric(self) -> str:
        """The task's headline metric, from the scored cells' sums: ``mae`` for a regression (in the target's
        units, so sites compare), ``auc`` for a binary task, else ``accuracy``."""
        sums = next(
            (cell.metrics for row in self.cells for cell in row if isinstance(cell, EvalResult) and cell.metrics),
            {},
        )
        return "mae" if "regression" in sums else "auc" if "scores" in sums else "accuracy"

    @property
    def metric_title(self) -> str:
        """The metric as a heading names it: "accuracy", "ROC AUC", "MAE in days" or "MAE (length_of_stay)"."""
        if self.metric == "auc":
            return "ROC AUC"
        if self.metric == "accuracy":
            return "accuracy"
        units, label = self.readout.units, self.readout.label
        return f"MAE in {units}" if units else f"MAE ({label})" if label else "MAE"

    def values(self) -> np.ndarray:
        """The headline metric per cell as float64 [models, sites], NaN where a cell is empty or it is undefined."""
        metric = self.metric

        def value(cell: Cell) -> float:
            if not isinstance(cell, EvalResult):
                return math.nan
            if metric == "accuracy":
                return cell.accuracy
            figure = report(cell.metrics or {}).get(metric)
            return math.nan if figure is None else float(figure)

        return np.array([[value(cell) for cell in row] for row in self.cells], dtype=np.float64).reshape(
            len(self.models), len(self.sites)
        )

    def _shown(self, value: float) -> str:
        if math.isnan(value):
            return "-"
        if self.metric == "accuracy":
            return f"{value:.2%}"
        return f"{value:.3f}" if self.metric == "auc" else f"{value:.4g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "models": list(self.models),
            "sites": list(self.sites),
            "splits": list(self.splits),
            "cells": [
                [
                    result_json(cell, (), self.readout) if isinstance(cell, EvalResult) else {"error": cell}
                    for cell in row
                ]
                for row in self.cells
            ],
        }

    def table(self) -> list[str]:
        """The headline metric as a text table, rows of models and columns of sites, then why each empty cell
        is empty ("-" also marks a figure the site's data leave undefined, such as an AUC of one class)."""
        header = ["model \\ data", *(f"{site} ({split})" for site, split in zip(self.sites, self.splits, strict=True))]
        rows = [
            [model, *(self._shown(value) for value in values)]
            for model, values in zip(self.models, self.values().tolist(), strict=True)
        ]
        widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) if column == 0 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
            for line in [header, *rows]
        ]
        lines += [
            f"  - {model} on {site}: {cell}"
            for model, row in zip(self.models, self.cells, strict=True)
            for site, cell in zip(self.sites, row, strict=True)
            if isinstance(cell, str)
        ]
        return lines

    def draw(self, path: Path) -> bool:
        """Save the headline metric's heat map as an image at ``path``; False when matplotlib is not installed.

        Accuracy and AUC run from 0 to 1; MAE from 0 to the largest cell, its colours reversed (lower is better).
        """
        try:
            from matplotlib import colormaps
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return False
        values, lower_is_better = self.values(), self.metric == "mae"
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if lower_is_better and finite.size and finite.max() > 0 else 1.0
        figure = Figure(figsize=(1.6 + 1.3 * len(self.sites), 1.2 + 0.6 * len(self.models)), dpi=150)
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        colours = colormaps["viridis_r" if lower_is_better else "viridis"].with_extremes(bad="lightgrey")  # grey: empty
        image = axes.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=0, vmax=top, aspect="auto")
        for row, column in np.ndindex(values.shape):
            value = float(values[row, column])
            darkness = value / top if not lower_is_better else 1 - value / top  # viridis is dark at its low end
            text, colour = ("n/a", "black") if math.isnan(value) else (self._shown(value), _ink(darkness))
            axes.text(column, row, text, ha="center", va="center", color=colour, fontsize=9)
        axes.set_xticks(
            range(len(self.sites)), [f"{site}\n({split})" for site, split in zip(self.sites, self.splits, strict=True)]
        )
        axes.set_yticks(range(len(self.models)), list(self.models))
        axes.set_xlabel("data")
        axes.set_ylabel("model")
        axes.set_title(f"Cross-site validation {self.metric_title} after round {self.round}")
        figure.colorbar(image, ax=axes, label=self.metric_title)
        figure.tight_layout()
        figure.savefig(path)
        return True


def _ink(position: float) -> str:
    """Text colour that stays readable on viridis at ``position`` from 0 to 1: white on its dark low end,
    black on its light high end."""
    return "white" if position < 0.6 else "black"


def write_cross_site(matrix: CrossSiteMatrix, directory: Path) -> list[Path]:
    """Write ``cross_site.json`` and, with matplotlib, ``cross_site.png`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "cross_site.json"]
    written[0].write_text(json.dumps(matrix.to_json(), indent=2) + "\n", encoding="utf-8")
    picture = directory / "cross_site.png"
    if matrix.draw(picture):
        written.append(picture)
    return written
