"""Federated analytics: combined answers against numpy over the pooled data, the minimum
group size, the two messages on the wire, and one command-line run over real workers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import REPO, THREADS, running_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from units import MS

from syncfed.analytics import (
    Laplace,
    Moments,
    answer,
    cells,
    combine_feature_stats,
    combine_labels,
    combine_quantiles,
    from_sums,
    merge_moments,
    moments,
    private_feature_stats,
    private_labels,
    private_quantiles,
    secure_clip,
    sums,
    sums_bound,
    sums_length,
)
from syncfed.cli import analytics as analytics_cli
from syncfed.cli import worker as server_cli
from syncfed.config import WorkerConfig
from syncfed.datasets import Dataset
from syncfed.exceptions import AggregationError, ConfigError, ProtocolError, SecAggError
from syncfed.net.link import WorkerLink
from syncfed.net.secure_round import SecureRound
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    ERROR_CODES,
    MAX_BINS,
    MAX_CELLS,
    PROTOCOL_VERSION,
    REQUESTS,
    Error,
    Hello,
    Query,
    QueryResult,
    SecAggMask,
    decode,
    encode,
)
from syncfed.secagg import CIPHERTEXT_SIZE, ForwardedShares, Quantizer, SecAggConfig, SecAggResult
from syncfed.worker import load_shard

CLI_TIMEOUT = 120_000 * MS  # one command-line run on a busy machine
DIGITS_TRAIN = 1437  # 80% of scikit-learn's 1,797 digits


def dataset(values: np.ndarray, labels: np.ndarray | None = None, num_classes: int = 10) -> Dataset:
    """A data set whose flattened features are the columns of ``values`` ([examples, features])."""
    images = np.asarray(values, dtype=np.float32).reshape(len(values), 1, 1, -1)
    if labels is None:
        labels = np.zeros(len(values), dtype=np.int64)
    return Dataset("test", images, np.asarray(labels, dtype=np.int64), num_classes)


def answered(query: Query, shards: Sequence[Dataset], min_group_size: int = 1) -> dict[str, QueryResult]:
    """Each shard's answer, sent through the codec as a worker's reply would be."""
    results = {}
    for index, shard in enumerate(shards):
        reply = answer(query, shard, min_group_size)
        assert isinstance(reply, QueryResult), reply
        results[f"w{index}"] = decode(encode(index + 1, reply)).message  # type: ignore[assignment]
    return results  # type: ignore[return-value]


def split(pooled: np.ndarray, cuts: Sequence[int]) -> list[np.ndarray]:
    """``pooled`` cut into consecutive non-empty parts at the given row positions."""
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(pooled)}), len(pooled)]
    return [pooled[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def pooled_data(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    """Examples x features in float32, hard for naive sums of squares, and where to cut them."""
    rows = draw(st.integers(1, 60))
    features = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 1.0, -300.0, 1e4]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    values = offset + scale * rng.standard_normal((rows, features))
    if draw(st.booleans()):  # few distinct values: ties, constant columns
        values = np.round(values / scale) * scale
    cuts = draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=5))
    return values.astype(np.float32), cuts


# Feature statistics ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pooled_data())
def test_feature_stats_equal_numpy_over_the_pooled_data(case: tuple[np.ndarray, list[int]]) -> None:
    pooled, cuts = case
    features = tuple(range(pooled.shape[1]))
    query = Query("feature-stats", features)
    stats = combine_feature_stats(query, answered(query, [dataset(part) for part in split(pooled, cuts)]))

    reference = pooled.astype(np.float64)
    size = float(np.abs(reference).max()) + 1.0
    assert stats.features == features
    assert stats.selected.count == len(pooled)
    np.testing.assert_allclose(stats.selected.mean, np.mean(reference, axis=0), rtol=1e-9, atol=1e-12 * size)
    np.testing.assert_allclose(stats.selected.variance, np.var(reference, axis=0), rtol=1e-9, atol=1e-24 * size**2)
    assert stats.pooled.count == pooled.size
    np.testing.assert_allclose(stats.pooled.mean, [np.mean(reference)], rtol=1e-9, atol=1e-12 * size)
    np.testing.assert_allclose(stats.pooled.variance, [np.var(reference)], rtol=1e-9, atol=1e-24 * size**2)


def test_moments_read_in_chunks_equal_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    import syncfed.analytics as analytics

    monkeypatch.setattr(analytics, "CHUNK", 7)  # many chunks of one to three rows
    values = np.random.default_rng(3).normal(1e3, 1e-2, size=(50, 3))
    result = moments(values)
    assert result.count == 50
    np.testing.assert_allclose(result.mean, values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.variance, values.var(axis=0), rtol=1e-9)


def test_merge_moments_is_chan_s_formula_on_a_small_case() -> None:
    # {1, 2} and {4, 6, 8}: pooled mean 4.2, pooled M2 = sum((x - 4.2)^2) = 32.8.
    merged = merge_moments([Moments(2, np.array([1.5]), np.array([0.5])), Moments(3, np.array([6.0]), np.array([8.0]))])
    assert merged.count == 5
    assert merged.mean == pytest.approx([4.2])
    assert merged.m2 == pytest.approx([32.8])


def test_merge_moments_rejects_what_cannot_combine() -> None:
    with pytest.raises(AggregationError, match="^no moments to merge$"):
        merge_moments([])
    one, two = Moments(1, np.zeros(1), np.zeros(1)), Moments(1, np.zeros(2), np.zeros(2))
    with pytest.raises(AggregationError, match=r"^moments 1 have shape \(2,\), moments 0 have \(1,\)$"):
        merge_moments([one, two])
    with pytest.raises(AggregationError, match="^moments 1 have count 0, expected a positive integer$"):
        merge_moments([one, Moments(0, np.zeros(1), np.zeros(1))])


# Label histogram -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=80), st.lists(st.integers(1, 79), max_size=4))
def test_label_histogram_equals_bincount_of_the_pooled_labels(labels: list[int], cuts: list[int]) -> None:
    pooled = np.array(labels)
    shards = [dataset(np.zeros((len(part), 1)), part, num_classes=5) for part in split(pooled, cuts)]
    query = Query("label-histogram")
    total = combine_labels(query, answered(query, shards))
    np.testing.assert_array_equal(total, np.bincount(pooled, minlength=5))


# Quantiles -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=pooled_data(),
    bins=st.integers(1, 64),
    probabilities=st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_quantiles_are_within_one_bin_width_of_numpy(
    data: tuple[np.ndarray, list[int]], bins: int, probabilities: list[float]
) -> None:
    pooled, cuts = data
    low, high = float(pooled.min()), float(pooled.max())
    if high - low < 1e-3 * (abs(low) + 1):  # a constant column needs a range around it
        low, high = low - 1.0, high + 1.0
    features = tuple(range(pooled.shape[1]))
    query = Query("quantiles", features, bins, (low, high))
    probabilities = [*probabilities, 0.0, 1.0]
    estimate = combine_quantiles(query, answered(query, [dataset(p) for p in split(pooled, cuts)]), probabilities)

    reference = pooled.astype(np.float64)
    width = (high - low) / bins
    tolerance = width * (1 + 1e-9)
    assert estimate.bin_width == pytest.approx(width)
    per_feature = np.quantile(reference, probabilities, axis=0).T  # [features, probabilities]
    assert np.abs(estimate.values - per_feature).max() <= tolerance
    assert np.abs(estimate.pooled - np.quantile(reference, probabilities)).max() <= tolerance


def test_cells_agree_with_numpy_histogram_and_count_outside_the_range() -> None:
    edges = np.linspace(-1.0, 2.0, 7)
    inside = np.concatenate([np.random.default_rng(0).uniform(-1, 2, 500), edges])  # every edge, 2.0 included
    counts = np.bincount(cells(inside, edges), minlength=8)
    assert counts[0] == counts[-1] == 0
    np.testing.assert_array_equal(counts[1:-1], np.histogram(inside, bins=6, range=(-1.0, 2.0))[0])
    np.testing.assert_array_equal(cells(np.array([-1.0001, -1.0, 2.0, 2.0001]), edges), [0, 1, 6, 7])


def test_quantiles_outside_the_range_are_infinite() -> None:
    values = np.arange(20, dtype=np.float64)[:, None]  # 0..19
    query = Query("quantiles", (0,), 5, (5.0, 15.0))  # 5 values below, 4 above
    estimate = combine_quantiles(query, answered(query, [dataset(values)]), [0.0, 0.2, 0.5, 0.95, 1.0])
    assert estimate.values[0, 0] == -math.inf
    assert estimate.values[0, 4] == math.inf
    assert estimate.values[0, 3] == math.inf  # rank 18.05 lies between 18 and 19, both above
    assert abs(estimate.values[0, 2] - 9.5) <= 2.0  # the median, np.quantile's 9.5, within one bin
    assert estimate.values[0, 1] == -math.inf  # rank 3.8 lies between 3 and 4, both below


# Combining validates first -----------------------------------------------------


def test_combining_rejects_answers_that_do_not_fit() -> None:
    query = Query("feature-stats", (0, 1))
    two = answered(query, [dataset(np.ones((3, 2)))])["w0"]
    three = answered(Query("feature-stats", (0, 1)), [dataset(np.ones((3, 3)))])["w0"]
    with pytest.raises(AggregationError, match="^no answers to combine$"):
        combine_feature_stats(query, {})
    with pytest.raises(AggregationError, match="^worker b has 3 features, worker a has 2$"):
        combine_feature_stats(query, {"a": two, "b": three})
    with pytest.raises(AggregationError, match="^worker a answered feature-stats, not label-histogram$"):
        combine_labels(Query("label-histogram"), {"a": two})
    with pytest.raises(AggregationError, match=r"^the answers hold 2 features, the query asked for 1$"):
        combine_feature_stats(Query("feature-stats", (0,)), {"a": two})
    ten = answered(Query("label-histogram"), [dataset(np.ones((3, 1)))])["w0"]
    five = answered(Query("label-histogram"), [dataset(np.ones((3, 1)), num_classes=5)])["w0"]
    with pytest.raises(
        AggregationError, match=r"^worker b answered labels of shape \(5,\), worker a of shape \(10,\)$"
    ):
        combine_labels(Query("label-histogram"), {"a": ten, "b": five})


# The minimum group size ------------------------------------------------------


def refusal(query: Query, data: Dataset, min_group_size: int) -> str:
    reply = answer(query, data, min_group_size)
    assert isinstance(reply, Error) and reply.code == "refused", reply
    return reply.reason


def test_a_worker_smaller_than_the_minimum_refuses_every_query() -> None:
    data = dataset(np.ones((9, 2)))
    for query in (Query("label-histogram"), Query("feature-stats", (0,)), Query("quantiles", (), 4, (0.0, 2.0))):
        assert refusal(query, data, 10) == "this worker holds 9 examples, fewer than its minimum group size of 10"
        assert isinstance(answer(query, data, 9), QueryResult)  # at the limit


def test_a_small_label_is_refused_at_one_below_the_limit() -> None:
    values = np.zeros((30, 1))
    assert isinstance(answer(Query("label-histogram"), dataset(values, [0] * 20 + [3] * 10), 10), QueryResult)
    assert refusal(Query("label-histogram"), dataset(values, [0] * 21 + [3] * 9), 10) == (
        "label-histogram would describe a group of fewer than 10 examples (a label);"
        " this worker's minimum group size is 10"
    )


def test_a_small_cell_of_a_selected_feature_is_refused_and_named_by_feature_only() -> None:
    values = np.zeros((40, 3))
    values[:10, 2] = 1.5  # feature 2: 30 values in one bin, 10 in another
    query = Query("quantiles", (0, 2), 4, (0.0, 2.0))
    assert isinstance(answer(query, dataset(values), 10), QueryResult)
    values[10, 2] = 3.0  # one example above the range: a group of one in the cell above it
    assert refusal(query, dataset(values), 10) == (
        "quantiles would describe a group of fewer than 10 examples (a cell of feature 2);"
        " this worker's minimum group size is 10"
    )
    # The row over all features counts 1 example above the range too: refused without a selection.
    assert "(a cell of the histogram over all features)" in refusal(
        Query("quantiles", (), 4, (0.0, 2.0)), dataset(values), 10
    )


def test_the_histogram_over_all_features_counts_distinct_examples_not_values() -> None:
    values = np.zeros((30, 20))
    values[0, :] = 1.5  # one example gives 20 values in one cell: a group of one
    query = Query("quantiles", (), 4, (0.0, 2.0))
    assert refusal(query, dataset(values), 10) == (
        "quantiles would describe a group of fewer than 10 examples (a cell of the histogram over all features);"
        " this worker's minimum group size is 10"
    )
    values[:10, 0] = 1.5  # ten examples: allowed
    assert isinstance(answer(query, dataset(values), 10), QueryResult)


def test_feature_stats_describe_the_whole_worker_and_a_feature_beyond_it_is_incompatible() -> None:
    values = np.random.default_rng(1).normal(size=(10, 4))
    assert isinstance(answer(Query("feature-stats", (0, 3)), dataset(values), 10), QueryResult)
    reply = answer(Query("feature-stats", (0, 4)), dataset(values), 10)
    assert reply == Error("incompatible", "feature 4 is beyond this worker's 4 features")


def test_the_minimum_group_size_is_a_worker_setting() -> None:
    assert WorkerConfig("alice").min_group_size == 10
    with pytest.raises(ConfigError, match="^min group size must be at least 1, not 0$"):
        WorkerConfig("alice", min_group_size=0)
    args = server_cli.build_parser().parse_args(["--id", "alice", "--min-group-size", "25"])
    assert server_cli.config_from_args(args).min_group_size == 25


# Messages on the wire ----------------------------------------------------------


def envelope(kind: str, body: object) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "id": 9, "kind": kind, "body": body}, use_bin_type=True)


def test_query_is_a_request_answered_by_query_result_and_refused_is_an_error_code() -> None:
    assert REQUESTS["query"] == "query_result"
    assert "refused" in ERROR_CODES


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["label-histogram", "feature-stats", "quantiles"]),
    features=st.lists(st.integers(0, 2**24 - 1), max_size=8, unique=True),
    bins=st.integers(1, MAX_BINS),
    low=st.floats(-1e6, 1e6),
    width=st.floats(1e-2, 1e6),
)
def test_query_round_trip(kind: str, features: list[int], bins: int, low: float, width: float) -> None:
    if kind == "quantiles":
        query = Query(kind, tuple(sorted(features)), bins, (low, low + width))
    else:
        query = Query(kind, () if kind == "label-histogram" else tuple(sorted(features)))
    data = encode(11, query)
    received = decode(data)
    assert received.id == 11 and received.message == query
    assert encode(11, received.message) == data


@settings(max_examples=30, deadline=None)
@given(pooled_data(), st.sampled_from(["label-histogram", "feature-stats", "quantiles"]))
def test_query_result_round_trip(case: tuple[np.ndarray, list[int]], kind: str) -> None:
    values, _ = case
    labels = np.arange(len(values)) % 3
    query = {
        "label-histogram": Query("label-histogram"),
        "feature-stats": Query("feature-stats", (0,)),
        "quantiles": Query("quantiles", (0,), 8, (-1.0, 1.0)),
    }[kind]
    result = answer(query, dataset(values, labels, num_classes=3), 1)
    assert isinstance(result, QueryResult)
    received = decode(encode(4, result)).message
    assert received == result and received is not result


VALID_QUERY = {"query": "quantiles", "features": [0, 3], "bins": 4, "range": [0.0, 1.0]}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"query": "median"},
            "query must be one of label-histogram, feature-stats, quantiles, label-stats, not 'median'",
        ),
        ({"features": [3, 0]}, "features must be sorted and distinct"),
        ({"features": [3, 3]}, "features must be sorted and distinct"),
        ({"features": [-1]}, "features must be a list of at most 16777216 indices in 0..16777215"),
        ({"features": [True]}, "features must be a list of at most 16777216 indices in 0..16777215"),
        ({"bins": 0}, "bins must be an integer from 1 to 4096, not 0"),
        ({"bins": MAX_BINS + 1}, "bins must be an integer from 1 to 4096, not 4097"),
        ({"bins": None}, "bins must be an integer from 1 to 4096, not None"),
        ({"range": [1.0, 0.0]}, "range must be two finite numbers low < high, not [1.0, 0.0]"),
        ({"range": [0.0, math.inf]}, "range must be two finite numbers low < high, not [0.0, inf]"),
        ({"range": [-1e308, 1e308]}, "range must be two finite numbers low < high, not [-1e+308, 1e+308]"),
        ({"range": [1e16, 1e16 + 2]}, "range [1e+16, 1.0000000000000002e+16] is too narrow for 4 distinct bins"),
        ({"range": None}, "range must be two finite numbers low < high, not None"),
        ({"query": "feature-stats"}, "feature-stats takes no bins"),
        (
            {"query": "feature-stats", "bins": None, "range": [1.0, 0.0]},
            "clipping range must be two finite numbers low < high, not [1.0, 0.0]",
        ),
        ({"query": "label-histogram", "features": []}, "label-histogram takes no bins or range"),
        ({"query": "label-histogram", "bins": None, "range": None}, "label-histogram takes no features"),
        (
            {"features": list(range(1025)), "bins": MAX_BINS},
            "1025 features of 4096 bins exceed limit of 4194304 histogram cells",
        ),
        (
            {"extra": 1},
            "query body has fields ['bins', 'extra', 'features', 'query', 'range'],"
            " expected ['bins', 'features', 'query', 'range'] and optionally ['data', 'terms']",
        ),
    ],
)
def test_invalid_queries_cannot_be_decoded(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(envelope("query", {**VALID_QUERY, **changes}))
    assert str(raised.value) == reason
    assert raised.value.code == "malformed" and raised.value.request_id == 9


def test_cells_limit_at_and_one_past() -> None:
    bins = MAX_CELLS // 1024 - 2  # 1024 features of 4094 bins: exactly the limit
    assert len(Query("quantiles", tuple(range(1024)), bins, (0.0, 1.0)).features) == 1024
    with pytest.raises(ProtocolError, match="exceed limit of 4194304 histogram cells"):
        Query("quantiles", tuple(range(1024)), bins + 1, (0.0, 1.0))


def tensor(array: np.ndarray) -> dict[str, object]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


def result_body(
    kind: str, tensors: dict[str, np.ndarray], num_examples: int = 6, num_features: int = 2
) -> dict[str, object]:
    return {
        "query": kind,
        "num_examples": num_examples,
        "num_features": num_features,
        "tensors": {name: tensor(array) for name, array in tensors.items()},
    }


I64, F64 = np.int64, np.float64


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (result_body("label-histogram", {"labels": np.array([2, 4], I64)}), None),
        (result_body("label-histogram", {"labels": np.array([2, 3], I64)}), "labels counts must sum to 6"),
        (result_body("label-histogram", {"labels": np.array([8, -2], I64)}), "labels counts must be from 0 to 6"),
        (result_body("label-histogram", {"labels": np.array([2, 4], np.int32)}), "tensor labels must be int64"),
        (
            result_body("label-histogram", {"counts": np.array([6], I64)}),
            "label-histogram answer has tensors ['counts'], expected ['labels']",
        ),
        (
            result_body("label-histogram", {"labels": np.array([6], I64)}, num_examples=0),
            "num_examples must be an integer from 1 to 4294967296, not 0",
        ),
        (result_body("feature-stats", {"mean": np.zeros(2), "m2": np.ones(2), "pooled": np.ones(2)}), None),
        (
            result_body("feature-stats", {"mean": np.zeros(3), "m2": np.ones(3), "pooled": np.ones(2)}),
            "mean and m2 must have one entry per selected feature, and pooled two",
        ),
        (
            result_body("feature-stats", {"mean": np.zeros(2), "m2": -np.ones(2), "pooled": np.ones(2)}),
            "m2 must not be negative",
        ),
        (
            result_body("feature-stats", {"mean": np.array([0, np.nan]), "m2": np.ones(2), "pooled": np.ones(2)}),
            "feature statistics must be finite",
        ),
        (
            result_body("feature-stats", {"mean": np.zeros(2, np.float32), "m2": np.ones(2), "pooled": np.ones(2)}),
            "tensor mean must be float64",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5, 0]], I64), "pooled": np.array([2, 10, 0], I64)}),
            None,
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5]], I64), "pooled": np.array([2, 10], I64)}),
            "histogram must be [features, bins + 2] with 1 to 4096 bins, and pooled [bins + 2]",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 4, 0]], I64), "pooled": np.array([2, 10, 0], I64)}),
            "histogram counts must sum to 6",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5, 0]], I64), "pooled": np.array([2, 9, 0], I64)}),
            "pooled counts must sum to 12",
        ),
    ],
)
def test_query_results_are_validated(body: dict[str, object], reason: str | None) -> None:
    if reason is None:
        assert decode(envelope("query_result", body)).message.kind == "query_result"
        return
    with pytest.raises(ProtocolError) as raised:
        decode(envelope("query_result", body))
    assert str(raised.value) == reason


def test_counts_that_would_wrap_around_int64_are_rejected() -> None:
    total = 2**56  # the most values one answer may hold: 2**32 examples of 2**24 features
    pooled = np.zeros(MAX_BINS + 2, I64)
    pooled[:257] = total  # each entry within bounds; the true sum 257 * 2**56 wraps around to 2**56 in int64
    assert pooled.sum() == total
    body = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    with pytest.raises(ProtocolError, match=f"^pooled counts must sum to {total}$"):
        decode(envelope("query_result", body))
    pooled[1:257] = 0
    valid = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    assert decode(envelope("query_result", valid)).message.kind == "query_result"
    pooled[0] = total + 1
    over = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    with pytest.raises(ProtocolError, match=f"^pooled counts must be from 0 to {total}$"):
        decode(envelope("query_result", over))


# Differential privacy ----------------------------------------------------------


def clipping_query(features: tuple[int, ...], clip: tuple[float, float]) -> Query:
    """A feature-stats query that asks workers to clip to ``clip``, as ``--dp-epsilon`` sends it."""
    return Query("feature-stats", features, None, clip)


@pytest.mark.parametrize(("epsilon", "sensitivity"), [(0.5, 1.0), (1.0, 1.0), (4.0, 64.0)])
def test_laplace_noise_has_scale_sensitivity_over_epsilon(epsilon: float, sensitivity: float) -> None:
    mechanism = Laplace(epsilon, sensitivity)
    scale = sensitivity / epsilon
    assert mechanism.scale == scale
    exact = np.arange(200_000, dtype=np.int64) % 7
    noise = mechanism.release(exact, np.random.default_rng(11)) - exact
    # A Laplace(b) variable has mean 0, E|X| = b and variance 2 b^2; 200,000 draws pin them to about 1%.
    assert abs(np.mean(noise)) < 0.02 * scale
    assert np.mean(np.abs(noise)) == pytest.approx(scale, rel=0.02)
    assert np.var(noise) == pytest.approx(2 * scale**2, rel=0.03)
    # Its CDF: P(X <= t) = 1 - exp(-t / b) / 2 for t >= 0.
    for t in (0.5 * scale, scale, 3 * scale):
        assert np.mean(noise <= t) == pytest.approx(1 - math.exp(-t / scale) / 2, abs=0.005)


def test_laplace_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="^epsilon 0 must be a positive finite number$"):
        Laplace(0, 1.0)
    with pytest.raises(ConfigError, match="^epsilon inf must be a positive finite number$"):
        Laplace(math.inf, 1.0)
    with pytest.raises(ConfigError, match="^sensitivity -1.0 must be a positive finite number$"):
        Laplace(1.0, -1.0)


def test_private_labels_add_laplace_noise_of_scale_one_over_epsilon() -> None:
    labels = np.arange(300) % 10
    query = Query("label-histogram")
    results = answered(query, [dataset(np.zeros((150, 1)), labels[:150]), dataset(np.zeros((150, 1)), labels[150:])])
    exact = np.bincount(labels, minlength=10)
    rng = np.random.default_rng(5)
    noise = []
    for _ in range(2000):
        noisy, mechanism = private_labels(query, results, 0.5, rng)
        noise.append(noisy - exact)
    assert (mechanism.epsilon, mechanism.sensitivity, mechanism.scale) == (0.5, 1.0, 2.0)
    assert np.mean(np.abs(noise)) == pytest.approx(2.0, rel=0.03)
    assert abs(np.mean(noise)) < 0.05


def without_one(shards: list[np.ndarray], shard: int, row: int) -> list[np.ndarray]:
    """The neighbouring data set: ``shards`` less one example (kept non-empty for the workers)."""
    return [np.delete(part, row % len(part), axis=0) if index == shard else part for index, part in enumerate(shards)]


@st.composite
def neighbours(draw: st.DrawFn) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Examples x features cut into shards, and the same less one example of one shard."""
    pooled, cuts = draw(pooled_data())
    shards = split(pooled, cuts)
    shard = draw(st.integers(0, len(shards) - 1))
    if len(shards[shard]) == 1:  # a worker needs one example: remove from a whole set of two instead
        shards = [np.concatenate([shards[shard], shards[shard]]), *shards[:shard], *shards[shard + 1 :]]
        shard = 0
    return shards, without_one(shards, shard, draw(st.integers(0, 10**6)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=60), st.integers(0, 10**6))
