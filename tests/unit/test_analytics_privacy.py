"""Federated analytics with differential privacy: Laplace noise of the right scale, and the
sensitivities that one example more or less cannot exceed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analytics_kit import answered, clipping_query, dataset, pooled_data, split
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.analytics import (
    Laplace,
    combine_feature_stats,
    combine_labels,
    combine_quantiles,
    private_feature_stats,
    private_labels,
    private_quantiles,
)
from syncfed.exceptions import ConfigError
from syncfed.protocol import Query, QueryResult


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
