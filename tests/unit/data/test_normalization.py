"""Federated normalisation: the plan's statistics from the sites' combined answers agree with the pooled data's."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.analytics import FeatureStats, answer, combine_feature_stats, from_sums, secure_clip, sums
from syncfed.data import normalization
from syncfed.data.arrays import ArraySource
from syncfed.data.base import standardize
from syncfed.data.normalization import (
    MASK_STD,
    NORMALIZATIONS,
    REFINE_RANGE,
    coarse_range,
    default_normalization,
    plan_statistics,
    refine_statistics,
    statistics_queries,
)
from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError
from syncfed.masking import Quantizer
from syncfed.protocol import DataPlan, Query, QueryResult, decode, encode

#: Relative float32 rounding of a value a worker standardises, as the module's error bound states it.
U = 2.0**-22

Prepare = Callable[[np.ndarray, DataPlan], Dataset]


def prepared(x: np.ndarray, plan: DataPlan) -> Dataset:
    """A site's examples as a source prepares them: standardised with the plan's statistics, in float32."""
    return Dataset("site", standardize(x, plan), np.zeros(len(x), dtype=np.int64), plan.num_classes)


def through_arrays(x: np.ndarray, plan: DataPlan) -> Dataset:
    """Arrays through the real source: :class:`ArraySource` prepares them with the plan."""
    return ArraySource(x, np.zeros(len(x), dtype=np.int64), classes=("a",)).prepare(plan)


def site_answers(query: Query, sites: Sequence[np.ndarray], prepare: Prepare) -> dict[str, QueryResult]:
    """Each site's answer over its data prepared with the query's plan, sent through the codec as a reply is."""
    assert query.data is not None
    results = {}
    for index, x in enumerate(sites):
        reply = answer(query, prepare(x, query.data), 1)
        assert isinstance(reply, QueryResult), reply
        results[f"site{index}"] = decode(encode(index + 1, reply)).message
    return results  # type: ignore[return-value]


def exact(queries: Sequence[Query], sites: Sequence[np.ndarray], prepare: Prepare) -> list[FeatureStats]:
    return [combine_feature_stats(query, site_answers(query, sites, prepare)) for query in queries]


def secure(
    queries: Sequence[Query], sites: Sequence[np.ndarray], prepare: Prepare, num_values: int
) -> tuple[list[FeatureStats], float]:
    """The combined answers as secure rounds give them: each site's sums quantised at the round's clip, added in
    the ring (the masks cancel in the sum), decoded; and the largest error bound of a decoded sum."""
    stats, error = [], 0.0
    for query in queries:
        results = site_answers(query, sites, prepare)
        largest = max(len(x) for x in sites)
        quantizer = Quantizer(len(sites), secure_clip(query, largest, num_values, len(sites)), bits=64, max_count=1)
        total = np.sum([quantizer.encode(sums(query, r), 1) for r in results.values()], axis=0, dtype=np.int64)
        decoded, _ = quantizer.decode(total)
        stats.append(combine_feature_stats(query, {"sum": from_sums(query, decoded, num_values)}))
        error = max(error, quantizer.error_bound)
    return stats, error


# Data -------------------------------------------------------------------------------------------


@st.composite
def pooled_tables(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    """Numeric columns of very different scales and offsets (one may be constant), float32 as sites hold
    them, and the row counts of 1 to 5 sites."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    columns = []
    for _ in range(draw(st.integers(1, 4))):
        scale = 10.0 ** draw(st.integers(-3, 4))
        offset = draw(st.sampled_from([0.0, 1.0, -250.0, 3e3]))
        shape = draw(st.sampled_from(["normal", "integers", "skewed", "constant"]))
        n = sum(sizes)
        column = {
            "normal": rng.normal(offset, scale, n),
            "integers": offset + rng.integers(0, 5, n) * scale,
            "skewed": offset + rng.exponential(scale, n),
            "constant": np.full(n, offset + scale),
        }[shape]
        columns.append(column)
    return np.stack(columns, axis=1).astype(np.float32), sizes


