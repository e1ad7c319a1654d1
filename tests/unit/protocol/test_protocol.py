"""The wire protocol: envelope, message kinds, limits and error codes, byte by byte."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from syncfed.exceptions import MessageTooLarge, ProtocolError, SyncfedError, describe
from syncfed.protocol import (
    DP_MODES,
    ERROR_CODES,
    MAX_ID,
    MAX_SHARD,
    PROTOCOL_VERSION,
    REQUESTS,
    Accepted,
    Describe,
    Envelope,
    Error,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Message,
    ModelLayout,
    Ping,
    Pong,
    Propose,
    Query,
    QueryResult,
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
    Terms,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.secagg import CIPHERTEXT_SIZE, SHARE_SIZE

WHITELIST = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
KINDS = {
    "hello",
    "info",
    "ping",
    "pong",
    "fit",
    "fit_result",
    "fit_held",
    "fetch",
    "evaluate",
    "eval_result",
    "describe",
    "model_layout",
    "error",
    "query",
    "query_result",
    "secagg_start",
    "secagg_keys",
    "secagg_share",
    "secagg_shares",
    "secagg_mask",
    "secagg_masked",
    "secagg_unmask",
    "secagg_unmasked",
    "propose",
    "accepted",
}


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def envelope(kind: str, body: object, *, request_id: object = 7, v: object = PROTOCOL_VERSION) -> bytes:
    return pack({"v": v, "id": request_id, "kind": kind, "body": body})


def plan_body(**changes: object) -> dict[str, object]:
    return {"round": 1, "batch_size": 32, "num_batches": 10, "lr": 0.01, "seed": 0, **changes}


def tensor_body(array: np.ndarray) -> dict[str, object]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


# Strategies ------------------------------------------------------------------

request_ids = st.integers(0, MAX_ID)
names = st.text(min_size=1, max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative_finite = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(WHITELIST)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    # No NaN: message equality compares weights with np.array_equal.
    elements = hnp.from_dtype(dtype, allow_nan=False) if dtype.kind == "f" else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


weights = st.dictionaries(names, tensors(), max_size=4)

plans = st.builds(
    TrainingPlan,
    round=st.integers(1, MAX_ID),
    batch_size=st.integers(1, 1_000_000),
    num_batches=st.integers(1, 1_000_000),
    lr=st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**63 - 1),
    hold=st.booleans(),
)


@st.composite
def infos(draw: st.DrawFn) -> Info:
    histogram = draw(st.lists(st.integers(0, MAX_SHARD // 20), min_size=1, max_size=20))
    return Info(
        worker_id=draw(names),
        role=draw(st.sampled_from(["trainer", "evaluator"])),
        dataset=draw(names),
        input_shape=tuple(draw(st.lists(st.integers(1, 1000), min_size=1, max_size=8))),
        num_classes=len(histogram),
        histogram=tuple(histogram),
        models=tuple(draw(st.lists(names, max_size=5))),
        protocol_version=draw(st.integers(-(2**63), 2**63 - 1)),
    )


@st.composite
def eval_results(draw: st.DrawFn) -> EvalResult:
    predictions = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=20).filter(lambda p: sum(p) > 0))
    total = sum(predictions)
    return EvalResult(
        loss=draw(finite),
        correct=draw(st.integers(0, total)),
        num_examples=total,
        predictions=tuple(predictions),
    )


@st.composite
def job_terms(draw: st.DrawFn) -> Terms:
    """A job's terms: training or analytics, with or without privacy and a data key."""
    model = draw(st.none() | names)
    dp = draw(st.none() | st.sampled_from(DP_MODES))
    return Terms(
        job=draw(names),
        sites=draw(st.integers(1, MAX_ID)),
        model=model,
        rounds=0 if model is None else draw(st.integers(1, MAX_ID)),
        secure_agg=draw(st.booleans()),
        dp=dp,
        dp_epsilon=None if dp is None else draw(st.none() | st.floats(min_value=1e-9, max_value=1e9)),
        dp_delta=None if dp is None else draw(st.none() | st.floats(min_value=1e-12, max_value=0.5)),
        dataset_key=draw(st.none() | names),
    )