def test_one_example_moves_the_label_histogram_by_at_most_one(labels: list[int], row: int) -> None:
    query = Query("label-histogram")
    pooled = np.array(labels)
    smaller = np.delete(pooled, row % len(pooled))
    full = combine_labels(query, answered(query, [dataset(np.zeros((len(pooled), 1)), pooled, 5)]))
    neighbour = combine_labels(query, answered(query, [dataset(np.zeros((len(smaller), 1)), smaller, 5)]))
    assert np.abs(full - neighbour).sum() == 1


@settings(max_examples=40, deadline=None)
@given(neighbours(), st.integers(1, 16))
def test_one_example_moves_the_quantile_histograms_by_at_most_the_sensitivity(
    case: tuple[list[np.ndarray], list[np.ndarray]], bins: int
) -> None:
    shards, smaller = case
    num_features = shards[0].shape[1]
    features = tuple(range(0, num_features, 2))  # some of the features
    query = Query("quantiles", features, bins, (-1.0, 1.0))
    full = answered(query, [dataset(part) for part in shards])
    neighbour = answered(query, [dataset(part) for part in smaller])

    def cells_of(results: dict[str, QueryResult]) -> np.ndarray:
        return np.concatenate(
            [np.ravel(sum(r.tensors[name] for r in results.values())) for name in ("histogram", "pooled")]
        )

    change = np.abs(cells_of(full) - cells_of(neighbour)).sum()
    assert change == len(features) + num_features  # one value per selected feature, and one per feature pooled
    _, mechanism = private_quantiles(query, full, [0.5], 1.0, np.random.default_rng(0))
    assert mechanism.sensitivity == len(features) + num_features


