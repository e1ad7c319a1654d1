"""Federated analytics over secure aggregation: the answers as sums in the ring, which add up to
the pooled answer, the clip that keeps them exact, and the mask request that carries a query."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from analytics_kit import answered, clipping_query, dataset, pooled_data, split
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.analytics import from_sums, secure_clip, sums, sums_bound, sums_length
from syncfed.exceptions import AggregationError, ConfigError, ProtocolError
from syncfed.protocol import Query, QueryResult, SecAggMask, decode, encode
from syncfed.secagg import CIPHERTEXT_SIZE, ForwardedShares, Quantizer


def pooled_cells(pooled: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    """Per feature: values below the range, numpy's histogram of the range, values above; in numpy alone."""
    rows = []
    for column in pooled.astype(np.float64).T:
        inside = np.histogram(column[(column >= low) & (column <= high)], bins=bins, range=(low, high))[0]
        rows.append([(column < low).sum(), *inside, (column > high).sum()])
    return np.array(rows)


def through_the_ring(query: Query, results: dict[str, QueryResult], num_classes: int) -> tuple[QueryResult, float]:
    """The combined answer as a secure round yields it: each worker's sums quantized at the round's clip,
    added in the ring (masks cancel in the sum, see test_secagg.py), decoded; and the error bound of a sum."""
    n = len(results)
    first = next(iter(results.values()))
    clip = secure_clip(query, max(r.num_examples for r in results.values()), first.num_features, n)
    quantizer = Quantizer(n, clip, bits=64, max_count=1)
    rings = [quantizer.encode(sums(query, result), 1) for result in results.values()]
    assert all(ring.size == sums_length(query, num_classes) + 1 for ring in rings)
    total = np.sum(rings, axis=0, dtype=np.int64)  # int64 addition wraps around like the ring
    decoded, count = quantizer.decode(total)
    assert count == n
    return from_sums(query, decoded, first.num_features), quantizer.error_bound


@settings(max_examples=60, deadline=None)
@given(
    pooled_data(),
    st.sampled_from(["label-histogram", "quantiles", "feature-stats"]),
    st.sampled_from([(-1.0, 1.0), (0.0, 3.0), (-300.5, -299.0), (-1e4, 2e4)]),
    st.integers(1, 16),
)
def test_summed_answers_through_the_secure_ring_are_the_pooled_answer(
    case: tuple[np.ndarray, list[int]], kind: str, value_range: tuple[float, float], bins: int
) -> None:
    pooled, cuts = case
    labels = np.arange(len(pooled)) % 4
    features = tuple(range(pooled.shape[1]))
    query = {
        "label-histogram": Query("label-histogram"),
        "quantiles": Query("quantiles", features, bins, value_range),
        "feature-stats": clipping_query(features, value_range),
    }[kind]
    parts = split(pooled, cuts)
    bounds = np.cumsum([0, *(len(part) for part in parts)])
    shards = [dataset(part, labels[a:b], num_classes=4) for part, a, b in zip(parts, bounds, bounds[1:], strict=False)]
    combined, error = through_the_ring(query, answered(query, shards), num_classes=4)

    assert combined.num_examples == len(pooled)
    if kind == "label-histogram":
        np.testing.assert_array_equal(combined.tensors["labels"], np.bincount(labels, minlength=4))
        return
    if kind == "quantiles":
        histogram = pooled_cells(pooled, *value_range, bins)
        np.testing.assert_array_equal(combined.tensors["histogram"], histogram)
        np.testing.assert_array_equal(
            combined.tensors["pooled"], pooled_cells(pooled.reshape(-1, 1), *value_range, bins)[0]
        )
        return
    reference = np.clip(pooled.astype(np.float64), *value_range)
    half = (value_range[1] - value_range[0]) / 2
    # A mean moves by the sum's error over the count; a variance by about (1 + 2h) times that.
    for count, mean, m2, column in (
        (len(pooled), combined.tensors["mean"], combined.tensors["m2"], reference),
        (pooled.size, combined.tensors["pooled"][:1], combined.tensors["pooled"][1:], reference.reshape(-1, 1)),
    ):
        slack = 1e-9 * (abs(value_range[0]) + abs(value_range[1]))
        np.testing.assert_allclose(mean, column.mean(axis=0), rtol=0, atol=error / count + slack)
        tolerance = 2 * error * (1 + 2 * half) / count + 1e-12 * (abs(value_range[0]) + abs(value_range[1])) ** 2
        np.testing.assert_allclose(m2 / count, column.var(axis=0), rtol=1e-7, atol=tolerance)


