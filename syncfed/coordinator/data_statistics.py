"""Federated normalisation before round 1: the statistics every site standardises its own data with.

Each site standardising on its own data silently breaks FedAvg on non-IID
sites: one feature value means different things at different sites. So the
coordinator asks the training workers for the moments of every model input
over the agreed encoding (a ``feature-stats`` query carrying the plan without
statistics), combines them exactly (``syncfed.analytics``), and puts the
global mean and standard deviation in the plan every request carries.

Under ``--secure-agg`` it learns only sums, and a secure sum needs bounded
values, so it takes two passes (``syncfed.data.normalization``): coarse
moments of the values clipped to a wide range, then the moments of the values
standardised with the coarse ones, clipped to a narrow range, which refine them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..analytics import FeatureStats, Moments, combine_feature_stats
from ..config import CoordinatorConfig
from ..data.normalization import (
    FIRST_PASS_RANGE,
    SECOND_PASS_RANGE,
    default_normalization,
    plan_statistics,
    refine_statistics,
)
from ..exceptions import IncompatibleWorkers, QuorumNotMet, SyncfedError
from ..net.link import WorkerLink
from ..protocol import MAX_FEATURES, DataPlan, Info, Query, QueryResult
from .query_round import ask_each, sum_securely

__all__ = ["MAX_QUERY_FEATURES", "agree_statistics"]

#: Features asked for in one query: a wider input is asked in parts, each within msgpack's array limit.
MAX_QUERY_FEATURES = 2**17


async def agree_statistics(
    config: CoordinatorConfig,
    plan: DataPlan,
    trainers: Mapping[str, WorkerLink],
    infos: Mapping[str, Info],
    *,
    report: Callable[[str], None],
) -> DataPlan:
    """``plan`` with the statistics ``config.normalize`` calls for, from the ``trainers``' data.

    Raises:
        IncompatibleWorkers: a worker could not answer (its one line says why).
        QuorumNotMet: a secure pass had too few workers left to unmask its sum.
    """
    normalize = config.normalize or default_normalization(plan.kind)
    if normalize != "federated":
        return plan
    if config.secure_agg:
        coarse = plan_statistics(plan, await _moments(config, plan, trainers, infos, FIRST_PASS_RANGE))
        fine = await _moments(config, coarse, trainers, infos, SECOND_PASS_RANGE)
        agreed = refine_statistics(coarse, fine)
    else:
        agreed = plan_statistics(plan, await _moments(config, plan.without_statistics(), trainers, infos, None))
    report(
        f"Federated normalisation: {'per-channel' if plan.kind == 'images' else 'per-feature'} mean and standard"
        f" deviation over {len(trainers)} sites{' (secure sums)' if config.secure_agg else ''}"
    )
    return agreed


async def _moments(
    config: CoordinatorConfig,
    plan: DataPlan,
    trainers: Mapping[str, WorkerLink],
    infos: Mapping[str, Info],
    clip: float | None,
) -> FeatureStats:
    """The combined moments of every model input value over the trainers' data prepared by ``plan``,
    asked in parts of at most :data:`MAX_QUERY_FEATURES` features."""
    width = math.prod(plan.input_shape)
    assert width <= MAX_FEATURES, "the protocol bounds an example's values"
    parts: list[Moments] = []
    pooled: list[Moments] = []
    for start in range(0, width, MAX_QUERY_FEATURES):
        features = tuple(range(start, min(start + MAX_QUERY_FEATURES, width)))
        query = Query("feature-stats", features, None, None if clip is None else (-clip, clip), plan)
        stats = combine_feature_stats(query, await _answers(config, query, trainers, infos, width))
        parts.append(stats.selected)
        pooled.append(stats.pooled)
    selected = Moments(
        parts[0].count, np.concatenate([part.mean for part in parts]), np.concatenate([part.m2 for part in parts])
    )
    return FeatureStats(tuple(range(width)), selected, pooled[0])  # over every value: the same in each part


async def _answers(
    config: CoordinatorConfig,
    query: Query,
    trainers: Mapping[str, WorkerLink],
    infos: Mapping[str, Info],
    width: int,
) -> dict[str, QueryResult]:
    """Every trainer's answer, or with ``--secure-agg`` their secure sum; a failure stops the run with its line."""
    failures: dict[str, SyncfedError] = {}
    if config.secure_agg:
        try:
            combined, _ = await sum_securely(
                query,
                trainers,
                num_features=width,
                num_classes=1,
                largest=max(infos[name].num_examples for name in trainers),
                threshold=config.secagg_threshold,
                timeout=config.request_timeout,
                failures=failures,
            )
        except QuorumNotMet as exc:
            raise IncompatibleWorkers(f"federated normalisation failed: {exc}") from None
        results = {"secure sum": combined}
    else:
        results, failures = await ask_each(query, trainers)
    if failures:
        name, error = next(iter(failures.items()))
        raise IncompatibleWorkers(
            f"federated normalisation failed at {name}: {error}; start the coordinator with --normalize none to skip it"
        )
    return results
