"""Folding a streamed update as its fragments arrive: the same mean, bit for bit, as folding it whole;
a header the fold refuses never touches the sums; a reply that breaks off or turns non-finite part way
poisons the fold instead of counting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.absorption import FragmentRoute, FragmentSink
from syncfed.exceptions import RemoteProtocolError
from syncfed.failure import Failure
from syncfed.fold import StreamingFold
from syncfed.protocol import FitResult, MessageDecoder, encode_fragments
from syncfed.strategies import make_strategy
from syncfed.tensors import Weights

HELD = {"a": 1000, "b": 1000, "c": 1000}
#: Small fragments, so that elements and tensors straddle them.
CHUNK = 64


def reference(seed: int = 0) -> Weights:
    generator = np.random.default_rng(seed)
    return {
        "conv.weight": generator.standard_normal((5, 7)).astype(np.float32),
        "conv.bias": generator.standard_normal(3).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "fc.weight": generator.standard_normal((11, 4)).astype(np.float64),
    }


def fold(model: Weights) -> StreamingFold:
    return StreamingFold(make_strategy("fedavg"), model, keep=False, delta=False, held=HELD, fragments=True)


def stream(reply: FitResult, request_id: int = 7, chunk_size: int = CHUNK, compression: str = "none") -> bytes:
    outgoing = encode_fragments(request_id, reply, chunk_size=chunk_size, compression=compression)
    assert outgoing.streamed
    return bytes(outgoing)


def pieces(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at the given sizes in turn (cycled), as fragments of a websocket message."""
    start, index = 0, 0
    while start < len(data):
        size = sizes[index % len(sizes)]
        yield data[start : start + size]
        start, index = start + size, index + 1


def receive(route: FragmentRoute | None, data: bytes, sizes: Sequence[int] = (CHUNK,)) -> FitResult:
    decoder = MessageDecoder(max_size=2**20, route=route)
    for piece in pieces(data, sizes):
        decoder.feed(piece)
    message = decoder.finish().message
    assert isinstance(message, FitResult)
    return message


def trained(model: Weights, generator: np.random.Generator) -> Weights:
    """``model`` moved a little, as a worker's update is."""
    return {
        name: (array + generator.standard_normal(array.shape).astype(array.dtype) * 0.01)
        if array.dtype.kind == "f"
        else np.asarray(array + 1)
        for name, array in model.items()
    }


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    counts=st.lists(st.integers(1, 1000), min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5),
    streamed=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_folding_from_fragments_gives_the_whole_folds_mean_bit_for_bit(
    seed: int, counts: list[int], sizes: list[int], streamed: list[bool]
) -> None:
    """Any cut of the stream (elements split across fragments), any mix of streamed and whole replies."""
    generator = np.random.default_rng(seed)
    model = reference(seed % 7)
    replies = [FitResult(trained(model, generator), count, 0.25) for count in counts]
    whole, fragments = fold(model), fold(model)
    for name, reply, as_stream in zip("abc", replies, streamed, strict=False):
        assert whole.add(name, reply) is None
        route = fragments.route(name)
        assert route is not None
        received = receive(route, stream(reply), sizes) if as_stream else reply
        assert fragments.add(name, received) is None
        route.close()
        assert (route.sink is not None) == as_stream
        assert received.weights == {} if as_stream else received is reply
    assert fragments.poisoned == []
    assert fragments.examples == whole.examples and fragments.losses == whole.losses
    expected, got = whole.aggregate(num_workers=3), fragments.aggregate(num_workers=3)
    assert list(got) == list(model)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    # And against an independent computation: the example-weighted mean in float64.
    total = sum(counts)
    for name, array in model.items():
        independent = sum(reply.weights[name].astype(np.float64) * reply.num_examples for reply in replies) / total
        if array.dtype.kind == "f":
            np.testing.assert_allclose(got[name], independent, rtol=1e-6, atol=1e-6)
        else:
            assert got[name] == np.rint(independent)


