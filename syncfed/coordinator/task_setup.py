"""Before round 1, what the task needs from every site's data: balanced class weights and the target's scale.

- ``--class-weights balanced`` weighs class ``c`` by ``n / (C * n_c)`` (as
  scikit-learn's ``compute_class_weight("balanced")``), from the federated
  label histogram: the sum of the trainers' hello histograms, or, when a
  site keeps its counts private (``--secure-agg``, ``--withhold-histogram``),
  a secure ``label-histogram`` query, so no site's counts are revealed.
- A regression model learns the target standardised with its global mean
  and standard deviation, found as the features' are
  (:mod:`.data_statistics`): exact moments from a ``label-stats`` query, or
  under ``--secure-agg`` two secure passes, the first clipped to the widest
  range a secure sum allows, the second to ``REFINE_RANGE`` standard
  deviations about the first pass's mean.

A resumed run keeps what its checkpoint recorded instead (see :mod:`.journal`).

Then :func:`task_readout` says how the run shows its scores: a regression's
units (``--target-units``) or its label's name, and a user task's own
figures, from its ``metrics`` when the coordinator can import the task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..analytics import Moments, combine_label_stats, combine_labels
from ..config import CoordinatorConfig
from ..data.normalization import REFINE_RANGE, coarse_range
from ..evaluation import Readout
from ..exceptions import ConfigError, IncompatibleWorkers, ModelError
from ..net.link import WorkerLink
from ..protocol import TASK_KINDS, DataPlan, Info, Query, Recipe
from ..tasks import Task, resolve_task, user_figures
from .data_statistics import every_answer

__all__ = ["agree_task", "balanced_weights", "hello_histogram", "target_scale", "task_readout"]


def balanced_weights(histogram: Sequence[int]) -> tuple[float, ...]:
    """``n / (C * n_c)`` per class of ``histogram``, ``C`` its classes; a class without training examples
    gets 1 (no example of it is ever weighed).

    Raises:
        ConfigError: if the histogram holds no example.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ConfigError("--class-weights balanced needs training examples, and the histogram holds none")
    weights = np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1)), 1.0)
    return tuple(float(w) for w in weights)


def hello_histogram(infos: Mapping[str, Info], plan: DataPlan | None) -> np.ndarray | None:
    """The trainers' hello histograms added up, in the plan's class order over own data (each site counts its
    own classes, a subset of the agreed ones); ``None`` when a site withheld its histogram."""
    total: np.ndarray | None = None
    for info in infos.values():
        if info.histogram is None:
            return None
        counts = np.asarray(info.histogram, dtype=np.int64)
        if plan is not None and plan.classes is not None and info.schema is not None and info.schema.classes:
            index = {name: position for position, name in enumerate(plan.classes)}
            placed = np.zeros(len(plan.classes), dtype=np.int64)
            for name, count in zip(info.schema.classes, counts, strict=True):
                placed[index[name]] += count
            counts = placed
        total = counts if total is None else total + counts
    return total


def target_scale(stats: Moments, sum_error: float = 0.0) -> tuple[float, float]:
    """The mean and standard deviation of combined label moments; the std floored at the square root of
    its variance's error bound (``sum_error`` of a secure sum, per example), and 1 for a constant target."""
    mean, variance = float(stats.mean[0]), float(stats.variance[0])
    eps = sum_error / stats.count
    std = math.sqrt(max(variance, eps * (1 + 2 * abs(mean) + eps)))
    return mean, std if std > 0 else 1.0


