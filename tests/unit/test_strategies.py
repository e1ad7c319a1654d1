"""Strategies against independent numpy computations, their state, and their errors."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_FLOOR, Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from syncfed.aggregation import RunningMean, krum_scores, trimmed_mean
from syncfed.exceptions import AggregationError, ConfigError
from syncfed.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Mean,
    MeanStrategy,
    Median,
    MultiKrum,
    Scaffold,
    Strategy,
    TrimmedMean,
    make_strategy,
)

FAST = settings(max_examples=25, deadline=None)

MEAN_STRATEGIES = ["fedavg", "mean", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"]
ROBUST_STRATEGIES = ["median", "trimmed-mean", "krum", "multi-krum"]
STATEFUL = ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"]


def make_model(rng: np.random.Generator, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """A small model with the tensor kinds of a real one, a batch-norm counter included."""
    return {
        "conv.weight": rng.normal(size=(3, 2, 2)).astype(dtype),
        "conv.bias": rng.normal(size=3).astype(dtype),
        "bn.num_batches_tracked": np.array(rng.integers(0, 1000), dtype=np.int64),
        "fc.weight": rng.normal(size=(2, 3)).astype(dtype),
    }


def perturbed(rng: np.random.Generator, base: Mapping[str, np.ndarray], scale: float = 0.1) -> dict[str, np.ndarray]:
    return {
        name: (array + scale * rng.normal(size=array.shape)).astype(array.dtype)
        if array.dtype.kind == "f"
        else array + rng.integers(0, 20, size=array.shape)
        for name, array in base.items()
    }


def make_updates(rng: np.random.Generator, base: Mapping[str, np.ndarray], n: int) -> list:
    return [(perturbed(rng, base), int(rng.integers(1, 500))) for _ in range(n)]


def controls_for(rng: np.random.Generator, base: Mapping[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            name: rng.normal(size=array.shape).astype(array.dtype)
            for name, array in base.items()
            if array.dtype.kind == "f"
        }
        for _ in range(n)
    ]


def vector(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The floating-point tensors of a model as one float64 vector, in sorted name order."""
    return np.concatenate(
        [np.ravel(weights[name]).astype(np.float64) for name in sorted(weights) if weights[name].dtype.kind == "f"]
    )