def clipped_sums(shards: list[np.ndarray], clip: tuple[float, float], features: tuple[int, ...]) -> np.ndarray:
    """Count, then sums and sums of squares about the range's centre (selected features, then pooled), in numpy."""
    values = np.clip(np.concatenate(shards).astype(np.float64), *clip) - (clip[0] + clip[1]) / 2
    columns = values[:, list(features)]
    return np.concatenate(
        [[len(values)], columns.sum(axis=0), [values.sum()], (columns**2).sum(axis=0), [(values**2).sum()]]
    )


@settings(max_examples=40, deadline=None)
@given(neighbours(), st.sampled_from([(-1.0, 1.0), (0.0, 3.0), (-300.5, -299.0)]))
def test_one_example_moves_clipped_sums_by_at_most_the_sensitivities(
    case: tuple[list[np.ndarray], list[np.ndarray]], clip: tuple[float, float]
) -> None:
    shards, smaller = case
    num_features = shards[0].shape[1]
    features = tuple(range(num_features))[:2]
    query = clipping_query(features, clip)
    stats = private_feature_stats(query, answered(query, [dataset(p) for p in shards]), 1.0, np.random.default_rng(0))
    count, sums, squares = stats.mechanisms
    half = (clip[1] - clip[0]) / 2
    rows = len(features) + num_features
    assert (count.sensitivity, sums.sensitivity, squares.sensitivity) == (1.0, rows * half, rows * half**2)
    assert count.epsilon == sums.epsilon == squares.epsilon == pytest.approx(1 / 3)

    change = np.abs(clipped_sums(shards, clip, features) - clipped_sums(smaller, clip, features))
    k = len(features) + 1
    assert change[0] == 1
    assert change[1 : 1 + k].sum() <= sums.sensitivity * (1 + 1e-9)
    assert change[1 + k :].sum() <= squares.sensitivity * (1 + 1e-9)