messages = st.one_of(
    st.builds(Propose, terms=job_terms()),
    st.just(Accepted()),
    st.builds(Fit, model=names, weights=weights, plan=plans, terms=job_terms()),
    st.builds(Evaluate, model=names, weights=weights, batch_size=st.integers(1, 1_000_000), terms=job_terms()),
    st.builds(Hello, protocol_version=st.integers(-(2**63), 2**63 - 1)),
    infos(),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(FitHeld, token=st.integers(1, 2**63 - 1)),
    st.builds(Fetch, token=st.integers(1, 2**63 - 1)),
    st.builds(Fit, model=st.text(min_size=1, max_size=256), weights=weights, plan=plans),
    st.builds(
        FitResult,
        weights=weights,
        num_examples=st.integers(1, MAX_SHARD),
        loss=finite,
        seconds=non_negative_finite,
    ),
    st.builds(Evaluate, model=names, weights=weights, batch_size=st.integers(1, 1_000_000)),
    eval_results(),
    st.builds(Error, code=st.sampled_from(sorted(ERROR_CODES)), reason=st.text(max_size=1000)),
)


def small_fit() -> Fit:
    return Fit(
        "digits-cnn",
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)},
        TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.01, seed=0),
    )


# Round trips -----------------------------------------------------------------


def test_every_kind_is_covered_by_the_strategy() -> None:
    kinds = (Hello, Info, Ping, Pong, Fit, FitResult, FitHeld, Fetch, Evaluate, EvalResult, Error, Query, QueryResult)
    secagg = (
        SecAggStart,
        SecAggKeys,
        SecAggShare,
        SecAggShares,
        SecAggMask,
        SecAggMasked,
        SecAggUnmask,
        SecAggUnmasked,
    )
    assert {cls.kind for cls in kinds + secagg + (Describe, ModelLayout, Propose, Accepted)} == KINDS
    assert REQUESTS == {
        "hello": "info",
        "ping": "pong",
        "fit": "fit_result",
        "fetch": "fit_result",
        "evaluate": "eval_result",
        "describe": "model_layout",
        "query": "query_result",
        "secagg_start": "secagg_keys",
        "secagg_share": "secagg_shares",
        "secagg_mask": "secagg_masked",
        "secagg_unmask": "secagg_unmasked",
        "propose": "accepted",
    }


@settings(max_examples=150, deadline=None)
@given(request_id=request_ids, message=messages)
def test_round_trip_every_message_kind(request_id: int, message: Message) -> None:
    data = encode(request_id, message)
    decoded = decode(data)
    assert decoded == Envelope(request_id, message)
    assert type(decoded.message) is type(message)
    if isinstance(message, (Fit, FitResult, Evaluate)):
        sent, received = message.weights, decoded.message.weights  # type: ignore[attr-defined]
        assert list(received) == list(sent)
        assert all(received[k].dtype == sent[k].dtype and received[k].shape == sent[k].shape for k in sent)
    # The encoding is canonical: what was decoded encodes to the same bytes.
    assert encode(request_id, decoded.message) == data


def test_wire_format_of_an_envelope() -> None:
    assert msgpack.unpackb(encode(3, Ping()), raw=False) == {"v": 1, "id": 3, "kind": "ping", "body": {}}
    assert msgpack.unpackb(encode(0, Error("busy", "later")), raw=False) == {
        "v": 1,
        "id": 0,
        "kind": "error",
        "body": {"code": "busy", "reason": "later"},
    }


def test_wire_format_of_a_fit_request() -> None:
    fit = small_fit()
    body = msgpack.unpackb(encode(5, fit), raw=False)["body"]
    assert body["model"] == "digits-cnn"
    assert body["plan"] == plan_body()
    assert body["weights"] == {
        "w": {"dtype": "float32", "shape": [2, 3], "data": np.arange(6, dtype="<f4").tobytes()},
        "n": {"dtype": "int64", "shape": [], "data": np.int64(3).astype("<i8").tobytes()},
    }