def from_vector(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name in sorted(like):
        if like[name].dtype.kind == "f":
            out[name] = flat[start : start + like[name].size].reshape(like[name].shape)
            start += like[name].size
    return out


def run(strategy: Strategy, base: Mapping[str, np.ndarray], ups: list, controls: list | None, workers: int) -> dict:
    if strategy.uses_control:
        return strategy.aggregate(base, ups, control_deltas=controls, num_workers=workers)
    return strategy.aggregate(base, ups)


def assert_same(left: Mapping[str, np.ndarray], right: Mapping[str, np.ndarray]) -> None:
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype
        np.testing.assert_array_equal(left[name], right[name])


# Mean-based strategies


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6))
def test_fedavg_mean_and_fedprox_are_the_weighted_and_plain_means(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    base = make_model(rng, np.float64)
    ups = make_updates(rng, base, n)
    counts = np.array([count for _, count in ups], dtype=np.float64)
    for name, weighted in (("fedavg", True), ("mean", False), ("fedprox", True)):
        result = make_strategy(name).aggregate(base, ups)
        factors = counts if weighted else np.ones(n)
        expected = sum(f * vector(w) for (w, _), f in zip(ups, factors, strict=True)) / factors.sum()
        np.testing.assert_allclose(vector(result), expected, rtol=1e-12, atol=1e-12)


def test_fedprox_exposes_mu_and_the_others_zero() -> None:
    assert make_strategy("fedprox", mu=0.5).proximal_mu == 0.5
    assert FedProx().proximal_mu == 0.01
    for name in STRATEGIES:
        if name != "fedprox":
            assert make_strategy(name).proximal_mu == 0.0


def test_fedavgm_by_hand_for_two_rounds() -> None:
    rng = np.random.default_rng(1)
    base = make_model(rng, np.float64)
    strategy = FedAvgM(server_lr=0.5, momentum=0.8)
    x, velocity = vector(base), np.zeros_like(vector(base))
    weights: Mapping[str, np.ndarray] = base
    for _ in range(2):
        mean = perturbed(rng, weights)
        velocity = 0.8 * velocity + (vector(mean) - x)
        x = x + 0.5 * velocity
        weights = strategy.step(weights, mean)
        np.testing.assert_allclose(vector(weights), x, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(weights["bn.num_batches_tracked"], mean["bn.num_batches_tracked"])
    np.testing.assert_allclose(vector(from_vector_state(strategy.state(), "momentum")), velocity, rtol=1e-12)


def from_vector_state(state: Mapping[str, np.ndarray], slot: str) -> dict[str, np.ndarray]:
    return {key.split("/", 1)[1]: array for key, array in state.items() if key.startswith(slot + "/")}


def adaptive_by_hand(kind: str, x: np.ndarray, means: list[np.ndarray], lr: float, b1: float, b2: float, tau: float):
    m, v = np.zeros_like(x), np.full_like(x, tau * tau)
    for target in means:
        d = target - x
        m = b1 * m + (1 - b1) * d
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        elif kind == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, m, v


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_by_hand_for_two_rounds(kind: str) -> None:
    rng = np.random.default_rng(2)
    base = make_model(rng, np.float64)
    settings_ = {"server_lr": 0.03, "beta1": 0.8, "tau": 0.01}
    if kind != "fedadagrad":
        settings_["beta2"] = 0.95
    strategy = make_strategy(kind, **settings_)
    means, weights = [], base
    for _ in range(2):
        mean = perturbed(rng, weights, scale=0.05)
        means.append(vector(mean))
        weights = strategy.step(weights, mean)
    x, m, v = adaptive_by_hand(kind, vector(base), means, 0.03, 0.8, 0.95, 0.01)
    np.testing.assert_allclose(vector(weights), x, rtol=1e-12, atol=1e-12)
    state = strategy.state()
    np.testing.assert_allclose(vector(from_vector_state(state, "m")), m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(vector(from_vector_state(state, "v")), v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_first_adaptive_step_moves_each_coordinate_by_about_server_lr(kind: str) -> None:
    # The documented reason for the default server_lr: without bias correction,
    # m = 0.1 d and sqrt(v) is about 0.1 |d|, so the step is about server_lr whatever d.
    base = {"w": np.zeros(4, dtype=np.float32)}
    mean = {"w": np.array([-3.0, -0.5, 0.5, 3.0], dtype=np.float32)}
    strategy = make_strategy(kind)
    step = strategy.step(base, mean)["w"]
    np.testing.assert_allclose(step, 0.01 * np.sign(mean["w"]), rtol=0.03)


def test_server_optimizers_keep_dtypes_and_leave_integer_tensors_as_the_mean() -> None:
    rng = np.random.default_rng(3)
    base = make_model(rng)
    for name in STATEFUL:
        strategy = make_strategy(name)
        ups = make_updates(rng, base, 3)
        controls = controls_for(rng, base, 3)
        result = run(strategy, base, ups, controls, 3)
        plain = RunningMean(weighted=strategy.weighted)
        for weights, count in ups:
            plain.add(weights, count)
        assert {key: array.dtype for key, array in result.items()} == {key: a.dtype for key, a in base.items()}
        np.testing.assert_array_equal(result["bn.num_batches_tracked"], plain.result()["bn.num_batches_tracked"])
        state = strategy.state()
        assert not any(key.endswith("num_batches_tracked") for key in state)
        assert all(array.dtype == np.float32 for array in state.values())


def test_scaffold_by_hand_with_partial_participation() -> None:
    rng = np.random.default_rng(4)
    base = make_model(rng, np.float64)
    strategy = Scaffold(server_lr=0.5)
    assert Scaffold.uses_control and not Scaffold.weighted and strategy.streaming
    zero = strategy.control(base)
    assert set(zero) == {"conv.weight", "conv.bias", "fc.weight"}
    assert all(not array.any() for array in zero.values())
    c = np.zeros_like(vector(base))
    x, weights = vector(base), base
    for _ in range(2):
        ups = make_updates(rng, weights, 2)
        controls = controls_for(rng, weights, 2)
        # Unweighted over the participants, as in the paper; 2 of 5 workers took part.
        x = x + 0.5 * (np.mean([vector(w) for w, _ in ups], axis=0) - x)
        c = c + 2 / 5 * np.mean([vector(d) for d in controls], axis=0)
        weights = strategy.aggregate(weights, ups, control_deltas=controls, num_workers=5)
        np.testing.assert_allclose(vector(weights), x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(vector(strategy.control(weights)), c, rtol=1e-12, atol=1e-12)
    sent = strategy.control(weights)
    sent["conv.bias"][...] = 99.0  # a copy: the server's variate is unchanged
    np.testing.assert_allclose(vector(strategy.control(weights)), c, rtol=1e-12)


@FAST
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(MEAN_STRATEGIES), n=st.integers(1, 5))
def test_streaming_equals_aggregate(seed: int, name: str, n: int) -> None:
    rng = np.random.default_rng(seed)
    base = make_model(rng)
    whole, streamed = make_strategy(name), make_strategy(name)
    assert isinstance(streamed, MeanStrategy) and streamed.streaming
    left = right = base
    for _ in range(2):  # the second round runs on the state of the first
        ups = make_updates(rng, left, n)
        controls = controls_for(rng, left, n)
        left = run(whole, left, ups, controls, n + 1)
        running = RunningMean(weighted=streamed.weighted)
        for weights, count in ups:
            running.add(weights, count)
        control_mean = None
        if streamed.uses_control:
            folded = RunningMean(weighted=False)
            for delta in controls:
                folded.add(delta, 1)
            control_mean = folded.result()
        right = streamed.step(right, running.result(), control_mean=control_mean, participants=n, num_workers=n + 1)
        assert_same(left, right)
    assert_same(whole.state(), streamed.state())


@FAST
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(STATEFUL))
def test_state_round_trips_and_a_restored_strategy_continues_identically(seed: int, name: str) -> None:
    rng = np.random.default_rng(seed)
    base = make_model(rng)
    original = make_strategy(name)
    assert original.state() == {}
    weights = run(original, base, make_updates(rng, base, 3), controls_for(rng, base, 3), 4)
    saved = original.state()
    restored = make_strategy(name)
    restored.load_state({key: np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for key, a in saved.items()})
    assert_same(restored.state(), saved)
    for key in saved:
        saved[key][...] = 7  # state() is a copy
    left = right = weights
    for _ in range(2):
        ups, controls = make_updates(rng, left, 3), controls_for(rng, left, 3)
        left = run(original, left, ups, controls, 4)
        right = run(restored, right, ups, controls, 4)
        assert_same(left, right)
    assert_same(original.state(), restored.state())


def test_load_state_of_nothing_starts_afresh() -> None:
    rng = np.random.default_rng(5)
    base = make_model(rng)
    mean = perturbed(rng, base)
    used = FedAdam()
    used.step(base, mean)
    used.load_state({})
    assert used.state() == {}
    assert_same(used.step(base, mean), FedAdam().step(base, mean))


# Robust strategies


@st.composite
def float_updates(draw: st.DrawFn, min_size: int = 1) -> list:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    elements = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    count = draw(st.integers(min_size, 7))
    return [
        (
            {
                "w": draw(hnp.arrays(np.float32, shape, elements=elements)),
                "b": draw(hnp.arrays(np.float64, 2, elements=elements)),
            },
            draw(st.integers(1, 100)),
        )
        for _ in range(count)
    ]


@FAST
@given(ups=float_updates())
def test_median_agrees_with_the_middle_of_the_sorted_values(ups: list) -> None:
    result = Median().aggregate(ups[0][0], ups)
    n = len(ups)
    for name in ("w", "b"):
        ordered = np.sort(np.stack([w[name].astype(np.float64) for w, _ in ups]), axis=0)
        expected = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        assert result[name].dtype == ups[0][0][name].dtype
        np.testing.assert_allclose(result[name], expected.astype(ups[0][0][name].dtype), rtol=1e-6)


def _trimmed_reference(stacked: np.ndarray, ratio: float) -> np.ndarray:
    """The trimmed mean by hand: the ratio as the decimal it prints as, floored exactly with Decimal."""
    n = len(stacked)
    cut = int((Decimal(repr(ratio)) * n).to_integral_value(rounding=ROUND_FLOOR))
    return np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)


@FAST
@given(ups=float_updates(), ratio=st.floats(0, 0.49))
def test_trimmed_mean_agrees_with_sorting_by_hand(ups: list, ratio: float) -> None:
    result = TrimmedMean(trim_ratio=ratio).aggregate(ups[0][0], ups)
    for name in ("w", "b"):
        expected = _trimmed_reference(np.stack([w[name].astype(np.float64) for w, _ in ups]), ratio)
        np.testing.assert_allclose(result[name], expected.astype(ups[0][0][name].dtype), rtol=1e-6, atol=1e-4)


@FAST
@given(data=st.data(), n=st.sampled_from([10, 20]), ratio=st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45]))
def test_trimmed_mean_agrees_with_scipy_on_decimal_ratios(data: st.DataObject, n: int, ratio: float) -> None:
    values = data.draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n))
    ups = [({"w": np.array([value])}, 1) for value in values]
    expected = stats.trim_mean(np.array(values), ratio)
    assert trimmed_mean(ups, ratio)["w"][0] == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("ratio, n, cut", [(0.3, 10, 3), (0.15, 20, 3), (0.35, 20, 7), (0.3, 20, 6), (0.15, 10, 1)])