def untouched(model: Weights, target: StreamingFold) -> None:
    """Nothing was folded: a later honest update alone makes the mean."""
    honest = FitResult(trained(model, np.random.default_rng(1)), 5, 0.5)
    assert target.add("b", receive(target.route("b"), stream(honest))) is None
    result = target.aggregate(num_workers=2)
    for name, array in honest.weights.items():
        assert np.array_equal(result[name], array), name


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"num_examples": 1001}, "num_examples 1001 exceeds the 1000 examples the worker's hello claimed"),
        ({"shape": (5, 8)}, "tensor conv.weight is float32[5, 8], the model's is float32[5, 7]"),
        ({"dtype": np.float64}, "tensor conv.weight is float64[5, 7], the model's is float32[5, 7]"),
        ({"drop": True}, "tensors ['conv.weight'] do not match the model's"),
    ],
)
def test_a_header_the_fold_refuses_is_a_failure_read_without_touching_the_sums(
    change: dict[str, object], reason: str
) -> None:
    model = reference()
    weights = dict(model)
    if "shape" in change:
        weights["conv.weight"] = np.zeros(change["shape"], np.float32)  # type: ignore[arg-type]
    if "dtype" in change:
        weights["conv.weight"] = model["conv.weight"].astype(change["dtype"])  # type: ignore[arg-type]
    if "drop" in change:
        del weights["conv.weight"]
    reply = FitResult(weights, int(change.get("num_examples", 10)), 0.5)  # type: ignore[call-overload]
    target = fold(model)
    route = target.route("a")
    received = receive(route, stream(reply))
    assert route is not None and route.sink is not None and not route.sink.started
    assert target.add("a", received) == Failure("invalid update", reason)
    route.close()
    assert target.poisoned == [] and target.losses == {}
    untouched(model, target)


def nan_at(model: Weights, name: str, index: int) -> FitResult:
    weights = {key: np.array(array) for key, array in model.items()}
    weights[name].reshape(-1)[index] = np.nan
    return FitResult(weights, 10, 0.5)


def test_a_non_finite_first_fragment_is_a_failure_before_anything_is_folded() -> None:
    model = reference()
    target = fold(model)
    route = target.route("a")
    received = receive(route, stream(nan_at(model, "conv.weight", 0)), sizes=(4096,))
    failure = target.add("a", received)
    assert failure == Failure(
        "invalid update", "tensor conv.weight holds 1 non-finite values (nan) among elements 0 to 34"
    )
    route.close()
    assert target.poisoned == []
    untouched(model, target)


def test_a_value_turning_non_finite_in_a_later_fragment_poisons_the_fold() -> None:
    model = reference()
    target = fold(model)
    route = target.route("a")
    received = receive(route, stream(nan_at(model, "fc.weight", 40)))
    failure = target.add("a", received)
    assert (
        failure is not None
        and failure.kind == "invalid update"
        and "tensor fc.weight holds 1 non-finite" in failure.reason
    )
    route.close()
    assert target.poisoned == ["a"]


def test_float64_values_too_near_its_range_for_the_blocks_check_poison_the_fold_instead_of_counting() -> None:
    """Finite, but their sum overflows: the check in cache cannot vouch for them, so the fold is refolded whole."""
    model = reference()
    target = fold(model)
    route = target.route("a")
    weights = {key: np.array(array) for key, array in model.items()}
    weights["fc.weight"].reshape(-1)[40:43] = 1e307  # times 10 examples: three values of 1e308
    failure = target.add("a", receive(route, stream(FitResult(weights, 10, 0.5)), sizes=(4096,)))
    assert failure is not None and "tensor fc.weight holds values near float64's range among elements" in failure.reason
    route.close()
    assert target.poisoned == ["a"]