def test_the_sums_are_counts_then_moments_about_the_range_centre() -> None:
    values = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 9.0]])
    query = clipping_query((1,), (0.0, 4.0))  # centre 2, half width 2: 9 is clipped to 4
    (result,) = answered(query, [dataset(values)]).values()
    shifted = np.clip(values, 0.0, 4.0) - 2.0
    expected = [3, shifted[:, 1].sum(), (shifted[:, 1] ** 2).sum(), shifted.sum(), (shifted**2).sum()]
    np.testing.assert_allclose(sums(query, result), expected, rtol=1e-12)
    assert sums_length(query, num_classes=10) == len(expected)
    assert np.abs(sums(query, result)).max() <= sums_bound(query, 3, 2)


def test_the_secure_clip_counts_exactly_and_scales_moments_by_a_power_of_two() -> None:
    for query in (Query("label-histogram"), Query("quantiles", (0, 5), 16, (0.0, 1.0))):
        clip = secure_clip(query, num_examples=60_000, num_features=784, num_clients=10)
        quantizer = Quantizer(10, clip, bits=64, max_count=1)
        assert quantizer.scale == 1.0  # a count is its own code
        assert clip >= sums_bound(query, 60_000, 784)
    query = clipping_query((0,), (-0.43, 2.83))
    clip = secure_clip(query, num_examples=60_000, num_features=784, num_clients=10)
    scale = Quantizer(10, clip, bits=64, max_count=1).scale
    assert scale == 2.0 ** round(math.log2(scale)) and scale >= 1
    assert sums_bound(query, 60_000, 784) <= clip < 2 * sums_bound(query, 60_000, 784)
    message = r"^answers of up to {} from each of {} workers exceed what secure aggregation sums exactly \(at most"
    with pytest.raises(ConfigError, match=message.format(r"1e\+15", 3)):
        secure_clip(Query("quantiles", (), 4, (0.0, 1.0)), num_examples=10**12, num_features=1000, num_clients=3)
    # Each count fits the ring, but 2,000 of them would pass what float64 holds exactly.
    with pytest.raises(ConfigError, match=message.format(r"6e\+12", 2000)):
        secure_clip(Query("quantiles", (), 4, (0.0, 1.0)), num_examples=6 * 10**9, num_features=1000, num_clients=2000)
    # Values clipped to the range's edge give sums a few ulps above the bound: the clip leaves room.
    edge = clipping_query((0,), (-4.83, -3.83))
    values = np.full((16, 4), -3.83)
    (result,) = answered(edge, [dataset(values)]).values()
    assert np.abs(sums(edge, result)).max() <= secure_clip(edge, 16, 4, num_clients=2)
    assert secure_clip(edge, 16, 4, num_clients=2) == 64.0  # the bound, 32, is a power of two
    with pytest.raises(ConfigError, match="^feature-stats over secure aggregation needs a clipping range"):
        sums_bound(Query("feature-stats", (0,)), 10, 1)


def test_a_sum_that_does_not_fit_the_query_is_refused() -> None:
    quantiles = Query("quantiles", (0,), 4, (0.0, 1.0))
    with pytest.raises(AggregationError, match="^a sum of 7 values does not hold 2 histograms$"):
        from_sums(quantiles, np.full(7, 1.0), num_features=1)
    with pytest.raises(AggregationError, match="^the answers cover 0 examples$"):
        from_sums(Query("label-histogram"), np.zeros(3), num_features=1)
    with pytest.raises(
        AggregationError, match="^the secure sum is not a label-histogram answer: labels counts must sum to 5"
    ):
        from_sums(Query("label-histogram"), np.array([5.0, 1.0, 1.0]), num_features=1)
    with pytest.raises(AggregationError, match="^a sum of 4 values does not hold the moments of 2 features$"):
        from_sums(clipping_query((0, 1), (0.0, 1.0)), np.ones(4), num_features=2)


def test_a_secure_mask_request_carries_a_fit_or_an_unweighted_query() -> None:
    query = Query("quantiles", (0, 3), 8, (-1.0, 1.0))
    shares = ForwardedShares({1: b"\x01" * CIPHERTEXT_SIZE})
    message = SecAggMask(b"s" * 32, shares, query, weighted=False)
    received = decode(encode(4, message)).message
    assert isinstance(received, SecAggMask) and received == message and received.task == query
    body = message.to_body()
    assert body["query"] == query.to_body() and "fit" not in body
    with pytest.raises(ProtocolError, match="^a query's answers are summed unweighted$"):
        SecAggMask(b"s" * 32, shares, query)
    neither = {key: value for key, value in body.items() if key != "query"}
    both = body | {"fit": {"model": "m", "weights": {}, "plan": {}}}
    for broken, found in ((neither, "[]"), (both, "['fit', 'query']")):
        with pytest.raises(ProtocolError, match=re.escape(f"must carry one task, a fit or a query, not {found}")):
            SecAggMask.from_body(broken)
    with pytest.raises(ProtocolError, match="^query must be a map$"):
        SecAggMask.from_body(body | {"query": [1, 2]})
    with pytest.raises(ProtocolError, match="^a query's answers are summed unweighted$"):
        SecAggMask.from_body(body | {"weighted": True})