def test_trimmed_mean_cuts_the_decimal_ratio_of_n(ratio: float, n: int, cut: int) -> None:
    # Byzantine updates at 1e6, one fewer than the cut: none may survive it.
    honest = [float(value) for value in range(n - cut)]
    ups = [({"w": np.array([value])}, 1) for value in honest + [1e6] * cut]
    kept = sorted(honest)[cut:]
    assert trimmed_mean(ups, ratio)["w"][0] == pytest.approx(sum(kept) / len(kept))


def test_trimmed_mean_drops_floor_of_ratio_times_n_from_each_end() -> None:
    values = [0.0, 1.0, 2.0, 3.0, 100.0, -50.0, 4.0]
    ups = [({"w": np.array([v])}, 1) for v in values]
    # floor(0.3 * 7) = 2: drops -50, 0 and 4, 100.
    assert trimmed_mean(ups, 0.3)["w"][0] == pytest.approx(2.0)
    # floor(0.1 * 7) = 0: the plain mean.
    assert trimmed_mean(ups, 0.1)["w"][0] == pytest.approx(sum(values) / 7)
    # The floor is exact: 0.2 * 5 is 1 although 0.2 is not exactly 1/5 in binary.
    assert trimmed_mean(ups[:5], 0.2)["w"][0] == pytest.approx(2.0)
    # Just below one half keeps the single median value of an odd count.
    assert trimmed_mean(ups, 0.4999999999999999)["w"][0] == pytest.approx(2.0)


