"""Federated normalisation: the mean and standard deviation every site standardises with, agreed before round 1.

Standardising each site on its own data silently breaks FedAvg on non-IID
sites: one raw value becomes different inputs at two sites. With
``--normalize federated`` (the default for every kind of data) the
coordinator asks the workers for ``feature-stats`` over their data prepared
with the plan but without statistics, combines the answers exactly
(:func:`syncfed.analytics.combine_feature_stats`) and puts the pooled mean and
standard deviation into the plan (:func:`plan_statistics`); every site then
applies ``(x - mean) / std`` after encoding. ``fixed`` sends no statistics:
images keep the [0, 1] scale the sources read them in, which is their fixed
scale; tables and arrays keep their values, so for them ``fixed`` is ``none``.

The statistics:

- the population standard deviation (``ddof=0``, as scikit-learn's
  StandardScaler); a value of zero variance gets std 1, so it stays as it is
  about its mean;
- tables: per numeric column; the one-hot slots of categorical columns keep
  mean 0 and std 1 (a category is present or not, and a mean would leak
  nothing useful while shifting the zeros);
- arrays: per input value;
- images: per channel, over every pixel of that channel. A ``feature-stats``
  query over every pixel would not fit a message (150,528 indices for a
  224x224 colour image), so each channel has a query of its own with no
  selected features: its plan leaves that channel as the plan says and
  divides the others by :data:`MASK_STD` (2^100), so they add nothing a
  float64 sum keeps, and the moments of all values give the channel's (a
  grayscale image needs no mask: one query with the plan itself);
- :func:`statistics_queries` asks at most :data:`QUERY_FEATURES` features per
  query, so a wide table or array is asked in several.

Secure aggregation (``--secure-agg``) sums every worker's moments in a fixed
point ring, which needs every value clipped to a range known in advance. So
the statistics take two passes, each a secure ``feature-stats`` round:

1. over the prepared values clipped to :func:`coarse_range`, the widest
   symmetric power-of-two range whose sums :func:`syncfed.analytics.secure_clip`
   lets through for the round's size, giving coarse statistics ``m1, s1``
   (:func:`plan_statistics` with the round's ``sum_error``);
2. over the values standardised with the coarse plan (about N(0, 1)),
   clipped to :data:`REFINE_RANGE`, giving ``m2, s2``; then (:func:`refine_statistics`)
   ``mean = m1 + s1 * m2`` and ``std = s1 * s2``, one-hot slots untouched.

Error bounds. Let ``e`` be a secure round's ``sum_error_bound`` (each
decoded sum's error, :attr:`syncfed.masking.Quantizer.error_bound`) and ``n``
the values a moment covers (examples; for an image channel, examples times
pixels): ``eps = e / n``. A mean is within ``eps`` and a variance within
``E = eps * (1 + 2|mean| + eps)`` of the clipped data's; every standard
deviation is floored at ``sqrt(E)``, which keeps the floored variance within
``E`` of the true one and ``s1`` at least the true std over ``sqrt(2)``. The
workers standardise in float32: with ``u = 2^-22`` (two roundings of each
value), pass 2 adds ``u * (|m2| + s2)`` to the mean's bound and
``2u * (m2^2 + s2^2)`` to the variance's. So the final statistics satisfy::

    |mean - true mean| <= s1 * (eps2 + u * (|m2| + s2))
    |std - true std|   <= s1 * min(sqrt(E2), E2 / s2),  E2 = eps2 * (1 + 2|m2| + eps2) + 2u * (m2^2 + s2^2)

Clipping changes nothing when every raw value lies within ``coarse_range``
and within 45 standard deviations of its mean (``64 / sqrt(2)``: pass 2 then
clips none); beyond, values are clipped, not dropped, and bias the
statistics. For example, 3 sites whose largest holds 10,000 rows of 30 values
get ``coarse_range`` +-16384 and ``e1 = 1.5``, ``e2 = 2.3e-5`` (so ``eps2``
about 8e-10 with 30,000 rows in all): the float32 term dominates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from ..analytics import SUM_SLACK, FeatureStats, secure_clip
from ..exceptions import ConfigError
from ..masking import Quantizer
from ..protocol import Query
from ..protocol.data_messages import DATA_KINDS, MAX_STATISTICS, DataPlan

__all__ = [
    "NORMALIZATIONS",
    "QUERY_FEATURES",
    "MASK_STD",
    "REFINE_RANGE",
    "default_normalization",
    "statistics_queries",
    "plan_statistics",
    "coarse_range",
    "refine_statistics",
]

#: How the federation standardises a user's own data (``--normalize``).
NORMALIZATIONS: Final = ("federated", "fixed", "none")
#: The most features one statistics query selects: a larger list of indices would not decode within a
#: worker's budget for a small message (see docs/protocol.md, "Decoding cost").
QUERY_FEATURES: Final = 8192
#: The std by which an image channel's query divides the other channels: their values vanish from its sums.
MASK_STD: Final = 2.0**100
#: Pass 2's clipping range: the values standardised with the coarse statistics, about N(0, 1).
REFINE_RANGE: Final = (-64.0, 64.0)


def default_normalization(kind: str) -> str:
    """``federated`` for every kind: tables and arrays need it most, and images gain from it too (per channel).

    Raises:
        ConfigError: if ``kind`` is not a kind of data.
    """
    if kind not in DATA_KINDS:
        raise ConfigError(f"data kind {kind!r} is not one of {', '.join(DATA_KINDS)}")
    return "federated"


def statistics_queries(plan: DataPlan, value_range: tuple[float, float] | None = None) -> tuple[Query, ...]:
    """The ``feature-stats`` queries whose combined answers :func:`plan_statistics` (``plan`` without
    statistics) or :func:`refine_statistics` (``plan`` with the coarse ones) read, in order.

    ``value_range`` (``(-h, h)``) makes the workers clip every value first, as a secure sum needs.

    Raises:
        ConfigError: if the range is not symmetric about 0 (an image channel's masked values are 0), or
            arrays hold more values per example than a plan carries statistics for.
    """
    if value_range is not None and not (value_range[1] > 0 and value_range[0] == -value_range[1]):
        raise ConfigError(f"a statistics query's clipping range must be (-h, h), not {value_range}")
    if plan.kind == "images":
        channels = plan.input_shape[0]
        if channels == 1:
            return (Query("feature-stats", (), value_range=value_range, data=plan),)
        return tuple(
            Query("feature-stats", (), value_range=value_range, data=_channel_plan(plan, channel))
            for channel in range(channels)
        )
    values = math.prod(plan.input_shape)
    if values > MAX_STATISTICS:
        raise ConfigError(
            f"arrays of {values} values per example exceed limit of {MAX_STATISTICS} standardised values:"
            " start the coordinator with --normalize none"
        )
    selected = plan.numeric_slots() if plan.kind == "table" else np.arange(values)
    return tuple(
        Query(
            "feature-stats",
            tuple(selected[start : start + QUERY_FEATURES].tolist()),
            value_range=value_range,
            data=plan,
        )
        for start in range(0, len(selected), QUERY_FEATURES)
    )


def _channel_plan(plan: DataPlan, channel: int) -> DataPlan:
    """``plan`` for one channel's query: that channel standardised as the plan says (or not at all), the
    others divided by :data:`MASK_STD`."""
    channels = plan.input_shape[0]
    mean = [0.0] * channels
    std = [MASK_STD] * channels
    mean[channel], std[channel] = (plan.mean[channel], plan.std[channel]) if plan.mean else (0.0, 1.0)
    return dataclasses.replace(plan, mean=tuple(mean), std=tuple(std))


def _moments(plan: DataPlan, stats: Sequence[FeatureStats]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and count of each standardised quantity (numeric column, value or channel), read from the
    combined answers to :func:`statistics_queries`.

    Raises:
        ConfigError: if the answers are not those of the plan's queries.
    """
    queries = statistics_queries(plan)
    if len(stats) != len(queries):
        raise ConfigError(f"{len(stats)} statistics answers for the plan's {len(queries)} queries")
    for index, (answer, query) in enumerate(zip(stats, queries, strict=True)):
        if answer.features != query.features:
            raise ConfigError(f"statistics answer {index} is not over the features its query selects")
    if plan.kind != "images":
        if not stats:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        mean = np.concatenate([answer.selected.mean for answer in stats])
        variance = np.concatenate([answer.selected.variance for answer in stats])
        return mean, variance, np.full(len(mean), float(stats[0].selected.count))
    # Each channel's query pooled its n values with (C - 1) n zeros: its moments over all C n values are
    # p = S1 / (C n) and var = S2 / (C n) - p^2, so the channel's mean is C p and its variance S2 / n - (C p)^2.
    channels = plan.input_shape[0]
    pooled = [answer.pooled for answer in stats]
    share = np.array([p.mean[0] for p in pooled])
    variance = channels * np.array([p.variance[0] for p in pooled]) - channels * (channels - 1) * np.square(share)
    counts = np.array([p.count / channels for p in pooled])
    return channels * share, np.maximum(variance, 0.0), counts


def _std(mean: np.ndarray, variance: np.ndarray, count: np.ndarray, sum_error: float) -> np.ndarray:
    """Each standard deviation, floored at the square root of its variance's error bound, and 1 where that is 0."""
    eps = sum_error / count
    std = np.sqrt(np.maximum(variance, eps * (1 + 2 * np.abs(mean) + eps)))
    return np.where(std > 0, std, 1.0)


def _with_statistics(plan: DataPlan, mean: np.ndarray, std: np.ndarray) -> DataPlan:
    """``plan`` with one mean and std per standardised quantity; a table's one-hot slots get 0 and 1."""
    if plan.kind == "table":
        positions = plan.numeric_slots()
        full_mean, full_std = np.zeros(plan.input_shape[0]), np.ones(plan.input_shape[0])
        full_mean[positions], full_std[positions] = mean, std
        mean, std = full_mean, full_std
    return dataclasses.replace(plan, mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def plan_statistics(plan: DataPlan, stats: Sequence[FeatureStats], *, sum_error: float = 0.0) -> DataPlan:
    """``plan`` with the pooled mean and standard deviation, from the combined answers to
    ``statistics_queries(plan)``, in their order.

    ``sum_error`` is a secure round's ``sum_error_bound`` (pass 1 of the
    secure path): each std is then floored at the square root of its
    variance's error bound; 0 for exact answers.

    Raises:
        ConfigError: if ``plan`` already has statistics, or the answers are not those of its queries.
    """
    if plan.mean:
        raise ConfigError("the plan already has statistics: answers over data standardised with them refine them")
    mean, variance, count = _moments(plan, stats)
    return _with_statistics(plan, mean, _std(mean, variance, count, sum_error))


def refine_statistics(coarse: DataPlan, stats: Sequence[FeatureStats], *, sum_error: float = 0.0) -> DataPlan:
    """Pass 2 of the secure path: ``coarse`` with statistics refined from the combined answers to
    ``statistics_queries(coarse, REFINE_RANGE)``: ``mean = m1 + s1 * m2``, ``std = s1 * s2``.

    ``m1`` and ``s1`` are taken as the workers used them, in float32.

    Raises:
        ConfigError: if ``coarse`` has no statistics, or the answers are not those of its queries.
    """
    if not coarse.mean:
        raise ConfigError("refining needs a plan with coarse statistics")
    m2, variance, count = _moments(coarse, stats)
    s2 = _std(m2, variance, count, sum_error)
    used = np.arange(len(m2)) if coarse.kind != "table" else coarse.numeric_slots()
    m1 = np.asarray(coarse.mean, dtype=np.float32)[used].astype(np.float64)
    s1 = np.asarray(coarse.std, dtype=np.float32)[used].astype(np.float64)
    return _with_statistics(coarse.without_statistics(), m1 + s1 * m2, s1 * s2)


def coarse_range(
    num_examples: int, num_values: int, num_clients: int, *, half_width: float | None = None
) -> tuple[float, float]:
    """Pass 1's clipping range ``(-h, h)`` for a secure round of ``num_clients`` workers, the largest holding
    ``num_examples`` examples of ``num_values`` model input values each.

    By default ``h`` is the largest power of two whose sums a 64-bit round
    adds without wrapping (the rule of :func:`~syncfed.analytics.secure_clip`):
    the widest range, so the fewest values are clipped; its sums are then
    quantised to about one unit per worker (see the module's error bounds).
    ``half_width`` asks for a narrower one.

    Raises:
        ConfigError: if ``half_width`` is not positive or wider than the round allows, or the
            round is too large for a range of at least +-1.
    """
    limit = Quantizer(num_clients, 1.0, bits=64, max_count=1).limit / (1.0 + SUM_SLACK)
    values = float(num_examples) * num_values
    if values > limit:
        raise ConfigError(
            f"{num_examples} examples of {num_values} values leave a secure sum no clipping range of at least +-1:"
            " start the coordinator with --normalize none or without --secure-agg"
        )
    widest = 2.0 ** math.floor(math.log2(math.sqrt(limit / values)))
    if half_width is not None and not 0 < half_width <= widest:
        raise ConfigError(
            f"clipping range +-{half_width:g} is not within the +-{widest:g} a secure sum of {num_examples}"
            f" examples of {num_values} values from each of {num_clients} workers allows"
        )
    half = widest if half_width is None else float(half_width)
    # The round's own rule has the last word: it raises if these sums could not be added exactly.
    secure_clip(Query("feature-stats", (), value_range=(-half, half)), num_examples, num_values, num_clients)
    return (-half, half)
