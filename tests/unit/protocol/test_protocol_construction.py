"""The wire protocol, construction: an invalid message cannot be built, limits are inclusive,
and messages are frozen."""

from __future__ import annotations

import dataclasses
import math

import pytest

from syncfed.exceptions import ProtocolError
from syncfed.protocol import (
    MAX_ID,
    MAX_SHARD,
    Error,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Hello,
    Info,
    Ping,
    TrainingPlan,
    encode,
)

INVALID = [
    lambda: Hello("1"),
    lambda: Hello(True),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=-1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.0, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=math.nan, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=math.inf, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=True, seed=0),
    lambda: TrainingPlan(round=0, batch_size=32, num_batches=10, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=0, num_batches=10, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=1_000_001, num_batches=10, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=-1, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=1_000_001, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=-1),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=2**63),
    lambda: TrainingPlan(round=1, batch_size=32.0, num_batches=10, lr=0.1, seed=0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=0, clip=1.0),  # clip needs delta
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=0, delta=True, clip=0.0),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=0, delta=True, noise_std=0.1),
    lambda: TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=0, delta=True, clip=1, noise_std=-1),
    lambda: Error(code="nope", reason="x"),
    lambda: Error(code="internal", reason="x" * 1001),
    lambda: Error(code="internal", reason=None),
    lambda: EvalResult(loss=0.1, correct=1, num_examples=5, predictions=(1, 2)),
    lambda: EvalResult(loss=0.1, correct=6, num_examples=5, predictions=(5,)),
    lambda: EvalResult(loss=0.1, correct=-1, num_examples=5, predictions=(5,)),
    lambda: EvalResult(loss=0.1, correct=0, num_examples=0, predictions=(0,)),
    lambda: EvalResult(loss=math.nan, correct=1, num_examples=5, predictions=(5,)),
    lambda: EvalResult(loss=0.1, correct=1, num_examples=5, predictions=(6, -1)),
    lambda: FitResult({}, num_examples=0, loss=0.1),
    lambda: FitResult({}, num_examples=True, loss=0.1),
    lambda: FitResult({}, num_examples=1, loss=math.inf),
    lambda: FitResult({}, num_examples=1, loss=0.1, seconds=-0.5),
    lambda: FitResult({}, num_examples=MAX_SHARD + 1, loss=0.1),
    lambda: Info("a", "trainer", "digits", (1, 8, 8), 2, (MAX_SHARD, 1), ()),
    lambda: Info("a", "trainer", "digits", (1, 8, 8), 1, (1,), (), validation_size=MAX_SHARD + 1),
    lambda: Evaluate("m", {}, batch_size=0),
    lambda: Evaluate("", {}, batch_size=1),
    lambda: Fit("", {}, TrainingPlan(round=1, batch_size=1, num_batches=1, lr=0.1, seed=0)),
    lambda: Fit("x" * 257, {}, TrainingPlan(round=1, batch_size=1, num_batches=1, lr=0.1, seed=0)),
    lambda: Info("a", "boss", "digits", (1, 8, 8), 2, (1, 1), ()),
    lambda: Info("a", "trainer", "digits", (1, 8, 8), 3, (1, 1), ()),
    lambda: Info("a", "trainer", "digits", (), 2, (1, 1), ()),
    lambda: Info("a", "trainer", "digits", (1, 0), 2, (1, 1), ()),
    lambda: Info("", "trainer", "digits", (1, 8, 8), 2, (1, 1), ()),
    lambda: Info("a", "trainer", "digits", (1, 8, 8), 2, (1, 1), ("",)),
]


@pytest.mark.parametrize("build", INVALID, ids=range(len(INVALID)))
def test_invalid_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(ProtocolError):
        build()  # type: ignore[operator]


def test_construction_error_texts() -> None:
    with pytest.raises(ProtocolError) as info:
        TrainingPlan(round=1, batch_size=32, num_batches=10, lr=-1, seed=0)
    assert str(info.value) == "lr must be a positive finite number, not -1"
    with pytest.raises(ProtocolError) as info:
        Error(code="nope", reason="x")
    assert str(info.value) == "error code 'nope' is unknown"
    with pytest.raises(ProtocolError) as info:
        EvalResult(loss=0.1, correct=1, num_examples=5, predictions=(1, 2))
    assert str(info.value) == "predictions must sum to num_examples"


def test_limits_of_names_and_reasons_are_inclusive() -> None:
    assert Error("internal", "x" * 1000).reason == "x" * 1000
    assert Evaluate("m" * 256, {}, batch_size=1_000_000).model == "m" * 256
    assert Info("a" * 256, "evaluator", "d", (1,) * 8, 1, (0,), ()).worker_id == "a" * 256


# Regression test for a bug once in syncfed/protocol.py, Fit/FitResult/Evaluate.__post_init__.
@pytest.mark.parametrize(
    "build",
    [
        lambda: Fit("m", "not weights", None),  # type: ignore[arg-type]
        lambda: Fit("m", {}, None),  # type: ignore[arg-type]
        lambda: FitResult({"w": [1.0, 2.0]}, 1, 0.0),  # type: ignore[dict-item]
        lambda: Evaluate("m", None, 1),  # type: ignore[arg-type]
    ],
)
def test_requests_with_invalid_weights_or_plan_cannot_be_built(build: object) -> None:
    with pytest.raises((ProtocolError, TypeError)):
        build()  # type: ignore[operator]


def test_messages_are_frozen() -> None:
    error = Error("internal", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        error.code = "busy"  # type: ignore[misc]
    plan = TrainingPlan(round=1, batch_size=1, num_batches=1, lr=0.1, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lr = 10.0  # type: ignore[misc]


def test_lists_become_tuples() -> None:
    info = Info("a", "trainer", "digits", [1, 8, 8], 2, [3, 4], ["digits-cnn"])  # type: ignore[arg-type]
    assert info.input_shape == (1, 8, 8) and info.histogram == (3, 4) and info.models == ("digits-cnn",)
    assert info.num_examples == 7
    result = EvalResult(0.5, 3, 4, [1, 3])  # type: ignore[arg-type]
    assert result.predictions == (1, 3) and result.accuracy == 0.75


@pytest.mark.parametrize("request_id", [-1, MAX_ID + 1, True, 1.5, "1"])
def test_encode_rejects_bad_request_ids(request_id: object) -> None:
    with pytest.raises(ValueError, match="request id"):
        encode(request_id, Ping())  # type: ignore[arg-type]


def test_claimed_example_counts_are_bounded_at_the_limit() -> None:
    """What a worker says it holds sizes secure rounds and weighs its update: 2**32 at most (issue 14)."""
    assert FitResult({}, num_examples=MAX_SHARD, loss=0.1).num_examples == MAX_SHARD
    info = Info("a", "trainer", "digits", (1, 8, 8), 2, (MAX_SHARD - 1, 1), (), validation_size=MAX_SHARD)
    assert info.num_examples == MAX_SHARD
    with pytest.raises(ProtocolError, match="^histogram of 4294967297 examples exceeds limit of 4294967296$"):
        Info("a", "trainer", "digits", (1, 8, 8), 2, (MAX_SHARD, 1), ())