def test_a_reply_that_breaks_off_poisons_the_fold_and_late_bytes_never_reach_the_sums() -> None:
    model = reference()
    target = fold(model)
    route = target.route("a")
    data = stream(FitResult(trained(model, np.random.default_rng(3)), 10, 0.5))
    decoder = MessageDecoder(max_size=2**20, route=route)
    half = len(data) // 2
    decoder.feed(data[:half])
    assert route is not None and route.sink is not None and route.sink.started
    route.close()  # the request timed out, or the connection dropped
    assert target.poisoned == ["a"]
    released = target.release()
    snapshot = {name: array.copy() for name, array in released.items()}
    decoder.feed(data[half:])  # arriving after the request was abandoned
    for name, array in released.items():
        assert np.array_equal(array, snapshot[name]), name


def test_a_stream_cut_short_is_a_protocol_error_and_its_partial_fold_is_poison() -> None:
    model = reference()
    target = fold(model)
    route = target.route("a")
    data = stream(FitResult(dict(model), 10, 0.5))
    decoder = MessageDecoder(max_size=2**20, route=route)
    decoder.feed(data[:-3])
    with pytest.raises(RemoteProtocolError, match="streamed message has .* bytes, not the .* its header declares"):
        decoder.finish()
    assert route is not None
    route.close()
    assert target.poisoned == ["a"]


@pytest.mark.parametrize("kind", ["int8", "control_delta"])
def test_compressed_replies_and_control_variates_are_decoded_whole(kind: str) -> None:
    model = {"w": np.linspace(-1, 1, 300, dtype=np.float32)}
    target = fold(model)
    route = target.route("a")
    if kind == "int8":
        reply = FitResult(model, 10, 0.5)
        data = stream(reply, compression="int8")
    else:
        reply = FitResult(model, 10, 0.5, control_delta={"w": np.zeros(300, np.float32)})
        data = stream(reply)
    received = receive(route, data)
    assert route is not None and route.sink is None
    assert list(received.weights) == ["w"] and received.weights["w"].shape == (300,)


@pytest.mark.parametrize(
    "options",
    [{"keep": True}, {"delta": True}, {"control": {"w": np.zeros(3, np.float32)}}, {"fragments": False}],
    ids=["kept-for-the-evaluator", "delta", "scaffold", "off"],
)
def test_a_fold_that_needs_the_whole_update_gives_no_route(options: dict[str, object]) -> None:
    model = {"w": np.zeros(3, np.float32)}
    settings = {"keep": False, "delta": False, "fragments": True, **options}
    target = StreamingFold(make_strategy("fedavg"), model, held=HELD, **settings)  # type: ignore[arg-type]
    assert target.route("a") is None


def test_a_worker_that_poisoned_a_fold_gets_no_route_in_later_rounds() -> None:
    model = {"w": np.zeros(3, np.float32)}
    target = StreamingFold(
        make_strategy("fedavg"), model, keep=False, delta=False, held=HELD, fragments=True, whole={"a"}
    )
    assert target.route("a") is None and target.route("b") is not None


def test_a_robust_strategy_gives_no_route() -> None:
    target = StreamingFold(
        make_strategy("median"), {"w": np.zeros(3, np.float32)}, keep=False, delta=False, held=HELD, fragments=True
    )
    assert target.route("a") is None


def test_a_route_takes_one_reply_of_kind_fit_result_and_nothing_after_it_closes() -> None:
    model = reference()
    target = fold(model)
    route = target.route("a")
    assert route is not None
    first = receive(route, stream(FitResult(dict(model), 10, 0.5)))
    assert first.weights == {} and isinstance(route.sink, FragmentSink)
    second = receive(route, stream(FitResult(dict(model), 10, 0.5)))  # a second reply is decoded whole
    assert list(second.weights) == list(model)
    route.close()
    closed = fold(model).route("b")
    assert closed is not None
    closed.close()
    assert list(receive(closed, stream(FitResult(dict(model), 10, 0.5))).weights) == list(model)
