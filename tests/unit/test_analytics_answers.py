"""Federated analytics: combined answers against numpy over the pooled data, answers that do not
fit refused before combining, and the minimum group size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analytics_kit import answered, dataset, pooled_data, split
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.analytics import (
    Moments,
    answer,
    cells,
    combine_feature_stats,
    combine_labels,
    combine_quantiles,
    merge_moments,
    moments,
)
from syncfed.cli import worker as server_cli
from syncfed.config import WorkerConfig
from syncfed.datasets import Dataset
from syncfed.exceptions import AggregationError, ConfigError
from syncfed.protocol import Error, Query, QueryResult

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
