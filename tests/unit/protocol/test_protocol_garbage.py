"""The wire protocol, garbage: random, truncated, malformed and fuzzed input gives a ProtocolError
with its code and, where the envelope could be read, the request id; never anything else."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_kit import KINDS, plan_body, request_ids, small_fit

from syncfed.exceptions import ProtocolError, SyncfedError, describe
from syncfed.protocol import MAX_ID, PROTOCOL_VERSION, Ping, decode, encode
from syncfed.secagg import CIPHERTEXT_SIZE, SHARE_SIZE


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def envelope(kind: str, body: object, *, request_id: object = 7, v: object = PROTOCOL_VERSION) -> bytes:
    return pack({"v": v, "id": request_id, "kind": kind, "body": body})


def tensor_body(array: np.ndarray) -> dict[str, object]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


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