@settings(max_examples=30, deadline=None)
@given(pooled_data(), st.sampled_from([(-1.0, 1.0), (0.0, 3.0), (-300.5, -299.0)]))
def test_workers_clip_before_the_moments(case: tuple[np.ndarray, list[int]], clip: tuple[float, float]) -> None:
    pooled, cuts = case
    features = tuple(range(pooled.shape[1]))
    query = clipping_query(features, clip)
    stats = combine_feature_stats(query, answered(query, [dataset(part) for part in split(pooled, cuts)]))
    reference = np.minimum(np.maximum(pooled.astype(np.float64), clip[0]), clip[1])
    np.testing.assert_allclose(stats.selected.mean, reference.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.selected.variance, reference.var(axis=0), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(stats.pooled.mean, [reference.mean()], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.pooled.variance, [reference.var()], rtol=1e-7, atol=1e-9)


def test_private_feature_stats_approach_the_clipped_ones_as_epsilon_grows() -> None:
    values = np.random.default_rng(2).normal(0.5, 1.0, size=(400, 3))
    clip = (-1.0, 2.0)
    query = clipping_query((0, 2), clip)
    results = answered(query, [dataset(values[:150]), dataset(values[150:])])
    reference = np.clip(values, *clip)
    stats = private_feature_stats(query, results, 1e9, np.random.default_rng(0))
    np.testing.assert_allclose(stats.count, [400, 400, 1200], rtol=1e-6)
    np.testing.assert_allclose(stats.mean, [*reference[:, [0, 2]].mean(axis=0), reference.mean()], atol=1e-6)
    np.testing.assert_allclose(stats.variance, [*reference[:, [0, 2]].var(axis=0), reference.var()], atol=1e-6)
    # At a small epsilon the figures are noisy but stay in what clipped values allow.
    noisy = private_feature_stats(query, results, 0.01, np.random.default_rng(0))
    assert not np.allclose(noisy.mean, stats.mean)
    assert np.all((noisy.mean >= -1.0) & (noisy.mean <= 2.0))
    assert np.all((noisy.variance >= 0) & (noisy.variance <= 1.5**2))
    assert np.all(noisy.count >= [1, 1, 3])
    with pytest.raises(ConfigError, match="^feature-stats query has no clipping range"):
        private_feature_stats(Query("feature-stats", (0, 2)), results, 1.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="^epsilon -1.0 must be a positive finite number$"):
        private_feature_stats(query, results, -1.0, np.random.default_rng(0))


def test_private_quantiles_approach_the_exact_ones_as_epsilon_grows() -> None:
    values = np.random.default_rng(4).uniform(0, 1, size=(500, 2))
    query = Query("quantiles", (1,), 50, (0.0, 1.0))
    results = answered(query, [dataset(values[:200]), dataset(values[200:])])
    exact = combine_quantiles(query, results, [0.1, 0.5, 0.9])
    close, mechanism = private_quantiles(query, results, [0.1, 0.5, 0.9], 1e9, np.random.default_rng(0))
    assert mechanism.scale == pytest.approx(3e-9)
    # Noise of 3e-9 on empty cells can move a rank that sits on a cell boundary across it: within a bin.
    np.testing.assert_allclose(close.values, exact.values, atol=exact.bin_width)
    np.testing.assert_allclose(close.pooled, exact.pooled, atol=exact.bin_width)
    noisy, _ = private_quantiles(query, results, [0.1, 0.5, 0.9], 0.1, np.random.default_rng(0))
    assert not np.allclose(noisy.values, exact.values)


# Secure aggregation --------------------------------------------------------------


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


# Command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["quantiles", "--range", "1", "0"],
            "--bins 256 --range 1.0 0.0: range must be two finite numbers low < high, not (1.0, 0.0)",
        ),
        (
            ["--workers", "alice=http://x", "label-histogram"],
            "worker entry 'alice=http://x' must look like alice=ws://localhost:8777",
        ),
        (["--dp-seed", "3", "label-histogram"], "--dp-seed only applies with --dp-epsilon"),
        (["feature-stats", "--clip-range", "0", "1"], "--clip-range only applies with --dp-epsilon or --secure-agg"),
        (["--secagg-threshold", "2", "label-histogram"], "--secagg-threshold needs --secure-agg"),
        (
            ["--workers", "alice=ws://localhost:1", "--secure-agg", "label-histogram"],
            "--secure-agg needs at least 2 workers, not 1",
        ),
        (
            ["--secure-agg", "--secagg-threshold", "1", "label-histogram"],
            "--secagg-threshold 1 must be more than half of, and at most, the 3 workers",
        ),
        (
            ["--secure-agg", "--secagg-threshold", "4", "label-histogram"],
            "--secagg-threshold 4 must be more than half of, and at most, the 3 workers",
        ),
        (
            ["--secure-agg", "feature-stats"],
            "feature-stats with --secure-agg needs --clip-range LOW HIGH (digits: -0.82 1.85, MNIST: -0.43 2.83)",
        ),
        (
            ["--secure-agg", "--dp-epsilon", "1", "feature-stats"],
            "feature-stats with --dp-epsilon and --secure-agg needs --clip-range LOW HIGH (digits: -0.82 1.85,"
            " MNIST: -0.43 2.83)",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats"],
            "feature-stats with --dp-epsilon needs --clip-range LOW HIGH (digits: -0.82 1.85, MNIST: -0.43 2.83)",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats", "--clip-range", "1", "0"],
            "--clip-range 1 0 must be two finite numbers low < high",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats", "--clip-range", "0", "inf"],
            "--clip-range 0 inf must be two finite numbers low < high",
        ),
    ],
)
def test_bad_settings_stop_before_connecting(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert analytics_cli.main(argv) == 2
    assert capsys.readouterr().err == f"python -m syncfed analytics: error: {message}\n"


def test_bad_flag_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in (
        (["feature-stats", "--features", "3-1"], "'3-1' is not all, none or indices such as 0-7,36"),
        (["quantiles", "--range", "0", "1", "--q", "0.5,1.5"], "probability 1.5 is not within 0..1"),
        (["--dp-epsilon", "0", "label-histogram"], "argument --dp-epsilon: '0' is not a positive finite number"),
        (["--dp-epsilon", "-1", "label-histogram"], "argument --dp-epsilon: '-1' is not a positive finite number"),
        (["--dp-epsilon", "inf", "label-histogram"], "argument --dp-epsilon: 'inf' is not a positive finite number"),
        (["--dp-epsilon", "nan", "label-histogram"], "argument --dp-epsilon: 'nan' is not a positive finite number"),
        (["--dp-epsilon", "one", "label-histogram"], "argument --dp-epsilon: 'one' is not a positive finite number"),
        (["--dp-seed", "-1", "label-histogram"], "argument --dp-seed: '-1' is not a non-negative integer"),
    ):
        with pytest.raises(SystemExit) as stopped:
            analytics_cli.main(argv)
        assert stopped.value.code == 2
        assert text in capsys.readouterr().err


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncfed", "analytics", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def test_cli_over_real_workers(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    names = ("alice", "bob", "charlie")
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    # What each session worker trains on: its classes of the training set, less its validation split.
    holdings = {name: load_shard(WorkerConfig(name)) for name in names}
    sizes = {name: len(holding.data) for name, holding in holdings.items()}
    assert sum(sizes.values()) + sum(h.validation_size for h in holdings.values()) == DIGITS_TRAIN
    pixels = np.concatenate([h.data.images.reshape(len(h.data), -1) for h in holdings.values()]).astype(np.float64)
    labels = np.concatenate([h.data.labels for h in holdings.values()])

    histogram = run_cli(["--workers", workers, "--json", str(tmp_path / "labels.json"), "label-histogram"])
    assert histogram.returncode == 0, histogram.stderr
    lines = histogram.stdout.splitlines()
    assert lines[0] == f"label-histogram over {len(labels)} examples of 3 workers (alice, bob, charlie)"
    assert lines[1].split() == ["label", "alice", "bob", "charlie", "total"]
    assert lines[-1].split() == ["total", *(str(sizes[name]) for name in names), str(len(labels))]
    document = json.loads((tmp_path / "labels.json").read_text())
    assert document["total"] == np.bincount(labels, minlength=10).tolist()
    assert document["answered"] == sizes and document["failed"] == {}

    # Differentially private: the noisy total only, with its noise named; no exact sizes.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dp.json"), "--dp-epsilon", "1.0", "--dp-seed", "0"]
        + ["label-histogram"]
    )
    assert private.returncode == 0, private.stderr
    lines = private.stdout.splitlines()
    assert lines[:2] == [
        "label-histogram over 3 workers (alice, bob, charlie)",
        "1-differentially private: Laplace noise of scale 1 on each count (sensitivity 1)",
    ]
    assert lines[2].split() == ["label", "total"]
    document = json.loads((tmp_path / "dp.json").read_text())
    exact = np.bincount(labels, minlength=10)
    noisy = np.array(document["total"])
    assert np.abs(noisy - exact).max() < 12  # Laplace(1): P(|noise| >= 12) = exp(-12) per count
    assert not np.array_equal(noisy, exact)
    assert [float(line.split()[1]) for line in lines[3:13]] == pytest.approx(noisy.tolist(), abs=0.051)
    assert document["answered"] == list(names) and document["epsilon"] == 1.0
    assert document["noise"] == [
        {"released": "each count", "mechanism": "laplace", "epsilon": 1.0, "sensitivity": 1.0, "scale": 1.0}
    ]

    # Quantiles over all 64 pixels: one example is 64 values, so each cell gets noise of scale 64 / epsilon.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dpq.json"), "--dp-epsilon", "1", "--dp-seed", "0"]
        + ["quantiles", "--range", "-0.82", "1.85", "--bins", "64", "--q", "0.5,0.9"]
    )
    assert private.returncode == 0, private.stderr
    assert private.stdout.splitlines()[1] == (
        "1-differentially private: Laplace noise of scale 64 on each histogram cell (sensitivity 64)"
    )
    document = json.loads((tmp_path / "dpq.json").read_text())
    assert document["noise"][0]["sensitivity"] == 64 and document["noise"][0]["scale"] == 64
    (row,) = document["features"]
    exact = np.quantile(pixels.ravel(), [0.5, 0.9])
    # Noise of scale 64 on 66 cells of 82,000 values moves ranks by about 1%: a few bin widths at most.
    assert np.abs(np.array(row["quantiles"]) - exact).max() < 4 * 2.67 / 64

    stats = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "stats.json"), "feature-stats", "--features", "2,36"]
    )
    assert stats.returncode == 0, stats.stderr
    rows = {row["feature"]: row for row in json.loads((tmp_path / "stats.json").read_text())["features"]}
    assert list(rows) == ["2", "36", "all"]
    for name, column in (("2", pixels[:, 2]), ("36", pixels[:, 36]), ("all", pixels.ravel())):
        assert rows[name]["count"] == column.size
        assert rows[name]["mean"] == pytest.approx(column.mean(), rel=1e-9, abs=1e-12)
        assert rows[name]["variance"] == pytest.approx(column.var(), rel=1e-9)

    # Differentially private statistics: the workers clip to the range, the answer carries noise.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dps.json"), "--dp-epsilon", "1", "--dp-seed", "0"]
        + ["feature-stats", "--features", "2,36", "--clip-range", "-0.82", "1.85"]
    )
    assert private.returncode == 0, private.stderr
    noisy = {row["feature"]: row for row in json.loads((tmp_path / "dps.json").read_text())["features"]}
    assert list(noisy) == ["2", "36", "all"]
    clipped = np.clip(pixels, -0.82, 1.85)  # clips nothing on digits: the data lie in [-0.812, 1.848]
    for name, column in (("2", clipped[:, 2]), ("36", clipped[:, 36]), ("all", clipped.ravel())):
        assert noisy[name]["mean"] != column.mean()  # noise was added
        # The sums' noise: Laplace of scale (2 + 64) features x half the range / (epsilon / 3), over 1292 examples.
        assert abs(noisy[name]["mean"] - column.mean()) < 6 * 66 * 1.335 * 3 / len(labels)
        assert -0.82 <= noisy[name]["mean"] <= 1.85

    # Pixel 36 takes rare values on every shard: each worker refuses, none answers.
    refused = run_cli(["--workers", workers, "quantiles", "--range", "-0.82", "1.85", "--features", "36"])
    assert refused.returncode == 6
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == pixel_36_refusals(names)


