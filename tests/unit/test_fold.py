"""The round's fold, one interface for plain and private rounds: valid updates folded, invalid ones a Failure."""

from __future__ import annotations

import numpy as np
import pytest

from syncfed.exceptions import AggregationError
from syncfed.failure import Failure
from syncfed.fold import Fold, PrivateFold, StreamingFold
from syncfed.protocol import FitResult
from syncfed.strategies import make_strategy

REFERENCE = {"w": np.zeros(4, np.float32), "n": np.array(3, np.int64)}


def update(value: float, count: int, loss: float = 0.5) -> FitResult:
    return FitResult({"w": np.full(4, value, np.float32), "n": np.array(3, np.int64)}, count, loss)


def plain(strategy: str = "fedavg", *, keep: bool = False) -> StreamingFold:
    return StreamingFold(make_strategy(strategy), REFERENCE, keep=keep, delta=False, held={"a": 10, "b": 10, "c": 10})


def test_a_streaming_fold_gives_the_weighted_mean() -> None:
    fold: Fold = plain(keep=True)
    assert isinstance(fold, StreamingFold)
    assert fold.add("a", update(1.0, 1)) is None and fold.add("b", update(4.0, 2)) is None
    np.testing.assert_allclose(fold.aggregate(num_workers=2)["w"], np.full(4, 3.0, np.float32))
    assert fold.losses == {"a": 0.5, "b": 0.5} and fold.examples == {"a": 1, "b": 2}
    assert list(fold.kept) == ["a", "b"] and fold.total_examples is None and fold.dp_epsilons == {}


def test_a_robust_strategy_keeps_every_update_for_its_rule() -> None:
    fold = plain("median")
    for name, value in (("a", 1.0), ("b", 100.0), ("c", 2.0)):
        assert fold.add(name, update(value, 1)) is None
    np.testing.assert_array_equal(fold.aggregate(num_workers=3)["w"], np.full(4, 2.0, np.float32))


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (update(1.0, 11), "num_examples 11 exceeds the 10 examples the worker's hello claimed"),
        (FitResult({"w": np.zeros(4, np.float32)}, 1, 0.5), "tensors ['n'] do not match the model's"),
        (
            FitResult({"w": np.zeros(5, np.float32), "n": np.array(3, np.int64)}, 1, 0.5),
            "tensor w is float32[5], the model's is float32[4]",
        ),
        (update(np.nan, 1), "tensor w holds 4 non-finite values (nan)"),
    ],
)
def test_an_invalid_update_is_a_failure_and_is_not_folded(reply: FitResult, reason: str) -> None:
    fold = plain()
    failure = fold.add("a", reply)
    assert failure == Failure("invalid update", reason)
    assert str(failure) == f"invalid update: {reason}"
    assert fold.losses == {} and fold.examples == {}
    with pytest.raises(AggregationError):
        fold.aggregate(num_workers=1)


def test_scaffold_updates_need_a_control_delta() -> None:
    strategy = make_strategy("scaffold")
    fold = StreamingFold(
        strategy, REFERENCE, keep=False, delta=False, held={"a": 10}, control=strategy.needs(REFERENCE).control
    )
    assert fold.add("a", update(1.0, 1)) == Failure("invalid update", "no control variate update (SCAFFOLD)")


def test_a_private_fold_reads_like_a_plain_one() -> None:
    mean = np.full(4, 0.25)  # the mean update of the float tensors, flat
    fold: Fold = PrivateFold(make_strategy("fedavg"), REFERENCE, mean, {"a": 0.1, "b": 0.2}, {"a": 3, "b": 4}, 7)
    weights = fold.aggregate(num_workers=2)
    np.testing.assert_array_equal(weights["w"], np.full(4, 0.25, np.float32))
    assert weights["n"] == 3 and fold.total_examples == 7
    assert fold.kept == {} and fold.compression_errors == {} and fold.dp_epsilons == {}


def test_a_private_fold_without_a_sum_refuses_to_aggregate() -> None:
    with pytest.raises(AggregationError, match="no updates to aggregate"):
        PrivateFold(make_strategy("fedavg"), REFERENCE, None, {}, {}).aggregate(num_workers=1)


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (Failure("timeout", "no reply to fit within 1 s"), "timeout: no reply to fit within 1 s"),
        (Failure("error reply", "internal: boom"), "error reply: internal: boom"),
        (Failure("invalid reply", "bad kind"), "invalid reply: bad kind"),
        (Failure("not connected", "connection closed"), "not connected (connection closed)"),
        (Failure("unavailable", "worker a is unavailable"), "worker a is unavailable"),
        (Failure("round", "secure aggregation aborted: too few"), "secure aggregation aborted: too few"),
    ],
)
def test_a_failure_reads_as_the_metrics_always_wrote_it(failure: Failure, text: str) -> None:
    assert str(failure) == text