def cut(pooled: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(pooled, np.cumsum(sizes)[:-1])


def one_hot(codes: np.ndarray, width: int) -> np.ndarray:
    return np.eye(width, dtype=np.float32)[codes]


def table(numeric: np.ndarray, codes: np.ndarray) -> tuple[DataPlan, np.ndarray]:
    """A table plan of a categorical column 'c' (vocabulary x, y, then "other") between numeric ones, and the
    rows encoded as a table source encodes them."""
    k = numeric.shape[1]
    names = tuple(f"n{i}" for i in range(k))
    features = (names[0], "c", *names[1:])
    plan = DataPlan("table", (k + 3,), ("a",), features, {"c": ("x", "y")})
    encoded = np.concatenate([numeric[:, :1], one_hot(codes, 3), numeric[:, 1:]], axis=1)
    return plan, encoded


def reference(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pandas over the pooled values: the mean and the population std (ddof 0) of each column."""
    frame = pd.DataFrame(values.astype(np.float64))
    return frame.mean().to_numpy(), frame.std(ddof=0).to_numpy()


# Exact answers ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(case=pooled_tables(), seed=st.integers(0, 2**32 - 1))
def test_a_table_split_across_sites_gets_the_pooled_statistics(case: tuple[np.ndarray, list[int]], seed: int) -> None:
    numeric, sizes = case
    codes = np.random.default_rng(seed).integers(0, 3, len(numeric))
    plan, encoded = table(numeric, codes)
    result = plan_statistics(plan, exact(statistics_queries(plan), cut(encoded, sizes), prepared))

    mean, std = reference(numeric)
    numeric_slots = [0, *range(4, plan.input_shape[0])]
    np.testing.assert_allclose(np.array(result.mean)[numeric_slots], mean, rtol=1e-9, atol=1e-9 * np.abs(mean).max())
    np.testing.assert_allclose(np.array(result.std)[numeric_slots], np.where(std > 0, std, 1.0), rtol=1e-9)
    assert result.mean[1:4] == (0.0, 0.0, 0.0) and result.std[1:4] == (1.0, 1.0, 1.0)  # one-hot slots as they are
    assert result.without_statistics() == plan


@settings(max_examples=40, deadline=None)
@given(case=pooled_tables())
def test_arrays_through_the_array_source(case: tuple[np.ndarray, list[int]]) -> None:
    values, sizes = case
    plan = DataPlan("arrays", values.shape[1:], ("a",))
    result = plan_statistics(plan, exact(statistics_queries(plan), cut(values, sizes), through_arrays))
    mean, std = reference(values)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-9, atol=1e-9 * np.abs(mean).max())
    np.testing.assert_allclose(result.std, np.where(std > 0, std, 1.0), rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.sampled_from([1, 3]),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
)
def test_images_get_per_channel_statistics(seed: int, channels: int, sizes: list[int]) -> None:
    rng = np.random.default_rng(seed)
    # Channels of different brightness and contrast, in [0, 1] as the image sources read them.
    pooled = np.clip(
        rng.normal([0.2, 0.5, 0.8][:channels], [0.05, 0.2, 0.1][:channels], (sum(sizes), 5, 4, channels)), 0, 1
    )
    pooled = pooled.transpose(0, 3, 1, 2).astype(np.float32)
    plan = DataPlan("images", (channels, 5, 4), ("cat", "dog"))
    queries = statistics_queries(plan)
    assert len(queries) == channels and all(query.features == () for query in queries)
    result = plan_statistics(plan, exact(queries, cut(pooled, sizes), prepared))

    per_channel = pooled.astype(np.float64).transpose(1, 0, 2, 3).reshape(channels, -1)
    np.testing.assert_allclose(result.mean, per_channel.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(result.std, per_channel.std(axis=1), rtol=1e-9)


def test_a_wide_table_is_asked_in_several_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalization, "QUERY_FEATURES", 2)
    rng = np.random.default_rng(5)
    numeric = (rng.normal(size=(30, 5)) * [1, 10, 100, 1000, 1e4]).astype(np.float32)
    plan, encoded = table(numeric, rng.integers(0, 3, 30))
    queries = statistics_queries(plan)
    assert [query.features for query in queries] == [(0, 4), (5, 6), (7,)]
    result = plan_statistics(plan, exact(queries, cut(encoded, [10, 20]), prepared))
    mean, std = reference(numeric)
    np.testing.assert_allclose(np.array(result.std)[[0, 4, 5, 6, 7]], std, rtol=1e-9)
    np.testing.assert_allclose(np.array(result.mean)[[0, 4, 5, 6, 7]], mean, rtol=1e-9)


def test_a_table_of_categories_only_needs_no_query() -> None:
    plan = DataPlan("table", (3,), ("a",), ("c",), {"c": ("x", "y")})
    assert statistics_queries(plan) == ()
    assert plan_statistics(plan, []) == DataPlan(plan.kind, (3,), ("a",), ("c",), plan.categories, (0, 0, 0), (1, 1, 1))


# The secure path: two passes, within the documented bound --------------------------------------------


def check_bound(
    coarse: DataPlan,
    final: DataPlan,
    slots: list[int],
    count: float,
    e2: float,
    true_mean: np.ndarray,
    true_std: np.ndarray,
) -> None:
    """The module's bound: ``|mean - true| <= s1 (eps2 + u (|m2| + s2))`` and ``|std - true| <= s1 min(sqrt(E2),
    E2 / s2)``, with ``m2, s2`` read back from the final statistics."""
    m1 = np.asarray(coarse.mean, dtype=np.float32)[slots].astype(np.float64)
    s1 = np.asarray(coarse.std, dtype=np.float32)[slots].astype(np.float64)
    mean, std = np.array(final.mean)[slots], np.array(final.std)[slots]
    m2, s2 = (mean - m1) / s1, std / s1
    eps = e2 / count
    big = eps * (1 + 2 * np.abs(m2) + eps) + 2 * U * (m2**2 + s2**2)
    slack = 1e-12 * (np.abs(m1) + s1)  # float64 arithmetic of these very checks
    assert np.all(np.abs(mean - true_mean) <= s1 * (eps + U * (np.abs(m2) + s2)) + slack)
    assert np.all(np.abs(std - true_std) <= s1 * np.minimum(np.sqrt(big), big / s2) + slack)


@settings(max_examples=40, deadline=None)
@given(case=pooled_tables(), seed=st.integers(0, 2**32 - 1))
def test_a_table_through_two_secure_passes(case: tuple[np.ndarray, list[int]], seed: int) -> None:
    numeric, sizes = case
    if len(sizes) < 2:
        sizes = [*sizes, 1]
        numeric = np.concatenate([numeric, numeric[:1]])
    plan, encoded = table(numeric, np.random.default_rng(seed).integers(0, 3, len(numeric)))
    sites, width = cut(encoded, sizes), plan.input_shape[0]

    first = coarse_range(max(sizes), width, len(sites))
    stats, e1 = secure(statistics_queries(plan, first), sites, prepared, width)
    coarse = plan_statistics(plan, stats, sum_error=e1)
    stats, e2 = secure(statistics_queries(coarse, REFINE_RANGE), sites, prepared, width)
    final = refine_statistics(coarse, stats, sum_error=e2)

    assert final.mean[1:4] == (0.0, 0.0, 0.0) and final.std[1:4] == (1.0, 1.0, 1.0)
    true_mean, true_std = reference(numeric)
    check_bound(coarse, final, [0, *range(4, width)], len(numeric), e2, true_mean, true_std)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 12), min_size=2, max_size=5))
def test_images_through_two_secure_passes(seed: int, sizes: list[int]) -> None:
    rng = np.random.default_rng(seed)
    pooled = rng.uniform(0, 1, (sum(sizes), 3, 4, 4)) ** np.array([1.0, 3.0, 0.3])[None, :, None, None]
    pooled = pooled.astype(np.float32)
    plan, sites, values = DataPlan("images", (3, 4, 4), ("a",)), cut(pooled, sizes), 48

    stats, e1 = secure(statistics_queries(plan, coarse_range(max(sizes), values, len(sites))), sites, prepared, values)
    coarse = plan_statistics(plan, stats, sum_error=e1)
    stats, e2 = secure(statistics_queries(coarse, REFINE_RANGE), sites, prepared, values)
    final = refine_statistics(coarse, stats, sum_error=e2)

    per_channel = pooled.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    check_bound(coarse, final, [0, 1, 2], per_channel.shape[1], e2, per_channel.mean(axis=1), per_channel.std(axis=1))


def test_a_coarse_std_is_never_below_its_error() -> None:
    """A constant column under secure aggregation: its coarse std is the floor, so pass 2 clips nothing."""
    plan = DataPlan("arrays", (1,), ("a",))
    sites = [np.full((20, 1), 1234.5, dtype=np.float32), np.full((10, 1), 1234.5, dtype=np.float32)]
    stats, e1 = secure(statistics_queries(plan, coarse_range(20, 1, 2)), sites, through_arrays, 1)
    coarse = plan_statistics(plan, stats, sum_error=e1)
    eps = e1 / 30
    assert coarse.std[0] >= math.sqrt(eps * (1 + 2 * 1234.5))
    stats, e2 = secure(statistics_queries(coarse, REFINE_RANGE), sites, through_arrays, 1)
    final = refine_statistics(coarse, stats, sum_error=e2)
    assert abs(final.mean[0] - 1234.5) < 1e-3 and 0 < final.std[0] < 1e-3


# Settings and misuse ------------------------------------------------------------------------------


def test_the_normalisations_and_their_default() -> None:
    assert NORMALIZATIONS == ("federated", "fixed", "none")
    assert {kind: default_normalization(kind) for kind in ("images", "table", "arrays")} == dict.fromkeys(
        ("images", "table", "arrays"), "federated"
    )
    with pytest.raises(ConfigError, match="^data kind 'video' is not one of images, table, arrays$"):
        default_normalization("video")


def test_image_queries_mask_the_other_channels() -> None:
    plan = DataPlan("images", (3, 2, 2), None, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    queries = statistics_queries(plan, REFINE_RANGE)
    assert [(q.data.mean, q.data.std) for q in queries if q.data] == [
        ((0.1, 0.0, 0.0), (1.0, MASK_STD, MASK_STD)),
        ((0.0, 0.2, 0.0), (MASK_STD, 2.0, MASK_STD)),
        ((0.0, 0.0, 0.3), (MASK_STD, MASK_STD, 3.0)),
    ]
    assert all(q.value_range == REFINE_RANGE for q in queries)
    grey = DataPlan("images", (1, 2, 2), None)
    assert statistics_queries(grey) == (Query("feature-stats", (), data=grey),)


def test_coarse_range_is_the_widest_power_of_two_the_secure_sum_allows() -> None:
    assert coarse_range(10_000, 30, 3) == (-16384.0, 16384.0)
    assert coarse_range(100_000, 3 * 224 * 224, 10) == (-128.0, 128.0)
    assert coarse_range(10_000, 30, 3, half_width=1000) == (-1000.0, 1000.0)
    with pytest.raises(ConfigError) as info:
        coarse_range(10_000, 30, 3, half_width=20_000)
    assert str(info.value) == (
        "clipping range +-20000 is not within the +-16384 a secure sum of 10000 examples of 30 values from each of 3"
        " workers allows"
    )
    with pytest.raises(ConfigError) as info:
        coarse_range(10**9, 10**6, 3)
    assert str(info.value) == (
        "1000000000 examples of 1000000 values leave a secure sum no clipping range of at least +-1: start the"
        " coordinator with --normalize none or without --secure-agg"
    )


def test_misuse_is_a_config_error() -> None:
    plan = DataPlan("arrays", (2,), ("a",))
    cases: dict[str, Callable[[], object]] = {
        "a statistics query's clipping range must be (-h, h), not (0.0, 1.0)": lambda: statistics_queries(
            plan, (0.0, 1.0)
        ),
        "arrays of 4194305 values per example exceed limit of 4194304 standardised values: start the coordinator"
        " with --normalize none": lambda: statistics_queries(DataPlan("arrays", (2**22 + 1,), None)),
        "1 statistics answers for the plan's 0 queries": lambda: plan_statistics(
            DataPlan("table", (1,), None, ("c",), {"c": ()}),
            [None],  # type: ignore[list-item]
        ),
        "the plan already has statistics: answers over data standardised with them refine them": lambda: (
            plan_statistics(DataPlan("arrays", (1,), None, mean=(0,), std=(1,)), [])
        ),
        "refining needs a plan with coarse statistics": lambda: refine_statistics(plan, []),
    }
    for reason, call in cases.items():
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == reason
    other = exact([Query("feature-stats", (1,), data=plan)], [np.ones((3, 2), np.float32)], through_arrays)
    with pytest.raises(ConfigError, match="^statistics answer 0 is not over the features its query selects$"):
        plan_statistics(plan, other)