def pixel_36_refusals(names: Sequence[str]) -> list[str]:
    """What the command prints when these workers refuse quantiles of pixel 36, whose values are rare everywhere."""
    return [
        f"python -m syncfed analytics: {name} answered with error refused: quantiles would describe a group of fewer"
        " than 10 examples (a cell of feature 36); this worker's minimum group size is 10"
        for name in names
    ]


def test_cli_secure_aggregation_over_real_workers_equals_the_plain_answer(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    names = ["alice", "bob", "charlie"]
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    queries = {
        "label-histogram": ["label-histogram"],
        "quantiles": ["quantiles", "--range", "-0.82", "1.85", "--bins", "64", "--q", "0.1,0.5,0.9"],
        # The range clips nothing on digits (the data lie in [-0.812, 1.848]): the plain answer needs none.
        "feature-stats": ["feature-stats", "--features", "2,36", "--clip-range", "-0.82", "1.85"],
    }
    documents = {}
    for kind, arguments in queries.items():
        plain_arguments = arguments[: arguments.index("--clip-range")] if "--clip-range" in arguments else arguments
        plain = run_cli(["--workers", workers, "--json", str(tmp_path / f"{kind}.json"), *plain_arguments])
        assert plain.returncode == 0, plain.stderr
        secure = run_cli(["--workers", workers, "--json", str(tmp_path / f"s-{kind}.json"), "--secure-agg", *arguments])
        assert secure.returncode == 0, secure.stderr
        assert secure.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
        assert secure.stdout.splitlines()[1].startswith(
            "securely aggregated: only the sum of the answers was revealed (threshold 2 of 3 workers)"
        )
        documents[kind] = (
            json.loads((tmp_path / f"{kind}.json").read_text()),
            json.loads((tmp_path / f"s-{kind}.json").read_text()),
        )
        exact, summed = documents[kind]
        assert summed["answered"] == names and summed["failed"] == {}
        assert summed["secure_agg"]["summed"] == names and summed["secure_agg"]["recovered"] == []

    exact, summed = documents["label-histogram"]
    assert summed["total"] == exact["total"] and "per_worker" not in summed  # no worker's own counts
    assert summed["secure_agg"] == {
        "workers": 3,
        "threshold": 2,
        "summed": names,
        "recovered": [],
        "sum_error_bound": 0.0,
    }
    exact, summed = documents["quantiles"]
    assert summed["features"] == exact["features"]  # the same summed histogram, so the same estimates
    exact, summed = documents["feature-stats"]
    bound = summed["secure_agg"]["sum_error_bound"]
    assert 0 < bound < 1e-6
    for plain_row, secure_row in zip(exact["features"], summed["features"], strict=True):
        assert secure_row["feature"] == plain_row["feature"] and secure_row["count"] == plain_row["count"]
        assert secure_row["mean"] == pytest.approx(plain_row["mean"], rel=1e-9, abs=10 * bound)
        assert secure_row["variance"] == pytest.approx(plain_row["variance"], rel=1e-9, abs=10 * bound)

    # A range that clips: the workers clip before summing, as numpy does over their pooled pixels.
    clipped = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "clipped.json"), "--secure-agg"]
        + ["feature-stats", "--features", "2,36", "--clip-range", "-0.5", "1.0"]
    )
    assert clipped.returncode == 0, clipped.stderr
    holdings = [load_shard(WorkerConfig(name)).data for name in names]
    pixels = np.clip(np.concatenate([h.images.reshape(len(h), -1) for h in holdings]).astype(np.float64), -0.5, 1.0)
    rows = {row["feature"]: row for row in json.loads((tmp_path / "clipped.json").read_text())["features"]}
    for name, column in (("2", pixels[:, 2]), ("36", pixels[:, 36]), ("all", pixels.ravel())):
        assert rows[name]["count"] == column.size
        assert rows[name]["mean"] == pytest.approx(column.mean(), rel=1e-9, abs=1e-9)
        assert rows[name]["variance"] == pytest.approx(column.var(), rel=1e-9, abs=1e-9)
    assert pixels.max() == 1.0 and pixels.min() == -0.5  # the range did clip

    # Secure and differentially private: the noise goes on the sum.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "sdp.json"), "--secure-agg", "--dp-epsilon", "1"]
        + ["--dp-seed", "0", "label-histogram"]
    )
    assert private.returncode == 0, private.stderr
    assert private.stdout.splitlines()[:3] == [
        "label-histogram over 3 workers (alice, bob, charlie)",
        "1-differentially private: Laplace noise of scale 1 on each count (sensitivity 1)",
        "securely aggregated: only the sum of the answers was revealed (threshold 2 of 3 workers)",
    ]
    noisy = np.array(json.loads((tmp_path / "sdp.json").read_text())["total"])
    exact_total = np.array(documents["label-histogram"][0]["total"])
    assert 0 < np.abs(noisy - exact_total).max() < 12  # Laplace(1): P(|noise| >= 12) = exp(-12) per count

    # Every worker refuses pixel 36's histogram: too few masked answers to unmask anything.
    refused = run_cli(
        ["--workers", workers, "--secure-agg", "quantiles", "--range", "-0.82", "1.85", "--features", "36"]
    )
    assert refused.returncode == 8
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        *pixel_36_refusals(names),
        "python -m syncfed analytics: error: secure aggregation aborted: 0 clients sent masked inputs, threshold is 2",
    ]