@FAST
@given(data=st.data(), robust=st.sampled_from(["median", "trimmed-mean"]))
def test_median_and_trimmed_mean_are_order_independent(data: st.DataObject, robust: str) -> None:
    ups = data.draw(float_updates(min_size=2))
    order = data.draw(st.permutations(range(len(ups))))
    strategy = make_strategy(robust, **({"trim_ratio": 0.25} if robust == "trimmed-mean" else {}))
    assert_same(strategy.aggregate(ups[0][0], ups), strategy.aggregate(ups[0][0], [ups[i] for i in order]))


def brute_force_krum_scores(ups: list, f: int) -> np.ndarray:
    vectors = [vector(w) for w, _ in ups]
    n = len(vectors)
    scores = []
    for i in range(n):
        distances = sorted(float(np.linalg.norm(vectors[i] - vectors[j])) ** 2 for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return np.array(scores)


@FAST
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 3), extra=st.integers(0, 4))
def test_krum_scores_agree_with_brute_force_and_krum_picks_the_best(seed: int, f: int, extra: int) -> None:
    rng = np.random.default_rng(seed)
    base = make_model(rng, np.float64)
    ups = make_updates(rng, base, f + 3 + extra)
    expected = brute_force_krum_scores(ups, f)
    np.testing.assert_allclose(krum_scores(ups, f), expected, rtol=1e-9)
    result = Krum(byzantine_f=f).aggregate(base, ups)
    chosen = [i for i, (w, _) in enumerate(ups) if all(np.array_equal(w[k], result[k]) for k in w)]
    assert chosen and expected[chosen[0]] <= expected.min() * (1 + 1e-9)