async def agree_task(
    config: CoordinatorConfig,
    recipe: Recipe | None,
    plan: DataPlan | None,
    trainers: Mapping[str, WorkerLink],
    infos: Mapping[str, Info],
    *,
    report: Callable[[str], None],
) -> Recipe | None:
    """``recipe`` with its balanced class weights and its target's standardisation, from the ``trainers``' data.

    Raises:
        IncompatibleWorkers: a site could not answer (its one line says why), or a secure pass had
            too few workers left to unmask its sum.
    """
    if recipe is None:
        return None
    site_infos = {name: infos[name] for name in trainers}
    secure = " (secure sums)" if config.secure_agg else ""
    if config.class_weights is not None:
        histogram = None if config.secure_agg else hello_histogram(site_infos, plan)
        if histogram is None:
            query = Query("label-histogram", data=plan)
            histogram = combine_labels(
                query, (await every_answer(config, query, trainers, site_infos, what=f"{query.query} for the task"))[0]
            )
        weights = balanced_weights(histogram.tolist())
        names = plan.classes if plan is not None and plan.classes is not None else range(len(weights))
        report(
            "Class weights (balanced): "
            + ", ".join(f"{name} {weight:.3g}" for name, weight in zip(names, weights, strict=True))
            + secure
        )
        recipe = dataclasses.replace(recipe, class_weights=weights)
    if recipe.task == "regression" and plan is not None and config.normalize != "none":
        mean, std = await _target_statistics(config, plan, trainers, site_infos)
        report(f"Regression target: mean {mean:.6g}, standard deviation {std:.6g} over {len(trainers)} sites{secure}")
        recipe = dataclasses.replace(recipe, target_mean=mean, target_std=std)
    return recipe


async def _target_statistics(
    config: CoordinatorConfig, plan: DataPlan, trainers: Mapping[str, WorkerLink], infos: Mapping[str, Info]
) -> tuple[float, float]:
    """The target's global mean and standard deviation: exact, or by two secure passes (module docstring)."""
    if not config.secure_agg:
        query = Query("label-stats", data=plan)
        answers, _ = await every_answer(config, query, trainers, infos, what=f"{query.query} for the task")
        return target_scale(combine_label_stats(query, answers))
    largest = max(info.num_examples for info in infos.values())
    try:
        wide = coarse_range(largest, 1, len(trainers))
    except ConfigError as exc:
        raise IncompatibleWorkers(f"the regression target cannot be standardised securely: {exc}") from None
    query = Query("label-stats", value_range=wide, data=plan)
    answers, error = await every_answer(config, query, trainers, infos, what=f"{query.query} for the task")
    mean, std = target_scale(combine_label_stats(query, answers), error)
    query = Query("label-stats", value_range=(mean + REFINE_RANGE[0] * std, mean + REFINE_RANGE[1] * std), data=plan)
    answers, error = await every_answer(config, query, trainers, infos, what=f"{query.query} for the task")
    return target_scale(combine_label_stats(query, answers), error)


def task_readout(
    config: CoordinatorConfig,
    recipe: Recipe | None,
    plan: DataPlan | None,
    num_classes: int,
    *,
    report: Callable[[str], None],
) -> Readout:
    """How the run shows its scores (:class:`~syncfed.evaluation.Readout`).

    A user task is imported here, from the coordinator's own ``--task``
    path: the operator's code on the operator's machine, never a path a
    worker named. When it cannot be imported, lacks ``metrics`` or its
    ``metrics`` fails, the user sums are written raw (``user_sums``), and the
    console says why once.
    """
    label = plan.label if plan is not None else None
    if recipe is None or recipe.task in TASK_KINDS:
        return Readout(config.target_units or "", label)
    path = recipe.task
    task: Task | None = None
    why = ""
    try:
        task = resolve_task(path, num_classes)
        if not callable(getattr(task, "metrics", None)):
            task, why = None, "it gives no metrics(sums)"
    except ConfigError as exc:  # "task mypkg.tasks:Task cannot be imported: No module named 'mypkg'"
        why = str(exc)

    def fields(sums: Mapping[str, np.ndarray]) -> dict[str, Any]:
        nonlocal task, why
        own = {name: array for name, array in sums.items() if name.startswith("user.")}
        if task is not None:
            try:
                return {f"user.{name}": value for name, value in user_figures(task, sums).items()}
            except ModelError as exc:
                task, why = None, str(exc)
        if why and own:
            report(f"Task {path}: its own metric sums are written raw (user_sums): {why}")
            why = ""  # said once
        return {"user_sums": {name: array.tolist() for name, array in own.items()}} if own else {}

    return Readout(config.target_units or "", label, fields)