def test_a_refusing_worker_is_left_out_of_the_secure_sum(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    names = ["alice", "bob", "charlie"]
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    with running_workers([("gina", [*THREADS, "--digits", "1,2", "--min-group-size", "100000"])]) as extra:
        everyone = f"{workers},gina={extra['gina'].uri}"
        secure = run_cli(["--workers", everyone, "--json", str(tmp_path / "s.json"), "--secure-agg", "label-histogram"])
    assert secure.returncode == 6  # a refusal, as without secure aggregation
    assert secure.stderr.splitlines() == [
        "python -m syncfed analytics: gina answered with error refused: this worker holds 259 examples, fewer than"
        " its minimum group size of 100000"
    ]
    plain = run_cli(["--workers", workers, "--json", str(tmp_path / "p.json"), "label-histogram"])
    assert plain.returncode == 0, plain.stderr
    summed, exact = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "p.json"))
    assert secure.stdout.splitlines()[0] == plain.stdout.splitlines()[0] + "; left out: gina"
    assert summed["total"] == exact["total"]  # gina's masks are stripped through her key's shares
    assert summed["secure_agg"]["summed"] == names and summed["secure_agg"]["threshold"] == 3
    assert list(summed["failed"]) == ["gina"]


def test_a_worker_lost_after_masking_its_answer_stays_in_the_secure_sum(
    digits_workers: dict[str, WorkerProcess],
    disposable_worker: WorkerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = ["alice", "bob", "charlie", "erin"]
    uris = {**{name: digits_workers[name].uri for name in names[:3]}, "erin": disposable_worker.uri}
    workers = ",".join(f"{name}={uri}" for name, uri in uris.items())
    assert analytics_cli.main(["--workers", workers, "--json", str(tmp_path / "p.json"), "label-histogram"]) == 0

    class KillingErin(SecureRound):
        async def unmask(self) -> SecAggResult:
            os.kill(disposable_worker.process.pid, signal.SIGKILL)  # erin's masked answer is already in
            return await super().unmask()

    monkeypatch.setattr("syncfed.coordinator.query_round.SecureRound", KillingErin)
    capsys.readouterr()
    status = analytics_cli.main(
        ["--workers", workers, "--json", str(tmp_path / "s.json"), "--secure-agg", "label-histogram"]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.splitlines()[1] == (
        "securely aggregated: only the sum of the answers was revealed (threshold 3 of 4 workers;"
        " left after masking, unmasked from the others' shares: erin)"
    )
    summed, exact = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "p.json"))
    assert summed["total"] == exact["total"] and summed["answered"] == names and summed["failed"] == {}
    assert summed["secure_agg"]["recovered"] == ["erin"]


