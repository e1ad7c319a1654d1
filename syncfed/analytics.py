"""Federated analytics: statistics over every worker's data without moving a row.

A worker answers a :class:`~syncfed.protocol.Query` from the data it holds
with local statistics (:func:`answer`); the coordinator validates and
combines the answers (:func:`combine_labels`, :func:`combine_feature_stats`,
:func:`combine_quantiles`). Features are the flattened inputs (the 64 pixels
of a digits image).

- ``label-histogram``: examples per class, summed over workers.
- ``feature-stats``: per feature count, mean and variance, combined exactly
  from each worker's count, mean and M2 (sum of squared deviations) with the
  parallel formula of Chan, Golub and LeVeque 1979 ("Updating formulae and a
  pairwise algorithm for computing sample variances"), which stays accurate
  where sums of squares cancel; plus the same over every value of every feature.
- ``label-stats``: the count, mean and M2 of a continuous label (a
  regression target), combined as ``feature-stats`` are; the coordinator
  standardises the target with them (``syncfed.coordinator.task_setup``).
- ``quantiles``: every worker fills the histogram the query fixes (equal
  bins over a range, a cell below it and one above), the coordinator sums
  them and reads quantiles off the sum, within one bin width of
  ``np.quantile`` over the pooled values when they lie in the range.

Disclosure control: a worker refuses (error ``refused``) any query whose
answer would describe a group smaller than its minimum group size: all its
data, or any non-empty label or histogram cell. In the histogram over all
features a group is the distinct examples with a value in the cell, since one
example gives many values. Refusing is safer than suppressing small cells:
a worker's size is public (``info`` carries its label histogram), so a
suppressed cell would follow from the others by subtraction. The reason names
the feature, never the cell or the count. This is the threshold rule of
statistical disclosure control, not a guarantee: differencing queries over
shifted bins can still isolate a small group; differential privacy answers that.

Differential privacy (central: the coordinator sees the workers' exact
answers and releases only noisy ones) uses the Laplace mechanism of Dwork,
McSherry, Nissim and Smith 2006 ("Calibrating Noise to Sensitivity in Private
Data Analysis"): noise of scale ``sensitivity / epsilon`` on a vector whose L1
distance between neighbouring data sets (one example added or removed at any
worker) is at most ``sensitivity``. :func:`private_labels`,
:func:`private_feature_stats` and :func:`private_quantiles` state each
query's sensitivity. Feature statistics need bounded values: a
``feature-stats`` query with a range makes workers clip to it first.

Secure aggregation (:mod:`syncfed.secagg`) hands the coordinator the sum of
the workers' vectors and nothing else, so each answer travels as sums
(:func:`sums`): the counts and histograms as they are, and the moments as
sums and sums of squares about the centre of the query's clipping range,
which secure ``feature-stats`` needs for a bound. :func:`secure_clip` picks
the fixed-point range of a round from the workers' advertised sizes so that
counts sum exactly; :func:`from_sums` turns the unmasked sum back into one
answer that combines like a single worker's.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from .datasets import Dataset
from .exceptions import AggregationError, ConfigError, ProtocolError
from .masking import Quantizer
from .privacy import _check_positive
from .protocol import Error, Query, QueryResult

__all__ = [
    "Moments",
    "FeatureStats",
    "Quantiles",
    "moments",
    "merge_moments",
    "cells",
    "answer",
    "combine_labels",
    "combine_feature_stats",
    "combine_label_stats",
    "combine_quantiles",
    "histogram_quantiles",
    "sums",
    "sums_length",
    "sums_bound",
    "secure_clip",
    "from_sums",
    "Laplace",
    "PrivateStats",
    "private_labels",
    "private_feature_stats",
    "private_quantiles",
]

#: Values a worker converts to float64 or to cell indices at once: bounds its memory on large data sets.
CHUNK: Final = 2**20
#: Relative room a secure feature-stats round leaves above a worker's bound: sums about the range's
#: centre of values clipped to its edge can pass the bound by a few ulps.
SUM_SLACK: Final = 1e-6
#: Integers that float64 holds exactly: a securely summed count must stay below.
EXACT_INTEGERS: Final = 2**53


@dataclass(frozen=True)
class Moments:
    """Count, mean and M2 (sum of squared deviations from the mean) of each column."""

    count: int
    mean: np.ndarray  # float64
    m2: np.ndarray  # float64

    @property
    def variance(self) -> np.ndarray:
        """The population variance, ``np.var``'s default (``ddof=0``)."""
        return self.m2 / self.count


