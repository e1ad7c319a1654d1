"""Staleness functions and the FedBuff update buffer against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.exceptions import AggregationError, ConfigError
from syncfed.staleness import STALENESS_POLICIES, UpdateBuffer, staleness_weight
from syncfed.strategies import FedAvg

FAST = settings(max_examples=30, deadline=None)


@pytest.mark.parametrize(
    ("policy", "staleness", "a", "b", "expected"),
    [
        ("constant", 0, 0.5, 4, 1.0),
        ("constant", 100, 0.5, 4, 1.0),
        ("polynomial", 0, 0.5, 4, 1.0),
        ("polynomial", 3, 0.5, 4, 0.5),  # 1 / sqrt(4): FedBuff's scaling
        ("polynomial", 8, 1.0, 4, 1 / 9),
        ("polynomial", 5, 0.0, 4, 1.0),
        ("hinge", 4, 10.0, 4, 1.0),
        ("hinge", 5, 10.0, 4, 1 / 11),
        ("hinge", 7, 0.5, 4, 1 / 2.5),
        ("hinge", 0, 0.5, 0, 1.0),
    ],
)
def test_staleness_weight_values(policy: str, staleness: int, a: float, b: int, expected: float) -> None:
    assert staleness_weight(policy, staleness, a=a, b=b) == pytest.approx(expected, rel=1e-15)


def test_staleness_weight_defaults() -> None:
    assert STALENESS_POLICIES == ("constant", "polynomial", "hinge")
    assert staleness_weight("polynomial", 8) == pytest.approx(1 / 3)
    assert staleness_weight("hinge", 4) == 1.0
    assert staleness_weight("hinge", 6) == pytest.approx(1 / 2)


@FAST
@given(
    policy=st.sampled_from(STALENESS_POLICIES),
    staleness=st.integers(0, 10_000),
    a=st.floats(0, 20),
    b=st.integers(0, 50),
)
def test_staleness_weight_is_in_0_1_and_never_grows_with_staleness(
    policy: str, staleness: int, a: float, b: int
) -> None:
    weight = staleness_weight(policy, staleness, a=a, b=b)
    assert 0 < weight <= 1
    assert staleness_weight(policy, staleness + 1, a=a, b=b) <= weight


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: staleness_weight("linear", 1), "staleness policy 'linear' is not one of constant, polynomial, hinge"),
        (lambda: staleness_weight("hinge", -1), "staleness -1 is not a non-negative integer"),
        (lambda: staleness_weight("hinge", 1.0), "staleness 1.0 is not a non-negative integer"),
        (lambda: staleness_weight("constant", True), "staleness True is not a non-negative integer"),
        (lambda: staleness_weight("polynomial", 1, a=-0.5), "staleness parameter a is -0.5, expected a number >= 0"),
        (lambda: staleness_weight("polynomial", 1, a=math.inf), "staleness parameter a is inf, expected a number >= 0"),
        (lambda: staleness_weight("hinge", 1, b=-1), "staleness parameter b is -1, expected an integer >= 0"),
        (lambda: staleness_weight("hinge", 1, b=2.0), "staleness parameter b is 2.0, expected an integer >= 0"),
        (lambda: UpdateBuffer(0), "buffer size 0 is not a positive integer"),
        (lambda: UpdateBuffer(2, server_lr=0.0), "server_lr 0.0 is not a positive number"),
        (lambda: UpdateBuffer(2, policy="exp"), "staleness policy 'exp' is not one of constant, polynomial, hinge"),
        (lambda: UpdateBuffer(2, max_staleness=-1), "staleness -1 is not a non-negative integer"),
    ],
)
def test_errors(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert str(info.value) == message


def model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(2, 3)).astype(np.float32),
        "b": rng.normal(size=3),
        "n": np.array([rng.integers(0, 1000)], dtype=np.int64),
    }


def delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(2, 3)).astype(np.float32),
        "b": rng.normal(size=3),
        "n": np.array([rng.integers(0, 50)], dtype=np.int64),
    }


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    stalenesses=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    policy=st.sampled_from(STALENESS_POLICIES),
    server_lr=st.floats(0.1, 2.0),
)
def test_apply_is_the_fedbuff_step(seed: int, stalenesses: list[int], policy: str, server_lr: float) -> None:
    rng = np.random.default_rng(seed)
    x = model(rng)
    deltas = [delta(rng) for _ in stalenesses]
    buffer = UpdateBuffer(len(stalenesses), server_lr=server_lr, policy=policy, a=0.7, b=3)
    for d, s in zip(deltas, stalenesses, strict=True):
        assert not buffer.full
        assert buffer.add(d, s) is True
    assert buffer.full and buffer.count == len(stalenesses)
    assert buffer.stalenesses == tuple(stalenesses)
    result = buffer.apply(x)
    # The hand computation: the discount written out per policy, then x + lr * mean of discounted deltas.
    if policy == "constant":
        discounts = [1.0] * len(stalenesses)
    elif policy == "polynomial":
        discounts = [1 / (1 + s) ** 0.7 for s in stalenesses]
    else:
        discounts = [1.0 if s <= 3 else 1 / (0.7 * (s - 3) + 1) for s in stalenesses]
    for name in ("w", "b"):
        weighted = np.stack([f * d[name].astype(np.float64) for f, d in zip(discounts, deltas, strict=True)])
        expected = x[name] + server_lr * weighted.mean(axis=0)
        assert result[name].dtype == x[name].dtype
        np.testing.assert_allclose(result[name], expected, rtol=1e-5 if name == "w" else 1e-12, atol=1e-6)
    # Integer counters: the plain mean delta, rounded, neither discounted nor scaled.
    counter = x["n"] + np.rint(np.mean([d["n"] for d in deltas], axis=0)).astype(np.int64)
    np.testing.assert_array_equal(result["n"], counter)
    assert result["n"].dtype == np.int64
    assert buffer.count == 0 and not buffer.full and buffer.stalenesses == ()


@FAST
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(2, 5), data=st.data())
def test_apply_is_order_independent(seed: int, count: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    x = model(rng)
    items = [(delta(rng), int(rng.integers(0, 10))) for _ in range(count)]
    order = data.draw(st.permutations(range(count)))
    results = []
    for arrangement in (items, [items[i] for i in order]):
        buffer = UpdateBuffer(count, policy="hinge", a=0.5, b=2)
        for d, s in arrangement:
            buffer.add(d, s)
        results.append(buffer.apply(x))
    for name in x:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-6)


def test_one_fresh_update_with_constant_weight_is_plain_sgd_on_the_delta() -> None:
    rng = np.random.default_rng(1)
    x, d = model(rng), delta(rng)
    buffer = UpdateBuffer(1, policy="constant")
    assert buffer.add(d, 0) and buffer.full
    result = buffer.apply(x)
    for name in x:
        np.testing.assert_allclose(result[name], x[name] + d[name], rtol=1e-6)
    # With server_lr 1 the result is a mean model that a strategy's step takes as is.
    assert FedAvg().step(x, result)["w"] is result["w"]


def test_too_stale_updates_are_discarded_and_leave_the_buffer_alone() -> None:
    rng = np.random.default_rng(2)
    x = model(rng)
    buffer = UpdateBuffer(2, policy="constant", max_staleness=3)
    first = delta(rng)
    assert buffer.add(first, 3)
    assert buffer.add(delta(rng), 4) is False
    assert buffer.count == 1 and buffer.stalenesses == (3,)
    result = buffer.apply(x)  # a buffer that is not full can still be applied
    np.testing.assert_allclose(result["b"], x["b"] + first["b"])


def test_buffer_errors() -> None:
    rng = np.random.default_rng(3)
    x = model(rng)
    buffer = UpdateBuffer(2)
    with pytest.raises(AggregationError) as info:
        buffer.apply(x)
    assert str(info.value) == "the update buffer is empty"
    first = delta(rng)
    buffer.add(first, 0)
    with pytest.raises(AggregationError) as info:
        buffer.add({**delta(rng), "w": np.zeros((3, 2), np.float32)}, 0)
    assert str(info.value) == "delta 1 has tensor w of shape (3, 2), delta 0 in the buffer has (2, 3)"
    with pytest.raises(ConfigError) as info:
        buffer.add(delta(rng), -2)
    assert str(info.value) == "staleness -2 is not a non-negative integer"
    assert buffer.count == 1  # rejected deltas left nothing behind
    with pytest.raises(AggregationError) as info:
        buffer.apply({**x, "b": x["b"].astype(np.float32)})
    assert str(info.value) == "the buffer has tensor b of dtype float64, the global model has float32"
    assert buffer.count == 1  # kept for a retry
    buffer.add(delta(rng), 1)
    with pytest.raises(ConfigError) as info:
        buffer.add(delta(rng), 0)
    assert str(info.value) == "update buffer holds 2 of 2 updates; apply it before adding more"
    buffer.apply(x)
    assert buffer.add({"other": np.zeros(1)}, 0)  # an empty buffer starts over from its next delta