def test_a_worker_refuses_an_answer_beyond_the_secure_round_s_limit(digits_workers: dict[str, WorkerProcess]) -> None:
    """A coordinator that sizes the round too small gets a refusal, not a silently clipped answer."""
    names = ["alice", "bob"]
    query = Query("label-histogram")
    reasons: dict[str, str] = {}

    async def why(client: WorkerLink, error: BaseException) -> str:
        reasons[client.name] = str(error)
        return str(error)

    async def scenario() -> None:
        clients = [
            WorkerLink(
                name, digits_workers[name].uri, max_message_size=2**20, connect_timeout=10_000 * MS, ping_interval=None
            )
            for name in names
        ]
        try:
            for client in clients:
                await client.connect()
                await client.request(Hello())
            # 100 is below every worker's example count (the first entry of its sums).
            config = SecAggConfig(2, 2, sums_length(query, 10), 100.0, os.urandom(32), bits=64, max_count=1)
            secure = SecureRound(clients, config, timeout=60_000 * MS, failure=why)
            with pytest.raises(SecAggError, match="^0 clients sent masked inputs, threshold is 2$"):
                await secure.run(dict.fromkeys(names, query), weighted=False)
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    asyncio.run(asyncio.wait_for(scenario(), timeout=CLI_TIMEOUT))
    assert reasons == {
        name: f"{name} answered with error incompatible: the answer exceeds the secure round's limit of 100"
        for name in names
    }