def moments(
    values: np.ndarray, columns: Sequence[int] | None = None, clip: tuple[float, float] | None = None
) -> Moments:
    """Moments of the ``columns`` (default: all) of a 2-d array, each value first clipped to
    ``clip`` (low, high) if given, over chunks of rows merged with :func:`merge_moments`, so
    no full float64 copy is ever made."""
    width = values.shape[1] if columns is None else len(columns)
    rows = max(1, CHUNK // max(1, width))
    parts = []
    for start in range(0, len(values), rows):
        chunk = values[start : start + rows]
        chunk = (chunk if columns is None else chunk[:, columns]).astype(np.float64)
        if clip is not None:
            chunk = np.clip(chunk, *clip)
        mean = chunk.mean(axis=0)
        parts.append(Moments(len(chunk), mean, np.square(chunk - mean).sum(axis=0)))
    return merge_moments(parts)


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Combine moments of disjoint sets exactly (Chan, Golub and LeVeque 1979).

    With ``d = mean_b - mean_a``: ``mean = mean_a + d * n_b / n`` and
    ``M2 = M2_a + M2_b + d**2 * n_a * n_b / n``.

    Raises:
        AggregationError: if there are no parts, a count is not positive, or shapes differ.
    """
    if not parts:
        raise AggregationError("no moments to merge")
    total = parts[0]
    for index, part in enumerate(parts):
        if part.count <= 0:
            raise AggregationError(f"moments {index} have count {part.count}, expected a positive integer")
        if part.mean.shape != total.mean.shape or part.m2.shape != total.mean.shape:
            raise AggregationError(f"moments {index} have shape {part.mean.shape}, moments 0 have {total.mean.shape}")
    for part in parts[1:]:
        count = total.count + part.count
        delta = part.mean - total.mean
        total = Moments(
            count,
            total.mean + delta * (part.count / count),
            total.m2 + part.m2 + np.square(delta) * (total.count * part.count / count),
        )
    return total


def cells(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The histogram cell of each value: 0 below ``edges``, 1 to ``len(edges) - 1`` for the bins
    (the last includes its right edge, as in ``np.histogram``), ``len(edges)`` above."""
    index = np.searchsorted(edges, values, side="right")
    index[values == edges[-1]] = len(edges) - 1
    return index


def _refusal(query: Query, group: str, min_group_size: int) -> Error:
    return Error(
        "refused",
        f"{query.query} would describe a group of fewer than {min_group_size} examples ({group});"
        f" this worker's minimum group size is {min_group_size}",
    )


def _small(counts: np.ndarray, min_group_size: int) -> np.ndarray:
    """Which entries describe a non-empty group below the minimum."""
    return (counts > 0) & (counts < min_group_size)


def _histograms(
    values: np.ndarray, features: Sequence[int], edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell counts of each selected feature; of every value of every feature; and, per cell,
    the distinct examples with a value in it."""
    size = len(edges) + 1
    selected = np.zeros(len(features) * size, dtype=np.int64)
    pooled = np.zeros(size, dtype=np.int64)
    examples = np.zeros(size, dtype=np.int64)
    offsets = np.arange(len(features)) * size
    rows = max(1, CHUNK // max(values.shape[1], size))
    for start in range(0, len(values), rows):
        chunk = cells(values[start : start + rows], edges)
        selected += np.bincount((chunk[:, features] + offsets).ravel(), minlength=len(selected))
        pooled += np.bincount(chunk.ravel(), minlength=size)
        present = np.zeros((len(chunk), size), dtype=bool)
        present[np.arange(len(chunk))[:, None], chunk] = True
        examples += present.sum(axis=0)
    return selected.reshape(len(features), size), pooled, examples


def answer(
    query: Query, data: Dataset, min_group_size: int, *, selectable: Collection[int] | None = None
) -> QueryResult | Error:
    """This worker's answer to ``query`` over ``data``, or the error reply that refuses it.

    Answers ``incompatible`` for a feature the data does not have (or a
    label histogram of a continuous label) and ``refused`` for an answer that
    would describe a group smaller than ``min_group_size`` examples, or one
    that selects a feature outside ``selectable`` (a table's numeric columns:
    the mean of a category's one-hot slot times the count is the number of
    examples holding it, however few). The inputs are read a chunk of examples
    at a time, so a folder of images is never held whole; per-chunk moments
    merge exactly (:func:`merge_moments`).
    """
    num_examples, num_features = len(data), math.prod(data.input_shape)
    beyond = [index for index in query.features if index >= num_features]
    if beyond:
        return Error("incompatible", f"feature {beyond[0]} is beyond this worker's {num_features} features")
    if selectable is not None:
        slot = next((index for index in query.features if index not in selectable), None)
        if slot is not None:
            return Error(
                "refused",
                f"{query.query} of feature {slot} would count the examples of a category (a one-hot slot),"
                f" which may be fewer than {min_group_size}; this worker's minimum group size is {min_group_size}",
            )
    if num_examples < min_group_size:
        return Error(
            "refused",
            f"this worker holds {num_examples} examples, fewer than its minimum group size of {min_group_size}",
        )
    features = list(query.features)
    tensors: dict[str, np.ndarray]
    if query.query == "label-histogram":
        if data.labels.dtype.kind == "f":
            return Error("incompatible", "this worker's label is continuous: it has no classes to count")
        labels = np.bincount(data.labels, minlength=data.num_classes).astype(np.int64)
        if _small(labels, min_group_size).any():
            return _refusal(query, "a label", min_group_size)
        tensors = {"labels": labels}
    elif query.query == "label-stats":
        if data.labels.dtype.kind != "f":
            return Error("incompatible", "this worker's label is a class: it has no continuous moments")
        target = moments(np.asarray(data.labels).reshape(-1, 1), None, query.value_range)
        tensors = {"mean": target.mean, "m2": target.m2}
    elif query.query == "feature-stats":
        clip = query.value_range  # set when the coordinator adds differential privacy
        totals: tuple[Moments, Moments] | None = None
        for values in _rows(data, max(1, CHUNK // max(1, num_features))):
            part = moments(values, features, clip), moments(values.reshape(-1, 1), None, clip)
            totals = (
                part if totals is None else (merge_moments([totals[0], part[0]]), merge_moments([totals[1], part[1]]))
            )
        assert totals is not None, "at least min_group_size examples, so at least one chunk"
        selected, pooled = totals
        tensors = {"mean": selected.mean, "m2": selected.m2, "pooled": np.array([pooled.mean[0], pooled.m2[0]])}
    else:
        size = len(query.edges) + 1
        histogram = np.zeros((len(features), size), dtype=np.int64)
        pooled_cells = np.zeros(size, dtype=np.int64)
        examples = np.zeros(size, dtype=np.int64)
        for values in _rows(data, max(1, CHUNK // max(num_features, size))):
            counted = _histograms(values, features, query.edges)
            for total, cell_counts in zip((histogram, pooled_cells, examples), counted, strict=True):
                total += cell_counts
        small = _small(histogram, min_group_size).any(axis=1)
        if small.any():
            return _refusal(query, f"a cell of feature {features[int(np.argmax(small))]}", min_group_size)
        if _small(examples, min_group_size).any():
            return _refusal(query, "a cell of the histogram over all features", min_group_size)
        tensors = {"histogram": histogram, "pooled": pooled_cells}
    return QueryResult(query.query, num_examples, num_features, tensors)


def _rows(data: Dataset, size: int) -> Iterator[np.ndarray]:
    """The examples' inputs flattened to rows of features, ``size`` examples at a time."""
    for inputs, _ in data.chunks(size):
        yield inputs.reshape(len(inputs), -1)


def _validate(query: Query, results: Mapping[str, QueryResult]) -> None:
    """Answers combine only when they answer ``query`` and agree in shape."""
    if not results:
        raise AggregationError("no answers to combine")
    first_name, first = next(iter(results.items()))
    for name, result in results.items():
        if result.query != query.query:
            raise AggregationError(f"worker {name} answered {result.query}, not {query.query}")
        if result.num_features != first.num_features:
            raise AggregationError(
                f"worker {name} has {result.num_features} features, worker {first_name} has {first.num_features}"
            )
        for tensor, array in result.tensors.items():
            if array.shape != first.tensors[tensor].shape:
                raise AggregationError(
                    f"worker {name} answered {tensor} of shape {array.shape},"
                    f" worker {first_name} of shape {first.tensors[tensor].shape}"
                )
    selected = len(query.features)
    if query.query == "feature-stats" and first.tensors["mean"].shape != (selected,):
        raise AggregationError(
            f"the answers hold {len(first.tensors['mean'])} features, the query asked for {selected}"
        )
    if query.query == "quantiles" and first.tensors["histogram"].shape != (selected, len(query.edges) + 1):
        raise AggregationError(
            f"the answers hold histograms of shape {first.tensors['histogram'].shape},"
            f" the query asked for {(selected, len(query.edges) + 1)}"
        )


def combine_labels(query: Query, results: Mapping[str, QueryResult]) -> np.ndarray:
    """Examples per class over all workers.

    Raises:
        AggregationError: if the answers are not label histograms of one length.
    """
    _validate(query, results)
    total: np.ndarray = np.stack([result.tensors["labels"] for result in results.values()]).sum(axis=0)
    return total


@dataclass(frozen=True)
class FeatureStats:
    """Moments of the selected features, and of every value of every feature (``count`` = examples x features)."""

    features: tuple[int, ...]
    selected: Moments
    pooled: Moments


def combine_label_stats(query: Query, results: Mapping[str, QueryResult]) -> Moments:
    """Exact moments of the continuous label over all workers' data (one column).

    Raises:
        AggregationError: if the answers are not label statistics.
    """
    _validate(query, results)
    return merge_moments([Moments(r.num_examples, r.tensors["mean"], r.tensors["m2"]) for r in results.values()])


def combine_feature_stats(query: Query, results: Mapping[str, QueryResult]) -> FeatureStats:
    """Exact moments over all workers' data.

    Raises:
        AggregationError: if the answers do not fit the query or each other.
    """
    _validate(query, results)
    selected = merge_moments([Moments(r.num_examples, r.tensors["mean"], r.tensors["m2"]) for r in results.values()])
    pooled = merge_moments(
        [
            Moments(r.num_examples * r.num_features, r.tensors["pooled"][:1], r.tensors["pooled"][1:])
            for r in results.values()
        ]
    )
    return FeatureStats(query.features, selected, pooled)


@dataclass(frozen=True)
class Quantiles:
    """Estimated quantiles of the selected features and of every value of every feature.

    ``values`` is [features, probabilities] and ``pooled`` [probabilities];
    ``-inf`` or ``inf`` where a quantile falls below or above the range.
    """

    features: tuple[int, ...]
    probabilities: tuple[float, ...]
    edges: np.ndarray
    values: np.ndarray
    pooled: np.ndarray

    @property
    def bin_width(self) -> float:
        """The error bound of every estimate inside the range."""
        return float(self.edges[1] - self.edges[0])


def combine_quantiles(query: Query, results: Mapping[str, QueryResult], probabilities: Sequence[float]) -> Quantiles:
    """Quantiles read off the sum of all workers' histograms.

    Raises:
        AggregationError: if the answers do not fit the query or each other.
    """
    return _quantiles(query, *_sum_histograms(query, results), probabilities)


def _sum_histograms(query: Query, results: Mapping[str, QueryResult]) -> tuple[np.ndarray, np.ndarray]:
    """The selected features' and the pooled histogram, summed over the workers."""
    _validate(query, results)
    histogram = np.stack([r.tensors["histogram"] for r in results.values()]).sum(axis=0)
    pooled = np.stack([r.tensors["pooled"] for r in results.values()]).sum(axis=0)
    return histogram, pooled


def _quantiles(query: Query, histogram: np.ndarray, pooled: np.ndarray, probabilities: Sequence[float]) -> Quantiles:
    edges = query.edges
    return Quantiles(
        query.features,
        tuple(probabilities),
        edges,
        histogram_quantiles(histogram, edges, probabilities),
        histogram_quantiles(pooled[None], edges, probabilities)[0],
    )


def _order_statistic(counts: np.ndarray, cumulative: np.ndarray, rank: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Estimate the ``rank``-th smallest value (0-based) of each row, spread evenly within its bin."""
    rows = np.arange(len(counts))
    cell = (cumulative <= rank[:, None]).sum(axis=1)
    before = np.where(cell > 0, cumulative[rows, np.maximum(cell - 1, 0)], 0)
    bins = len(edges) - 1
    inside = np.clip(cell, 1, bins)
    left, right = edges[inside - 1], edges[inside]
    estimate = left + (rank - before + 0.5) / np.maximum(counts[rows, inside], 1) * (right - left)
    return np.where(cell == 0, -np.inf, np.where(cell > bins, np.inf, estimate))


def histogram_quantiles(counts: np.ndarray, edges: np.ndarray, probabilities: Sequence[float]) -> np.ndarray:
    """Quantiles of each row of ``counts`` ([rows, bins + 2] cells as :func:`cells` numbers them).

    Follows ``np.quantile``'s default (linear) method: quantile ``q`` lies at
    rank ``q * (n - 1)`` between two order statistics, each estimated within
    its bin, so the error is below one bin width when both lie in the range;
    ``-inf`` or ``inf`` when one lies below or above it. ``probabilities``
    must be in [0, 1] and every row must hold at least one value.
    """
    cumulative = np.cumsum(counts, axis=1)
    total = cumulative[:, -1]
    result = np.empty((len(counts), len(probabilities)))
    for column, q in enumerate(probabilities):
        position = q * (total - 1)
        lower = np.floor(position)
        fraction = position - lower
        low = _order_statistic(counts, cumulative, lower, edges)
        high = _order_statistic(counts, cumulative, np.minimum(lower + 1, total - 1), edges)
        with np.errstate(invalid="ignore"):  # inf - inf where both are outside: masked below
            between = low + fraction * (high - low)
        result[:, column] = np.where(
            (fraction == 0) | np.isneginf(low), low, np.where(np.isposinf(high), high, between)
        )
    return result


# Secure aggregation ------------------------------------------------------------


def _centre(query: Query) -> tuple[float, float]:
    """The centre and half width of a moments query's clipping range, about which sums are taken."""
    if query.value_range is None:
        raise ConfigError(f"{query.query} over secure aggregation needs a clipping range: sums need a bound")
    low, high = query.value_range
    return (low + high) / 2, (high - low) / 2


def sums(query: Query, result: QueryResult) -> np.ndarray:
    """A worker's answer as one float64 vector whose sum over workers is the combined answer.

    Layout (``k`` selected features): the example count, then
    ``label-histogram``: the counts per class; ``quantiles``: the ``k``
    histograms, then the one over all features; ``feature-stats``: the ``k``
    sums, the ``k`` sums of squares, then the sum and the sum of squares over
    all features; ``label-stats``: the label's sum and sum of squares; every
    value of the moments taken about the centre of the clipping range.

    Raises:
        ConfigError: if a feature-stats query has no clipping range.
    """
    count = [float(result.num_examples)]
    tensors = result.tensors
    if query.query == "label-histogram":
        return np.concatenate([count, tensors["labels"]]).astype(np.float64)
    if query.query == "quantiles":
        return np.concatenate([count, tensors["histogram"].ravel(), tensors["pooled"]]).astype(np.float64)
    centre, _ = _centre(query)
    if query.query == "label-stats":
        shift = tensors["mean"] - centre
        return np.concatenate([count, result.num_examples * shift, tensors["m2"] + result.num_examples * shift**2])
    values = result.num_examples * result.num_features
    shifted = tensors["mean"] - centre
    pooled_shift = tensors["pooled"][0] - centre
    return np.concatenate(
        [
            count,
            result.num_examples * shifted,
            tensors["m2"] + result.num_examples * np.square(shifted),
            [values * pooled_shift, tensors["pooled"][1] + values * pooled_shift**2],
        ]
    )


def sums_length(query: Query, num_classes: int) -> int:
    """The length of :func:`sums`' vector for ``query`` over data of ``num_classes`` classes."""
    selected = len(query.features)
    if query.query == "label-histogram":
        return 1 + num_classes
    if query.query == "quantiles":
        assert query.bins is not None, "a quantiles query has bins"
        return 1 + (selected + 1) * (query.bins + 2)
    if query.query == "label-stats":
        return 3
    return 1 + 2 * selected + 2


def sums_bound(query: Query, num_examples: int, num_features: int) -> float:
    """The largest magnitude of any entry of :func:`sums` for a worker of ``num_examples`` examples.

    A cell of the histogram over all features holds up to one value of each
    feature of each example; a sum about the centre of the range moves by at
    most the half width ``h`` per value, a sum of squares by ``h**2``.

    Raises:
        ConfigError: if a feature-stats query has no clipping range.
    """
    if query.query == "label-histogram":
        return float(num_examples)
    values = float(num_examples) * (1 if query.query == "label-stats" else num_features)
    if query.query == "quantiles":
        return values
    _, half = _centre(query)
    return max(float(num_examples), values * half, values * half**2)


def secure_clip(query: Query, num_examples: int, num_features: int, num_clients: int) -> float:
    """The clip of a 64-bit secure round summing ``query``'s answers over ``num_clients`` workers.

    ``num_examples`` is the largest worker's size. Counts are whole numbers,
    so their round uses a scale of 1 (the clip is the ring's limit) and sums
    them exactly; the moments use the largest power-of-two scale their bound
    allows, so :attr:`~syncfed.masking.Quantizer.error_bound` is the error of
    each sum.

    Raises:
        ConfigError: if the answers could exceed the ring: more values than
            it can count exactly, or moments too large for it.
    """
    limit = Quantizer(num_clients, 1.0, bits=64, max_count=1).limit
    counts = query.query not in ("feature-stats", "label-stats")
    # A count is at least 1; sums of values clipped to an edge may pass the bound by a few ulps.
    bound = max(sums_bound(query, num_examples, num_features), 1.0) * (1.0 if counts else 1.0 + SUM_SLACK)
    if bound > limit or (counts and bound * num_clients > EXACT_INTEGERS):
        raise ConfigError(
            f"answers of up to {bound:.4g} from each of {num_clients} workers exceed what secure aggregation"
            f" sums exactly (at most {limit} from each, {EXACT_INTEGERS} in all)"
        )
    if counts:
        return float(limit)
    return limit / 2.0 ** math.floor(math.log2(limit / bound))


def from_sums(query: Query, total: np.ndarray, num_features: int) -> QueryResult:
    """The combined answer from the sum of the workers' :func:`sums` vectors, as one worker's answer.

    Counts are rounded to whole numbers (a secure sum of counts is exact);
    moments follow from the sums, the M2 clamped at zero against rounding.

    Raises:
        AggregationError: if the sum does not fit ``query`` (its length, or counts that do not add up).
        ConfigError: if a feature-stats query has no clipping range.
    """
    selected = len(query.features)
    if total.ndim != 1 or total.size < 2:
        raise AggregationError(f"a sum of {total.size} values cannot answer {query.query}")
    count = int(np.rint(total[0]))
    if count < 1:
        raise AggregationError(f"the answers cover {count} examples")
    try:
        if query.query == "label-histogram":
            tensors = {"labels": np.rint(total[1:]).astype(np.int64)}
        elif query.query == "quantiles":
            assert query.bins is not None, "a quantiles query has bins"
            cells = np.rint(total[1:]).astype(np.int64)
            if cells.size != (selected + 1) * (query.bins + 2):
                raise AggregationError(f"a sum of {total.size} values does not hold {selected + 1} histograms")
            histogram = cells.reshape(selected + 1, query.bins + 2)
            tensors = {"histogram": histogram[:-1], "pooled": histogram[-1]}
        elif query.query == "label-stats":
            if total.size != 3:
                raise AggregationError(f"a sum of {total.size} values does not hold a label's moments")
            centre, _ = _centre(query)
            tensors = {
                "mean": np.array([centre + total[1] / count]),
                "m2": np.array([max(total[2] - total[1] ** 2 / count, 0.0)]),
            }
        else:
            if total.size != 3 + 2 * selected:
                raise AggregationError(f"a sum of {total.size} values does not hold the moments of {selected} features")
            centre, _ = _centre(query)
            firsts, seconds = total[1 : 1 + selected], total[1 + selected : 1 + 2 * selected]
            values = count * num_features
            pooled_first, pooled_second = total[-2], total[-1]
            tensors = {
                "mean": centre + firsts / count,
                "m2": np.maximum(seconds - np.square(firsts) / count, 0.0),
                "pooled": np.array(
                    [centre + pooled_first / values, max(pooled_second - pooled_first**2 / values, 0.0)]
                ),
            }
        return QueryResult(query.query, count, num_features, tensors)
    except ProtocolError as exc:
        raise AggregationError(f"the secure sum is not a {query.query} answer: {exc}") from None


# Differential privacy ----------------------------------------------------------


@dataclass(frozen=True)
class Laplace:
    """The Laplace mechanism: adds noise of scale ``sensitivity / epsilon`` to every entry.

    Releasing a vector whose L1 distance between neighbouring data sets is at
    most ``sensitivity`` this way is ``epsilon``-DP (Dwork et al. 2006).

    Raises:
        ConfigError: if ``epsilon`` or ``sensitivity`` is not a positive finite number.
    """

    epsilon: float
    sensitivity: float

    def __post_init__(self) -> None:
        _check_positive(self.epsilon, "epsilon")
        _check_positive(self.sensitivity, "sensitivity")

    @property
    def scale(self) -> float:
        """The noise's scale ``b``: its standard deviation is ``b * sqrt(2)``."""
        return self.sensitivity / self.epsilon

    def release(self, exact: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``exact`` in float64 plus independent noise on every entry."""
        noisy: np.ndarray = exact.astype(np.float64) + rng.laplace(0.0, self.scale, exact.shape)
        return noisy


def private_labels(
    query: Query, results: Mapping[str, QueryResult], epsilon: float, rng: np.random.Generator
) -> tuple[np.ndarray, Laplace]:
    """Noisy examples per class over all workers, ``epsilon``-DP, and the mechanism used.

    One example added or removed changes one count by 1: sensitivity 1.

    Raises:
        AggregationError: if the answers are not label histograms of one length.
        ConfigError: if ``epsilon`` is not a positive finite number.
    """
    mechanism = Laplace(epsilon, 1.0)
    return mechanism.release(combine_labels(query, results), rng), mechanism


@dataclass(frozen=True)
class PrivateStats:
    """Noisy count, mean and variance of the selected features, then of every value of every feature.

    ``count``, ``mean`` and ``variance`` have one entry per selected feature
    and a last one over all features (``count`` = examples x features there).
    ``mechanisms`` add the noise to the count, the sums and the sums of squares.
    """

    features: tuple[int, ...]
    count: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    mechanisms: tuple[Laplace, Laplace, Laplace]


def private_feature_stats(
    query: Query, results: Mapping[str, QueryResult], epsilon: float, rng: np.random.Generator
) -> PrivateStats:
    """Count, mean and variance from a noisy count, noisy sums and noisy sums of squares, ``epsilon``-DP.

    The workers clipped every value to the query's range ``[low, high]``; sums
    are taken about its centre ``c``, so one value moves a sum by at most
    ``h = (high - low) / 2`` and a sum of squares by ``h**2``. One example
    changes the count of examples by 1, and with ``k`` selected features of
    ``F`` in all, the ``k + 1`` sums by ``(k + F) * h`` together (it gives
    ``F`` values to the row over all features) and the sums of squares by
    ``(k + F) * h**2``. Each of the three gets a third of ``epsilon``. The mean
    and variance follow by post-processing, which costs no privacy: the count
    is at least 1, the mean is clamped into the range and the variance into
    ``[0, h**2]``.

    Raises:
        AggregationError: if the answers do not fit the query or each other.
        ConfigError: if the query has no clipping range or ``epsilon`` is not a positive finite number.
    """
    _check_positive(epsilon, "epsilon")
    if query.value_range is None:
        raise ConfigError("feature-stats query has no clipping range: differential privacy needs bounded values")
    stats = combine_feature_stats(query, results)
    low, high = query.value_range
    centre, half = (low + high) / 2, (high - low) / 2
    num_features = next(iter(results.values())).num_features
    rows = len(query.features) + num_features
    mechanisms = (Laplace(epsilon / 3, 1.0), Laplace(epsilon / 3, rows * half), Laplace(epsilon / 3, rows * half**2))
    per_value = np.concatenate([np.full(len(query.features), 1.0), [float(num_features)]])
    counts = np.concatenate([np.full(len(query.features), stats.selected.count), [stats.pooled.count]])
    means = np.concatenate([stats.selected.mean, stats.pooled.mean]) - centre
    sums = counts * means
    squares = np.concatenate([stats.selected.m2, stats.pooled.m2]) + counts * np.square(means)
    examples = max(float(mechanisms[0].release(np.array([stats.selected.count]), rng)[0]), 1.0)
    noisy_sums, noisy_squares = mechanisms[1].release(sums, rng), mechanisms[2].release(squares, rng)
    noisy_counts = examples * per_value
    mean = np.clip(noisy_sums / noisy_counts, -half, half)
    variance = np.clip(noisy_squares / noisy_counts - np.square(mean), 0.0, half**2)
    return PrivateStats(query.features, noisy_counts, mean + centre, variance, mechanisms)


def private_quantiles(
    query: Query,
    results: Mapping[str, QueryResult],
    probabilities: Sequence[float],
    epsilon: float,
    rng: np.random.Generator,
) -> tuple[Quantiles, Laplace]:
    """Quantiles read off noisy histograms, ``epsilon``-DP, and the mechanism used.

    One example puts one value in one cell of each of the ``k`` selected
    features' histograms and ``F`` values (one per feature) in the histogram
    over all features: the L1 sensitivity of all cells together is ``k + F``.
    No clipping is needed, since values outside the range fall in the two
    outer cells. Noisy counts are clamped at zero before quantiles are read
    (post-processing); the one-bin-width bound then holds only up to the noise.

    Raises:
        AggregationError: if the answers do not fit the query or each other.
        ConfigError: if ``epsilon`` is not a positive finite number.
    """
    _check_positive(epsilon, "epsilon")
    histogram, pooled = _sum_histograms(query, results)
    mechanism = Laplace(epsilon, float(len(query.features) + next(iter(results.values())).num_features))
    noisy_histogram = np.maximum(mechanism.release(histogram, rng), 0.0)
    noisy_pooled = np.maximum(mechanism.release(pooled, rng), 0.0)
    return _quantiles(query, noisy_histogram, noisy_pooled, probabilities), mechanism
