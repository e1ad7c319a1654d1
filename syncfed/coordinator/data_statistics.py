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

Each query reads a site's whole data (an image folder once per channel, twice
under ``--secure-agg``), so it has its own timeout, ``--statistics-timeout``,
well above the one for an evaluation reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from ..analytics import FeatureStats, combine_feature_stats
from ..config import CoordinatorConfig
from ..data.normalization import (
    REFINE_RANGE,
    coarse_range,
    default_normalization,
    plan_statistics,
    refine_statistics,
    statistics_queries,
)
from ..exceptions import IncompatibleWorkers, QuorumNotMet, SyncfedError
from ..net.link import WorkerLink
from ..protocol import DataPlan, Info, Query, QueryResult
from .query_round import SECURE_SUM, ask_each, sum_securely

__all__ = ["agree_statistics", "every_answer"]


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
        IncompatibleWorkers: a worker could not answer (its one line says why), or a secure
            pass had too few workers left to unmask its sum.
    """
    normalize = config.normalize or default_normalization(plan.kind)
    if normalize != "federated":
        return plan
    if config.secure_agg:
        largest = max(infos[name].num_examples for name in trainers)
        wide = coarse_range(largest, math.prod(plan.input_shape), len(trainers))
        stats, error = await _answers(config, statistics_queries(plan, wide), trainers, infos)
        coarse = plan_statistics(plan, stats, sum_error=error)
        stats, error = await _answers(config, statistics_queries(coarse, REFINE_RANGE), trainers, infos)
        agreed = refine_statistics(coarse, stats, sum_error=error)
    else:
        stats, _ = await _answers(config, statistics_queries(plan), trainers, infos)
        agreed = plan_statistics(plan, stats)
    per = "per-channel" if plan.kind == "images" else "per-feature"
    secure = " (secure sums)" if config.secure_agg else ""
    report(f"Federated normalisation: {per} mean and standard deviation over {len(trainers)} sites{secure}")
    return agreed


async def _answers(
    config: CoordinatorConfig, queries: tuple[Query, ...], trainers: Mapping[str, WorkerLink], infos: Mapping[str, Info]
) -> tuple[list[FeatureStats], float]:
    """The combined answer to each query, and the largest error a secure sum put into one of them (0 when exact).

    Every trainer must answer: a failure stops the run with its line, since
    statistics over some of the sites would standardise the others wrongly.
    """
    combined: list[FeatureStats] = []
    error = 0.0
    for query in queries:
        results, sum_error = await every_answer(
            config,
            query,
            trainers,
            infos,
            what="federated normalisation",
            hint="; start the coordinator with --normalize none to skip it",
        )
        error = max(error, sum_error)
        combined.append(combine_feature_stats(query, results))
    return combined, error


async def every_answer(
    config: CoordinatorConfig,
    query: Query,
    trainers: Mapping[str, WorkerLink],
    infos: Mapping[str, Info],
    *,
    what: str,
    hint: str = "",
) -> tuple[dict[str, QueryResult], float]:
    """Every trainer's answer to ``query`` (under ``--secure-agg`` one secure sum of them), and the error the
    secure sum put into it (0 when exact), within ``--statistics-timeout``.

    Raises:
        IncompatibleWorkers: a trainer could not answer, or a secure sum could not be unmasked: ``what``
            failed, then ``hint``; a statistic over some of the sites only would be wrong for the others.
    """
    failures: dict[str, SyncfedError] = {}
    if not config.secure_agg:
        results, failures = await ask_each(query, trainers, timeout=config.statistics_timeout)
        error = 0.0
    else:
        reference = infos[next(iter(trainers))]
        try:
            answer, round_ = await sum_securely(
                query,
                trainers,
                num_features=math.prod(query.data.input_shape if query.data is not None else reference.input_shape),
                num_classes=query.data.num_classes if query.data is not None else reference.num_classes,
                largest=max(infos[name].num_examples for name in trainers),
                threshold=config.secagg_threshold,
                timeout=config.statistics_timeout,
                failures=failures,
            )
        except QuorumNotMet as exc:
            # Why the workers left the secure sum says more than its count: a policy refusal, a timeout.
            why = "".join(f"; {name}: {failure}" for name, failure in list(failures.items())[:3])
            raise IncompatibleWorkers(f"{what} failed: {exc}{why}") from None
        results, error = {SECURE_SUM: answer}, float(round_["sum_error_bound"])
    if failures:
        name, failure = next(iter(failures.items()))
        raise IncompatibleWorkers(f"{what} failed at {name}: {failure}{hint}")
    return results, error
