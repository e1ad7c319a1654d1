"""The wire protocol, round trips: every message kind decodes to itself and encodes back to the
same bytes, the wire format byte by byte, and the size limit at and one past its value."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from protocol_kit import KINDS, plan_body, request_ids, small_fit

from syncfed.exceptions import MessageTooLarge, ProtocolError
from syncfed.protocol import (
    DP_MODES,
    ERROR_CODES,
    MAX_ID,
    MAX_SHARD,
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

WHITELIST = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")

# Strategies ------------------------------------------------------------------

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