def test_decoded_weights_are_read_only_views_of_the_message() -> None:
    data = encode(1, small_fit())
    received = decode(data).message.weights  # type: ignore[attr-defined]
    assert not received["w"].flags.writeable
    np.testing.assert_array_equal(received["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_integer_lr_and_loss_go_out_as_floats() -> None:
    plan = TrainingPlan(round=1, batch_size=1, num_batches=1, lr=1, seed=0)
    assert plan.to_body()["lr"] == 1.0 and type(plan.to_body()["lr"]) is float
    received = decode(encode(1, FitResult({}, 3, 2))).message
    assert type(received.loss) is float  # type: ignore[attr-defined]


def test_error_codes_are_documented() -> None:
    for code in ("malformed", "too_large", "bad_tensor", "unknown_kind", "unsupported_version", "internal"):
        assert code in ERROR_CODES and ERROR_CODES[code]


# Size limit ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(request_id=request_ids, message=messages)
def test_size_limit_at_and_one_past(request_id: int, message: Message) -> None:
    data = encode(request_id, message)
    assert decode(data, max_size=len(data)) == Envelope(request_id, message)
    with pytest.raises(MessageTooLarge) as info:
        decode(data, max_size=len(data) - 1)
    assert str(info.value) == f"message with {len(data)} bytes exceeds limit of {len(data) - 1} bytes"
    assert (info.value.size, info.value.limit, info.value.code) == (len(data), len(data) - 1, "too_large")


def test_size_limit_is_checked_before_parsing() -> None:
    garbage = b"\xc1" * 100  # 0xc1 is never valid msgpack
    with pytest.raises(MessageTooLarge) as info:
        decode(garbage, max_size=99)
    assert str(info.value) == "message with 100 bytes exceeds limit of 99 bytes"
    assert isinstance(info.value, ProtocolError)
    with pytest.raises(ProtocolError) as info2:
        decode(garbage, max_size=100)
    assert not isinstance(info2.value, MessageTooLarge)


# Garbage ---------------------------------------------------------------------


def expect(data: bytes, code: str, request_id: int | None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == code, str(info.value)
    assert info.value.request_id == request_id
    assert isinstance(info.value, SyncfedError)
    return info.value


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


def test_truncated_messages_are_malformed() -> None:
    data = encode(9, small_fit())
    for end in range(len(data)):
        error = expect(data[:end], "malformed", None)
        assert str(error).startswith("invalid msgpack") or "envelope" in str(error)


def test_trailing_bytes_are_malformed() -> None:
    error = expect(encode(9, Ping()) + b"\x00", "malformed", None)
    assert str(error) == "invalid msgpack: ExtraData"


@pytest.mark.parametrize(
    "data",
    [
        pack(msgpack.ExtType(5, b"x")),
        envelope("hello", {"protocol_version": msgpack.ExtType(1, b"\x01")}),
        pack({"v": 1, "id": msgpack.ExtType(127, b""), "kind": "ping", "body": {}}),
    ],
)
def test_extension_types_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"msgpack extension type -?\d+ is not allowed") as info:
        decode(data)
    assert info.value.code == "malformed"


def test_timestamp_extension_does_not_pass_as_a_field() -> None:
    with pytest.raises(ProtocolError):
        decode(envelope("hello", {"protocol_version": msgpack.Timestamp(1, 0)}))
    with pytest.raises(ProtocolError):
        decode(pack({"v": 1, "id": msgpack.Timestamp(1, 0), "kind": "ping", "body": {}}))


@pytest.mark.parametrize(
    "value",
    [
        None,
        1,
        [1, 7, "ping", {}],
        {"v": 1, "id": 7, "kind": "ping"},
        {"v": 1, "id": 7, "body": {}},
        {"v": 1, "id": 7, "kind": "ping", "body": {}, "extra": 0},
        {"version": 1, "id": 7, "kind": "ping", "body": {}},
        {b"v": 1, b"id": 7, b"kind": "ping", b"body": {}},
    ],
)
def test_wrong_envelope_is_malformed_without_id(value: object) -> None:
    error = expect(pack(value), "malformed", None)
    assert str(error) == "envelope must be a map with keys v, id, kind and body"


def test_non_string_map_keys_are_malformed() -> None:
    expect(pack({1: 1, "id": 7, "kind": "ping", "body": {}}), "malformed", None)
    expect(envelope("hello", {3: 1}), "malformed", None)


@pytest.mark.parametrize("request_id", [-1, MAX_ID + 1, 2**64 - 1, True, 1.0, "7", None, [7]])
def test_bad_request_id_is_malformed_without_id(request_id: object) -> None:
    error = expect(envelope("ping", {}, request_id=request_id), "malformed", None)
    assert "is not an integer in 0..9223372036854775807" in str(error)


def test_request_id_range_is_inclusive() -> None:
    assert decode(envelope("ping", {}, request_id=0)).id == 0
    assert decode(envelope("ping", {}, request_id=MAX_ID)).id == MAX_ID


@pytest.mark.parametrize("kind", ["launch", "", "Ping", "fit ", 3, None, ["ping"]])
def test_unknown_kind(kind: object) -> None:
    expect(envelope(kind, {}, request_id=42), "unknown_kind", 42)  # type: ignore[arg-type]


def test_unknown_kind_text() -> None:
    error = expect(envelope("launch_missiles", {}, request_id=3), "unknown_kind", 3)
    assert str(error) == "message kind 'launch_missiles' is unknown"


@pytest.mark.parametrize("version", [0, 2, -1, "1", None, 2**63])
def test_wrong_version(version: object) -> None:
    expect(envelope("ping", {}, request_id=11, v=version), "unsupported_version", 11)


def test_wrong_version_text_and_precedence() -> None:
    # The version is checked before the kind: a future peer may have new kinds.
    error = expect(envelope("teleport", {}, request_id=5, v=2), "unsupported_version", 5)
    assert str(error) == "protocol version 2 is not supported (this peer speaks 1)"


@pytest.mark.parametrize("body", [None, [], "x", 0, b"body"])
def test_body_must_be_a_map(body: object) -> None:
    error = expect(envelope("ping", body, request_id=8), "malformed", 8)
    assert str(error) == "ping body must be a map"


def test_missing_field_text() -> None:
    error = expect(envelope("hello", {}, request_id=2), "malformed", 2)
    assert str(error) == "hello body has fields [], expected ['protocol_version']"


VALID_BODIES: dict[str, dict[str, object]] = {
    "hello": {"protocol_version": 1},
    "info": {
        "worker_id": "alice",
        "role": "trainer",
        "dataset": "digits",
        "input_shape": [1, 8, 8],
        "num_classes": 3,
        "histogram": [1, 2, 3],
        "models": ["digits-cnn"],
        "protocol_version": 1,
    },
    "ping": {},
    "pong": {},
    "fit_held": {"token": 1},
    "fetch": {"token": 2**63 - 1},
    "fit": {"model": "m", "weights": {"w": tensor_body(np.ones(2, np.float32))}, "plan": plan_body()},
    "fit_result": {"weights": {}, "num_examples": 5, "loss": 0.5, "seconds": 1.0},
    "evaluate": {"model": "m", "weights": {}, "batch_size": 64},
    "eval_result": {"loss": 0.1, "correct": 3, "num_examples": 4, "predictions": [1, 3]},
    "describe": {"model": "m"},
    "model_layout": {"model": "m", "tensors": [["w", "float32", [2, 3]]]},
    "error": {"code": "internal", "reason": "boom"},
    "query": {"query": "label-histogram", "features": [], "bins": None, "range": None},
    "query_result": {
        "query": "label-histogram",
        "num_examples": 20,
        "num_features": 64,
        "tensors": {"labels": tensor_body(np.array([10, 10], np.int64))},
    },
    # Secure aggregation: maps keyed by client id travel as [id, bytes] pairs.
    "secagg_start": {
        "config": {
            "num_clients": 3,
            "threshold": 2,
            "length": 4,
            "clip": 1.0,
            "session": b"s" * 32,
            "graph_seed": 0,
            "bits": 32,
            "max_count": 10,
        },
        "client": 2,
    },
    "secagg_keys": {"client": 0, "c_public": b"c" * 32, "s_public": b"s" * 32},
    "secagg_share": {"session": b"s" * 32, "c_public": [[1, b"c" * 32]], "s_public": [[1, b"s" * 32]]},
    "secagg_shares": {"client": 0, "ciphertexts": [[1, b"x" * CIPHERTEXT_SIZE]]},
    "secagg_mask": {
        "session": b"s" * 32,
        "ciphertexts": [[1, b"x" * CIPHERTEXT_SIZE]],
        "fit": {"model": "m", "weights": {}, "plan": plan_body(delta=True)},
        "weighted": True,
    },
    "secagg_masked": {"client": 0, "vector": tensor_body(np.arange(5, dtype=np.int32)), "loss": 0.5, "seconds": 1.0},
    "secagg_unmask": {"session": b"s" * 32, "survivors": [0, 1], "dropped": [2]},
    "secagg_unmasked": {
        "client": 0,
        "seed_shares": [[0, b"\x01" * SHARE_SIZE]],
        "key_shares": [[2, b"\x02" * SHARE_SIZE]],
    },
    "propose": {"terms": {"job": "j1", "sites": 3, "model": "m", "rounds": 3, "dp": "central", "dp_epsilon": 2.0}},
    "accepted": {},
}


@pytest.mark.parametrize("kind", sorted(VALID_BODIES))
def test_valid_bodies_decode(kind: str) -> None:
    assert decode(envelope(kind, VALID_BODIES[kind])).message.kind == kind


@pytest.mark.parametrize("kind", sorted(VALID_BODIES))
def test_extra_or_missing_field_is_malformed(kind: str) -> None:
    body = VALID_BODIES[kind]
    expect(envelope(kind, {**body, "extra": 1}, request_id=13), "malformed", 13)
    if body:
        missing = dict(body)
        missing.pop(next(iter(missing)))
        expect(envelope(kind, missing, request_id=13), "malformed", 13)


WRONG_FIELDS = [
    ("hello", "protocol_version", "1"),
    ("hello", "protocol_version", True),
    ("hello", "protocol_version", 1.0),
    ("info", "worker_id", ""),
    ("info", "worker_id", "x" * 257),
    ("info", "worker_id", 5),
    ("info", "role", "boss"),
    ("info", "role", ["trainer"]),
    ("info", "dataset", None),
    ("info", "input_shape", []),
    ("info", "input_shape", [1, 0, 8]),
    ("info", "input_shape", [1] * 9),
    ("info", "input_shape", "1,8,8"),
    ("info", "num_classes", 4),
    ("info", "num_classes", 0),
    ("info", "num_classes", "3"),
    ("info", "histogram", [1, -2, 3]),
    ("info", "histogram", [1, 2.0, 3]),
    ("info", "histogram", {"a": 1}),
    ("info", "models", "digits-cnn"),
    ("info", "models", [""]),
    ("info", "models", [3]),
    ("fit", "model", ""),
    ("fit", "model", 3),
    ("fit", "plan", None),
    ("fit", "plan", [1, 32, 10, 0.01, 0]),
    ("fit", "plan", plan_body(lr=-0.1)),
    ("fit", "plan", plan_body(lr=0)),
    ("fit", "plan", plan_body(lr="0.1")),
    ("fit", "plan", plan_body(lr=math.inf)),
    ("fit", "plan", plan_body(lr=math.nan)),
    ("fit", "plan", plan_body(round=0)),
    ("fit", "plan", plan_body(batch_size=0)),
    ("fit", "plan", plan_body(num_batches=1_000_001)),
    ("fit", "plan", plan_body(seed=-1)),
    ("fit", "plan", plan_body(extra=1)),
    ("fit_result", "num_examples", 0),
    ("fit_result", "num_examples", 2.0),
    ("fit_result", "loss", math.nan),
    ("fit_result", "loss", "0.5"),
    ("fit_result", "seconds", -1.0),
    ("evaluate", "batch_size", 0),
    ("evaluate", "batch_size", 1_000_001),
    ("evaluate", "model", None),
    ("eval_result", "correct", 5),
    ("eval_result", "correct", -1),
    ("eval_result", "num_examples", 0),
    ("eval_result", "predictions", [1, 2]),
    ("eval_result", "predictions", [5, -1]),
    ("eval_result", "predictions", [2, 2.0]),
    ("eval_result", "predictions", None),
    ("eval_result", "loss", math.inf),
    ("error", "code", "nope"),
    ("error", "code", 3),
    ("error", "code", ["internal"]),
    ("error", "reason", None),
    ("error", "reason", "x" * 1001),
]


@pytest.mark.parametrize(("kind", "field", "value"), WRONG_FIELDS)
def test_wrong_field_is_malformed_with_id(kind: str, field: str, value: object) -> None:
    body = {**VALID_BODIES[kind], field: value}
    expect(envelope(kind, body, request_id=21), "malformed", 21)


def test_zero_predictions_count_is_valid() -> None:
    body = {**VALID_BODIES["eval_result"], "predictions": [4, 0], "num_examples": 4}
    assert decode(envelope("eval_result", body)).message.predictions == (4, 0)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "tensor",
    [
        tensor_body(np.ones(2, np.complex64)),
        {"dtype": "float32", "shape": [2], "data": b"\x00" * 7},
        {"dtype": "float32", "shape": [2], "data": b"\x00" * 9},
        {"dtype": "float32", "shape": [-2], "data": b""},
        {"dtype": "float32", "shape": [2]},
        {"dtype": "float32", "shape": [2], "data": "\x00" * 8},
    ],
)
def test_bad_tensor_in_a_request(tensor: dict[str, object]) -> None:
    body = {**VALID_BODIES["fit"], "weights": {"w": tensor}}
    expect(envelope("fit", body, request_id=17), "bad_tensor", 17)
    result = {**VALID_BODIES["fit_result"], "weights": {"w": tensor}}
    expect(envelope("fit_result", result, request_id=18), "bad_tensor", 18)


# Regression test for a bug once in syncfed/tensors.py, decode_tensor.
def test_unhashable_tensor_dtype_is_a_bad_tensor() -> None:
    tensor = {"dtype": ["float32"], "shape": [2], "data": b"\x00" * 8}
    body = {**VALID_BODIES["fit"], "weights": {"w": tensor}}
    expect(envelope("fit", body, request_id=19), "bad_tensor", 19)


def test_bad_weights_map_is_a_bad_tensor() -> None:
    body = {**VALID_BODIES["evaluate"], "weights": [1, 2]}
    expect(envelope("evaluate", body, request_id=4), "bad_tensor", 4)


# Regression tests for defects found in review: crafted tensors, and error text sized by the peer.


def crafted_fit(tensor: dict[str, object]) -> bytes:
    plan = plan_body(batch_size=1, num_batches=1, lr=0.1, seed=1)
    return envelope("fit", {"model": "digits-cnn", "weights": {"w": tensor}, "plan": plan}, request_id=5)


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**64 - 1], [2**40, 0]])
def test_empty_tensors_with_huge_sizes_are_bad_tensors(shape: list[int]) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(crafted_fit({"dtype": "float32", "shape": shape, "data": b""}))
    assert raised.value.code == "bad_tensor"
    assert raised.value.request_id == 5