@FAST
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 3), extra=st.integers(0, 3), shift=st.floats(50, 1e4))
def test_krum_picks_an_honest_update_when_byzantine_ones_are_far(seed: int, f: int, extra: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    base = make_model(rng)
    honest = [(perturbed(rng, base, 0.01), 10) for _ in range(f + 3 + extra)]  # n >= 2f + 3
    direction = rng.normal(size=vector(base).size)
    offset = from_vector(shift * direction / np.linalg.norm(direction), base)
    byzantine = [
        ({k: (a + offset[k]).astype(a.dtype) if k in offset else a for k, a in perturbed(rng, base, 0.01).items()}, 10)
        for _ in range(f)
    ]
    ups = byzantine + honest
    order = rng.permutation(len(ups))
    ups = [ups[i] for i in order]
    honest_vectors = [vector(w) for w, _ in honest]
    result = Krum(byzantine_f=f).aggregate(base, ups)
    assert any(np.array_equal(vector(result), v) for v in honest_vectors)
    # Multi-Krum with its default m = n - f averages exactly the honest updates.
    multi = MultiKrum(byzantine_f=f).aggregate(base, ups)
    np.testing.assert_allclose(vector(multi), np.mean(honest_vectors, axis=0), rtol=1e-5, atol=1e-6)


def test_multi_krum_with_m_one_is_krum_and_averages_the_best_m() -> None:
    rng = np.random.default_rng(6)
    base = make_model(rng, np.float64)
    ups = make_updates(rng, base, 7)
    assert_same(MultiKrum(byzantine_f=2, m=1).aggregate(base, ups), Krum(byzantine_f=2).aggregate(base, ups))
    best = np.argsort(brute_force_krum_scores(ups, 2))[:3]
    result = MultiKrum(byzantine_f=2, m=3).aggregate(base, ups)
    np.testing.assert_allclose(vector(result), np.mean([vector(ups[i][0]) for i in best], axis=0), rtol=1e-12)


def test_krum_distances_ignore_integer_counters() -> None:
    # Counters say how many batches a worker ran, not where its model is.
    close = [({"w": np.array([0.0, 0.1 * i]), "n": np.array(1000 * i)}, 1) for i in range(4)]
    far = [({"w": np.array([5.0, 5.0]), "n": np.array(0)}, 1)]
    np.testing.assert_allclose(krum_scores(close + far, 1)[:4], krum_scores([(w, 1) for w, _ in close] + far, 1)[:4])
    assert Krum(byzantine_f=1).aggregate(far[0][0], close + far)["w"][0] == 0.0


@st.composite
def exact_model(draw: st.DrawFn) -> dict[str, np.ndarray]:
    return {
        "w": draw(
            hnp.arrays(
                np.float32,
                hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
                elements=st.floats(-1e3, 1e3, width=32),
            )
        ),
        "n": draw(hnp.arrays(np.int64, 2, elements=st.integers(0, 2**40))),
    }


@FAST
@given(
    weights=exact_model(),
    base=exact_model(),
    name=st.sampled_from(["fedavg", "mean", "fedprox", "fedavgm", "scaffold", *ROBUST_STRATEGIES]),
    counts=st.lists(st.integers(1, 10_000), min_size=4, max_size=6),  # krum: n >= f + 3 with f = 1
)
def test_equal_updates_give_the_same_weights(weights: dict, base: dict, name: str, counts: list[int]) -> None:
    # With server_lr 1 and fresh state, FedAvgM's first step and SCAFFOLD's are the mean.
    base = {"w": np.resize(base["w"], weights["w"].shape).astype(np.float32), "n": base["n"]}
    strategy = make_strategy(name)
    ups = [(weights, count) for count in counts]
    controls = [{"w": np.zeros_like(weights["w"])} for _ in counts]
    result = run(strategy, base, ups, controls, len(counts))
    assert result["w"].dtype == np.float32 and result["n"].dtype == np.int64
    np.testing.assert_array_equal(result["n"], weights["n"])
    if name in ("fedavgm", "scaffold"):  # x + (mean - x), in float64, rounds back to the mean
        # up to float64 cancellation against the global weights: 1 + (1e-20 - 1) is 0.
        scale = np.abs(base["w"]).astype(np.float64) + np.abs(weights["w"])
        assert np.all(np.abs(result["w"] - weights["w"].astype(np.float64)) <= 1e-7 * scale)
    else:
        np.testing.assert_array_equal(result["w"], weights["w"])


def test_results_follow_the_global_order_and_do_not_alias_inputs() -> None:
    rng = np.random.default_rng(7)
    base = make_model(rng)
    ups = [({name: w[name] for name in reversed(list(w))}, c) for w, c in make_updates(rng, base, 4)]
    for name in STRATEGIES:
        result = run(make_strategy(name), base, ups, controls_for(rng, base, 4), 4)
        assert list(result) == list(base)
        assert not any(np.shares_memory(result[k], w[k]) for w, _ in ups for k in w)


# Registry and errors


def test_registry_names_flags_and_descriptions() -> None:
    assert list(STRATEGIES) == [*MEAN_STRATEGIES, *ROBUST_STRATEGIES]
    assert all(STRATEGIES[name].name == name for name in STRATEGIES)
    assert [name for name in STRATEGIES if STRATEGIES[name].streaming] == MEAN_STRATEGIES
    assert [name for name in STRATEGIES if STRATEGIES[name].uses_control] == ["scaffold"]
    assert make_strategy("fedavg").describe() == {"name": "fedavg"}
    assert make_strategy("fedadam", server_lr=0.1).describe() == {
        "name": "fedadam",
        "server_lr": 0.1,
        "beta1": 0.9,
        "tau": 0.001,
        "beta2": 0.99,
    }
    assert FedAdagrad().describe() == {"name": "fedadagrad", "server_lr": 0.1, "beta1": 0.9, "tau": 0.001}
    assert MultiKrum(byzantine_f=1).describe() == {"name": "multi-krum", "byzantine_f": 1}
    assert MultiKrum(m=2).describe() == {"name": "multi-krum", "byzantine_f": 1, "m": 2}
    assert TrimmedMean().describe() == {"name": "trimmed-mean", "trim_ratio": 0.2}
    assert isinstance(make_strategy("syncfed.strategies:FedYogi", beta2=0.9), FedYogi)
    assert make_strategy("fedavgm", momentum=0).momentum == 0.0
    assert isinstance(make_strategy("krum", byzantine_f=np.int64(2)).byzantine_f, int)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "fedsgd",
            "strategy 'fedsgd' is not one of fedavg, mean, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold, "
            "median, trimmed-mean, krum, multi-krum nor an import path like mypkg.strategies:Mine",
        ),
        (
            "nosuchmodule_xyz:Thing",
            "cannot import strategy 'nosuchmodule_xyz:Thing': No module named 'nosuchmodule_xyz'",
        ),
        (
            "syncfed.strategies:Nothing",
            "cannot import strategy 'syncfed.strategies:Nothing': "
            "module 'syncfed.strategies' has no attribute 'Nothing'",
        ),
        (
            "syncfed.strategies:make_strategy",
            "strategy 'syncfed.strategies:make_strategy' is not a concrete subclass of syncfed.strategies.Strategy",
        ),
        (
            "syncfed.strategies:MeanStrategy",
            "strategy 'syncfed.strategies:MeanStrategy' is not a concrete subclass of syncfed.strategies.Strategy",
        ),
    ],
)
def test_make_strategy_name_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy(name)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "settings_", "message"),
    [
        ("fedavg", {"mu": 0.1}, "strategy fedavg has no setting 'mu'; its settings are none"),
        (
            "fedadagrad",
            {"beta2": 0.9},
            "strategy fedadagrad has no setting 'beta2'; its settings are server_lr, beta1, tau",
        ),
        ("fedprox", {"mu": -0.1}, "strategy fedprox setting mu is -0.1, expected a number >= 0"),
        ("fedprox", {"mu": float("nan")}, "strategy fedprox setting mu is nan, expected a number >= 0"),
        ("fedavgm", {"server_lr": 0}, "strategy fedavgm setting server_lr is 0, expected a number > 0"),
        ("fedavgm", {"server_lr": float("inf")}, "strategy fedavgm setting server_lr is inf, expected a number > 0"),
        ("fedavgm", {"momentum": 1.0}, "strategy fedavgm setting momentum is 1.0, expected a number in [0, 1)"),
        ("fedadam", {"beta1": "0.9"}, "strategy fedadam setting beta1 is '0.9', expected a number in [0, 1)"),
        ("fedyogi", {"beta2": True}, "strategy fedyogi setting beta2 is True, expected a number in [0, 1)"),
        ("fedadam", {"tau": 0.0}, "strategy fedadam setting tau is 0.0, expected a number > 0"),
        (
            "trimmed-mean",
            {"trim_ratio": 0.5},
            "strategy trimmed-mean setting trim_ratio is 0.5, expected a number in [0, 0.5)",
        ),
        ("krum", {"byzantine_f": 1.0}, "strategy krum setting byzantine_f is 1.0, expected an integer >= 0"),
        ("krum", {"byzantine_f": -1}, "strategy krum setting byzantine_f is -1, expected an integer >= 0"),
        ("multi-krum", {"m": 0}, "strategy multi-krum setting m is 0, expected an integer >= 1"),
    ],
)
def test_make_strategy_setting_errors(name: str, settings_: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy(name, **settings_)
    assert str(info.value) == message


def test_aggregation_errors() -> None:
    rng = np.random.default_rng(8)
    base = make_model(rng)
    ups = make_updates(rng, base, 3)
    with pytest.raises(AggregationError) as info:
        Krum(byzantine_f=1).aggregate(base, ups)
    assert str(info.value) == "krum with byzantine_f 1 needs at least 4 updates, got 3"
    with pytest.raises(AggregationError) as info:
        MultiKrum(m=4).aggregate(base, ups)
    assert str(info.value) == "multi-krum with m 4 needs at least 4 updates, got 3"
    for name in STRATEGIES:
        with pytest.raises(AggregationError) as info:
            run(make_strategy(name), base, [], [], 1)
        assert str(info.value) == "no updates to aggregate"
        bad = [*ups[:2], ({**ups[2][0], "fc.weight": np.zeros((3, 2), np.float32)}, 5)]
        with pytest.raises(AggregationError) as info:
            run(make_strategy(name), base, bad, controls_for(rng, base, 3), 3)
        assert str(info.value) == "update 2 has tensor fc.weight of shape (3, 2), update 0 has (2, 3)"
        other = {**base, "conv.bias": base["conv.bias"].astype(np.float64)}
        with pytest.raises(AggregationError) as info:
            run(make_strategy(name), other, ups, controls_for(rng, base, 3), 3)
        assert "tensor conv.bias of dtype float32, the global model has float64" in str(info.value)


def test_control_variate_errors() -> None:
    rng = np.random.default_rng(9)
    base = make_model(rng)
    ups = make_updates(rng, base, 2)
    controls = controls_for(rng, base, 2)
    with pytest.raises(ConfigError) as info:
        FedAvg().aggregate(base, ups, control_deltas=controls)
    assert str(info.value) == "strategy fedavg does not use control variates"
    with pytest.raises(ConfigError) as info:
        Median().aggregate(base, ups, control_deltas=controls)
    assert str(info.value) == "strategy median does not use control variates"
    with pytest.raises(ConfigError) as info:
        Mean().control(base)
    assert str(info.value) == "strategy mean does not use control variates"
    with pytest.raises(ConfigError) as info:
        Scaffold().aggregate(base, ups)
    assert str(info.value) == "strategy scaffold needs the workers' control deltas"
    with pytest.raises(AggregationError) as info:
        Scaffold().aggregate(base, ups, control_deltas=controls[:1])
    assert str(info.value) == "got 1 control deltas for 2 updates"
    with pytest.raises(AggregationError) as info:
        Scaffold().aggregate(base, ups, control_deltas=[controls[0], {**controls[1], "extra": np.zeros(1)}])
    assert str(info.value) == "control delta 1 has different tensors than control delta 0 (missing [], extra ['extra'])"
    with_counter = [{**delta, "bn.num_batches_tracked": np.array(0)} for delta in controls]
    with pytest.raises(AggregationError) as info:
        Scaffold().aggregate(base, ups, control_deltas=with_counter)
    assert str(info.value) == (
        "the mean control delta has different tensors than the server control variate "
        "(missing [], extra ['bn.num_batches_tracked'])"
    )
    with pytest.raises(ConfigError) as info:
        Scaffold().aggregate(base, ups, control_deltas=controls, num_workers=1)
    assert str(info.value) == "participants 2 exceed num_workers 1"
    # Asynchronous buffers may hold several updates of one worker: only SCAFFOLD needs participants <= workers.
    FedAvg().step(base, ups[0][0], participants=5, num_workers=3)
    with pytest.raises(ConfigError) as info:
        FedAvg().step(base, ups[0][0], participants=0)
    assert str(info.value) == "participants 0 is not a positive integer"


def test_state_errors() -> None:
    rng = np.random.default_rng(10)
    base = make_model(rng)
    with pytest.raises(ConfigError) as info:
        FedAvg().load_state({"momentum/w": np.zeros(1)})
    assert str(info.value) == "strategy fedavg keeps no server state, got 1 tensors"
    FedAvg().load_state({})
    with pytest.raises(ConfigError) as info:
        FedAvgM().load_state({"velocity/w": np.zeros(1)})
    assert (
        str(info.value)
        == "strategy fedavgm state has tensor 'velocity/w', expected slot/tensor with slot one of momentum"
    )
    with pytest.raises(ConfigError) as info:
        FedAdam().load_state({"m/w": np.zeros(2), "v/w": np.zeros(3)})
    assert str(info.value) == "strategy fedadam state v has tensor w of shape (3,), state m has (2,)"
    with pytest.raises(ConfigError) as info:
        FedAdam().load_state({"m/w": np.zeros(2)})
    assert str(info.value) == "strategy fedadam state v has different tensors than state m (missing ['w'], extra [])"
    with pytest.raises(ConfigError) as info:
        Scaffold().load_state({"control/n": np.zeros(2, dtype=np.int64)})
    assert str(info.value) == "strategy scaffold state tensor control/n has dtype int64, not floating-point"
    strategy = FedAvgM()
    strategy.load_state({"momentum/conv.weight": np.zeros((3, 2, 2), np.float32)})
    with pytest.raises(AggregationError) as info:
        strategy.step(base, perturbed(rng, base))
    assert str(info.value) == (
        "fedavgm state momentum has different tensors than the global model's floating-point tensors "
        "(missing ['conv.bias', 'fc.weight'], extra [])"
    )
    assert strategy.state().keys() == {"momentum/conv.weight"}  # a failed step changes nothing