def test_error_messages_stay_short_whatever_the_peer_sent() -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(msgpack.packb({"v": 1, "id": 1, "kind": "x" * 5_000_000, "body": {}}))
    assert len(str(raised.value)) < 200
    assert len(describe(list(range(10**6)))) < 200


# Structured fuzzing: any msgpack value in any place of a readable envelope gives
# either a message or a ProtocolError that carries the request id.

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["float32", "int64", "trainer", "internal", "dtype", "shape", "data"])
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    request_id=request_ids,
    data=st.data(),
)
def test_fuzzed_bodies_raise_only_protocol_error_with_id(kind: str, request_id: int, data: st.DataObject) -> None:
    base = dict(VALID_BODIES[kind])
    if base and data.draw(st.booleans()):
        field = data.draw(st.sampled_from(sorted(base)))
        base[field] = data.draw(msgpack_values)
        body: object = base
    else:
        body = data.draw(msgpack_values)
    try:
        result = decode(envelope(kind, body, request_id=request_id))
    except ProtocolError as exc:
        assert exc.code in ("malformed", "bad_tensor")
        if str(exc).startswith("msgpack extension type"):
            # Rejected while unpacking, before the envelope could be read.
            assert exc.request_id is None
        else:
            assert exc.request_id == request_id
    else:
        assert result.id == request_id and result.message.kind == kind


# Construction ----------------------------------------------------------------

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
