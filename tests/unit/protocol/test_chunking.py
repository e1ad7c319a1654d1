"""Streamed messages: fragments of at most chunk_size bytes, read as they arrive, limits enforced on the way.

Pure tests push fragments through :class:`MessageDecoder` (as sent, and cut
again at random places, as another peer may cut them); socket tests send
through real websocket connections on 127.0.0.1; one test measures that a
100M-parameter message needs no second buffer of its size on either side.
"""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from syncfed.exceptions import ConfigError, MessageTooLarge, ProtocolError, TensorError
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.net.transport import connection_options, receive_message, send_message
from syncfed.protocol import (
    DEFAULT_CHUNK_SIZE,
    STREAM_MAGIC,
    Envelope,
    Fit,
    FitResult,
    Hello,
    Info,
    MessageDecoder,
    Ping,
    Pong,
    TrainingPlan,
    decode,
    encode,
    encode_fragments,
)

T = TypeVar("T")

KiB, MiB = 2**10, 2**20
WHITELIST = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
PLAN = TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.05, seed=1)


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60_000 * MS) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(same_bits(a[name], b[name]) for name in a)


def model_weights(parameters: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A model-like weights dict: one big float32 tensor, a few small ones of other dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal(parameters, dtype=np.float32).reshape(-1, 8),
        "layer.bias": rng.standard_normal(8).astype(np.float64),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask": rng.integers(0, 2, size=(3, 5)).astype(bool),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def feed(fragments: Iterable[bytes | memoryview], *, max_size: int | None = None) -> MessageDecoder:
    decoder = MessageDecoder(max_size=max_size)
    for fragment in fragments:
        decoder.feed(fragment)
    return decoder


def streamed(header: Any, payload: bytes = b"", *, header_size: int | None = None) -> bytes:
    """A streamed message built by hand, to break the rules :func:`encode_fragments` keeps."""
    packed = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    size = len(packed) if header_size is None else header_size
    return STREAM_MAGIC + struct.pack(">I", size) + packed + payload


def fit_result_header(tensor: dict[str, Any], *, request_id: int = 9) -> dict[str, Any]:
    body = {"weights": {"w": tensor}, "num_examples": 3, "loss": 0.5, "seconds": 1.0}
    return {"v": 1, "id": request_id, "kind": "fit_result", "body": body}


# The two formats ----------------------------------------------------------------

tensors = st.builds(
    lambda dtype, shape, data: data.draw(hnp.arrays(np.dtype(dtype), shape)),
    st.sampled_from(WHITELIST),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    st.data(),
)
weights_maps = st.dictionaries(st.text(min_size=1, max_size=8), tensors, max_size=5)


def test_the_magic_cannot_start_a_single_frame_message() -> None:
    # 0xc7 is a msgpack extension: never an envelope (a map), and refused in any case.
    assert STREAM_MAGIC[:1] == b"\xc7"
    with pytest.raises(ProtocolError):
        decode(STREAM_MAGIC[:3])
    assert DEFAULT_CHUNK_SIZE == MiB


@settings(max_examples=60, deadline=None)
@given(weights=weights_maps, request_id=st.integers(0, 2**63 - 1))
def test_single_frame_messages_start_with_a_map(weights: dict[str, np.ndarray], request_id: int) -> None:
    data = encode(request_id, FitResult(weights, 1, 0.0))
    assert data[0] in range(0x80, 0x90) or data[0] in (0xDE, 0xDF)
    assert not data.startswith(STREAM_MAGIC)


def test_streamed_only_above_the_chunk_size_at_under_and_over() -> None:
    message = FitResult(model_weights(4000), 12, 0.25, 3.0)
    size = encode_fragments(3, message, chunk_size=1).size  # the streamed form's size
    at = encode_fragments(3, message, chunk_size=size)
    over = encode_fragments(3, message, chunk_size=size + 1)
    under = encode_fragments(3, message, chunk_size=size - 1)
    for single in (at, over):
        assert not single.streamed
        assert list(single.fragments()) == [encode(3, message)]
        assert single.size == len(encode(3, message))
    assert under.streamed and under.size == size
    lengths = [len(fragment) for fragment in under.fragments()]
    assert lengths == [size - 1, 1]
    received = feed(under.fragments(), max_size=size).finish()
    assert received.id == 3 and received.message == message


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000, 4096, 16_000])
def test_fragments_are_full_chunks_and_views_of_the_tensors(chunk_size: int) -> None:
    weights = model_weights(4000)
    outgoing = encode_fragments(1, FitResult(weights, 1, 0.0), chunk_size=chunk_size)
    fragments = list(outgoing.fragments())
    assert outgoing.streamed and bytes(outgoing)[:4] == STREAM_MAGIC
    assert all(len(fragment) == chunk_size for fragment in fragments[:-1])
    assert 0 < len(fragments[-1]) <= chunk_size
    assert sum(len(fragment) for fragment in fragments) == outgoing.size
    # Whole chunks inside the big tensor are not copies of it.
    big = weights["layer.weight"]
    shared = [
        fragment
        for fragment in fragments
        if isinstance(fragment, memoryview) and np.shares_memory(np.frombuffer(fragment, np.uint8), big)
    ]
    assert len(shared) >= big.nbytes // chunk_size - 2


def test_header_lists_dtype_shape_and_byte_count_not_data() -> None:
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
    data = bytes(encode_fragments(4, FitResult(weights, 2, 0.5), chunk_size=16))
    (header_size,) = struct.unpack(">I", data[4:8])
    header = msgpack.unpackb(data[8 : 8 + header_size], raw=False)
    assert header["id"] == 4 and header["kind"] == "fit_result"
    assert header["body"]["weights"] == {
        "w": {"dtype": "float32", "shape": [2, 3], "nbytes": 24},
        "n": {"dtype": "int64", "shape": [], "nbytes": 8},
    }
    assert data[8 + header_size :] == np.arange(6, dtype="<f4").tobytes() + np.int64(3).astype("<i8").tobytes()


@settings(max_examples=60, deadline=None)
@given(
    weights=weights_maps,
    chunk_size=st.integers(1, 400),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    request_id=st.integers(1, 2**63 - 1),
)
def test_round_trip_at_any_chunk_size_however_the_peer_cuts_it(
    weights: dict[str, np.ndarray], chunk_size: int, cuts: list[int], request_id: int
) -> None:
    message = Fit("digits-cnn", weights, PLAN)
    outgoing = encode_fragments(request_id, message, chunk_size=chunk_size)
    as_sent = feed(outgoing.fragments(), max_size=outgoing.size).finish()
    assert isinstance(as_sent.message, Fit) and as_sent.id == request_id and as_sent.message.plan == PLAN
    assert same_weights(as_sent.message.weights, weights)
    data = bytes(outgoing)
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    recut = feed(data[start:stop] for start, stop in zip(points, points[1:], strict=False))
    received = recut.finish()
    assert recut.size == len(data) == outgoing.size
    assert same_weights(received.message.weights, weights)  # type: ignore[attr-defined]
    assert same_weights(decode(data).message.weights, weights)  # type: ignore[attr-defined]


def test_every_kind_goes_through_the_stream() -> None:
    for message in (Ping(), Pong(), Hello(), Info("a", "trainer", "digits", (1, 8, 8), 2, (3, 4), ("m",))):
        outgoing = encode_fragments(8, message, chunk_size=5)
        assert outgoing.streamed
        assert feed(outgoing.fragments()).finish() == Envelope(8, message)


def test_streamed_tensors_are_read_only_arrays() -> None:
    weights = model_weights(800)
    received = decode(bytes(encode_fragments(1, FitResult(weights, 1, 0.0), chunk_size=64))).message
    for name, array in received.weights.items():  # type: ignore[attr-defined]
        assert not array.flags.writeable, name
        assert array.flags.c_contiguous and array.dtype == weights[name].dtype


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, "4096", None, True])
def test_chunk_size_must_be_a_positive_integer(chunk_size: object) -> None:
    with pytest.raises(ConfigError, match="chunk size"):
        encode_fragments(1, Ping(), chunk_size=chunk_size)  # type: ignore[arg-type]


def test_a_decoder_reads_one_message() -> None:
    decoder = feed([encode(1, Ping())])
    assert decoder.finish() == Envelope(1, Ping())
    assert decoder.frame == encode(1, Ping())
    with pytest.raises(ConfigError):
        decoder.feed(b"\x80")
    with pytest.raises(ConfigError):
        decoder.finish()


# The size limit -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [64, 100 * KiB])
def test_size_limit_at_and_one_past(chunk_size: int) -> None:
    message = FitResult(model_weights(10_000), 1, 0.0)
    outgoing = encode_fragments(5, message, chunk_size=chunk_size)
    assert feed(outgoing.fragments(), max_size=outgoing.size).finish() == Envelope(5, message)
    decoder = feed(outgoing.fragments(), max_size=outgoing.size - 1)
    with pytest.raises(MessageTooLarge) as info:
        decoder.finish()
    assert str(info.value) == f"message with {outgoing.size} bytes exceeds limit of {outgoing.size - 1} bytes"
    assert (info.value.size, info.value.code, info.value.request_id) == (outgoing.size, "too_large", 5)
    assert decoder.size == outgoing.size and decoder.frame is None


def test_an_oversized_stream_is_counted_not_kept_nor_allocated() -> None:
    """The header declares 16 MB against a 1 MiB limit: nothing of that size is ever allocated."""
    outgoing = encode_fragments(2, FitResult(model_weights(4 * MiB), 1, 0.0), chunk_size=64 * KiB)
    tracemalloc.start()
    try:
        decoder = feed(outgoing.fragments(), max_size=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * KiB, peak
    with pytest.raises(MessageTooLarge) as info:
        decoder.finish()
    assert info.value.size == outgoing.size > 16 * MiB


def test_a_header_that_declares_more_than_the_limit_allocates_nothing() -> None:
    """A short message whose header claims 2**31 float64 values: refused before any allocation."""
    header = fit_result_header({"dtype": "float64", "shape": [2**31], "nbytes": 2**34}, request_id=6)
    data = streamed(header, b"\x00" * 100)
    tracemalloc.start()
    try:
        decoder = feed([data], max_size=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * KiB
    with pytest.raises(ProtocolError) as info:
        decoder.finish()
    assert not isinstance(info.value, MessageTooLarge)
    assert info.value.request_id == 6
    assert (
        str(info.value)
        == f"streamed message has {len(data)} bytes, not the {len(data) - 100 + 2**34} its header declares"
    )


def test_a_header_length_past_the_limit() -> None:
    data = streamed(b"\x80" * 10, header_size=2**32 - 1)
    with pytest.raises(ProtocolError) as info:
        feed([data], max_size=MiB).finish()
    assert str(info.value) == f"streamed message ends after {len(data)} bytes, inside its header"
    with pytest.raises(MessageTooLarge):
        feed([data, bytes(MiB)], max_size=MiB).finish()


# Malformed streamed messages --------------------------------------------------------

GOOD_TENSOR = {"dtype": "float32", "shape": [2], "nbytes": 8}
GOOD_PAYLOAD = np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_a_hand_built_streamed_message_decodes() -> None:
    received = decode(streamed(fit_result_header(GOOD_TENSOR), GOOD_PAYLOAD)).message
    assert isinstance(received, FitResult)
    np.testing.assert_array_equal(received.weights["w"], [1.5, -2.0])


def test_inline_tensors_may_stay_in_the_header() -> None:
    tensor = {"dtype": "float32", "shape": [2], "data": GOOD_PAYLOAD}
    received = decode(streamed(fit_result_header(tensor))).message
    np.testing.assert_array_equal(received.weights["w"], [1.5, -2.0])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("tensor", "payload", "error"),
    [
        (
            {**GOOD_TENSOR, "nbytes": 7},
            GOOD_PAYLOAD[:7],
            "tensor w declares 7 bytes but dtype float32 and shape (2,) need 8",
        ),
        (
            {**GOOD_TENSOR, "nbytes": 9},
            GOOD_PAYLOAD + b"\x00",
            "tensor w declares 9 bytes but dtype float32 and shape (2,) need 8",
        ),
        (
            {**GOOD_TENSOR, "nbytes": 8.0},
            GOOD_PAYLOAD,
            "tensor w declares 8.0 bytes but dtype float32 and shape (2,) need 8",
        ),
        ({**GOOD_TENSOR, "dtype": "complex64"}, GOOD_PAYLOAD, "tensor w has dtype 'complex64', not one of float16,"),
        ({**GOOD_TENSOR, "dtype": ["float32"]}, GOOD_PAYLOAD, "tensor w has dtype ['float32'], not one of"),
        ({**GOOD_TENSOR, "shape": [-2]}, GOOD_PAYLOAD, "tensor w has shape [-2], not a list of at most 32 sizes"),
        ({"shape": [2], "nbytes": 8}, GOOD_PAYLOAD, "tensor w must be a map with keys dtype, shape and nbytes"),
        ({**GOOD_TENSOR, "data": b""}, GOOD_PAYLOAD, "tensor w must be a map with keys dtype, shape and nbytes"),
        ({**GOOD_TENSOR, "encoding": "int4"}, GOOD_PAYLOAD, "tensor w has encoding 'int4', not one of fp16, int8"),
    ],
)
def test_bad_tensor_entries_are_refused_before_allocating(tensor: dict[str, Any], payload: bytes, error: str) -> None:
    decoder = feed([streamed(fit_result_header(tensor, request_id=31), payload)])
    with pytest.raises(TensorError) as info:
        decoder.finish()
    assert str(info.value).startswith(error)
    assert (info.value.code, info.value.request_id) == ("bad_tensor", 31)


@pytest.mark.parametrize(("payload", "what"), [(GOOD_PAYLOAD[:-1], "truncated"), (GOOD_PAYLOAD + b"\x00", "extra")])
def test_truncated_or_extra_data(payload: bytes, what: str) -> None:
    data = streamed(fit_result_header(GOOD_TENSOR, request_id=12), payload)
    expected = len(data) + (1 if what == "truncated" else -1)
    for fragments in ([data], [data[:9], data[9:-1], data[-1:]], [data[i : i + 1] for i in range(len(data))]):
        with pytest.raises(ProtocolError) as info:
            feed(fragments).finish()
        assert str(info.value) == f"streamed message has {len(data)} bytes, not the {expected} its header declares"
        assert (info.value.code, info.value.request_id) == ("malformed", 12)


@pytest.mark.parametrize(
    ("data", "code", "request_id", "error"),
    [
        (streamed(b"\xc1\x00"), "malformed", None, "invalid msgpack: "),
        (streamed(b""), "malformed", None, "invalid msgpack: "),
        (streamed(b"\x91" * 100_000 + b"\x00"), "malformed", None, "invalid msgpack: "),
        (streamed([1, 2]), "malformed", None, "envelope must be a map with keys v, id, kind and body"),
        (
            streamed({"v": 1, "id": 4, "kind": "launch", "body": {}}),
            "unknown_kind",
            4,
            "message kind 'launch' is unknown",
        ),
        (streamed({"v": 2, "id": 4, "kind": "ping", "body": {}}), "unsupported_version", 4, "protocol version 2"),
        (streamed({"v": 1, "id": -4, "kind": "ping", "body": {}}), "malformed", None, "request id -4 is not"),
        (STREAM_MAGIC, "malformed", None, "streamed message ends after 4 bytes, inside its header"),
        (STREAM_MAGIC + b"\x00\x00", "malformed", None, "streamed message ends after 6 bytes, inside its header"),
        (streamed(b"\x80", header_size=2), "malformed", None, "streamed message ends after 9 bytes, inside its header"),
        (
            streamed(
                {"v": 1, "id": 5, "kind": "fit", "body": {"model": "m", "weights": {}, "plan": GOOD_TENSOR}},
                GOOD_PAYLOAD,
            ),
            "malformed",
            5,
            "plan body has fields",
        ),
    ],
)
def test_malformed_streamed_messages(data: bytes, code: str, request_id: int | None, error: str) -> None:
    decoder = feed([data[:5], data[5:]])  # feed never raises
    with pytest.raises(ProtocolError) as info:
        decoder.finish()
    assert str(info.value).startswith(error), str(info.value)
    assert (info.value.code, info.value.request_id) == (code, request_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_random_bytes_after_the_magic_raise_only_protocol_error(tail: bytes, cut: int) -> None:
    data = STREAM_MAGIC + tail
    decoder = feed([data[:cut], data[cut:]], max_size=200)
    try:
        decoder.finish()
    except ProtocolError:
        pass


# Over real websocket connections ------------------------------------------------------


@asynccontextmanager
async def receiving_server(limit: int) -> AsyncIterator[tuple[str, asyncio.Queue[Envelope | ProtocolError]]]:
    """A websocket server on 127.0.0.1 that decodes each message it gets onto a queue."""
    results: asyncio.Queue[Envelope | ProtocolError] = asyncio.Queue()

    async def handler(connection: ServerConnection) -> None:
        try:
            while True:
                incoming = await receive_message(connection, limit)
                try:
                    await results.put(incoming.finish())
                except ProtocolError as exc:
                    await results.put(exc)
        except ConnectionClosed:
            return

    async with serve(handler, "127.0.0.1", 0, **connection_options(limit)) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", results


@asynccontextmanager
async def client_of(uri: str, limit: int) -> AsyncIterator[ClientConnection]:
    async with connect(uri, open_timeout=10_000 * MS, **connection_options(limit)) as connection:
        yield connection


def test_many_fragments_over_a_real_connection_arrive_bit_identical_and_limits_hold() -> None:
    limit = 8 * MiB
    weights = model_weights(MiB)  # 4 MiB of float32 and small tensors
    message = FitResult(weights, 17, 0.125, 2.0)
    outgoing = encode_fragments(11, message, chunk_size=16 * KiB)
    assert len(list(outgoing.fragments())) > 250

    async def scenario() -> None:
        async with receiving_server(limit) as (uri, results), client_of(uri, limit) as connection:
            await send_message(connection, outgoing)
            received = await results.get()
            assert isinstance(received, Envelope) and received.id == 11
            assert received.message == message
            assert same_weights(received.message.weights, weights)  # type: ignore[attr-defined]
            # Over the limit in many fragments: refused with its full size; the connection goes on.
            too_big = encode_fragments(12, FitResult(model_weights(3 * MiB), 1, 0.0), chunk_size=64 * KiB)
            await send_message(connection, too_big)
            refused = await results.get()
            assert isinstance(refused, MessageTooLarge) and refused.size == too_big.size > limit
            await send_message(connection, encode_fragments(13, Ping()))
            assert await results.get() == Envelope(13, Ping())
            await send_message(connection, outgoing)
            again = await results.get()
            assert isinstance(again, Envelope) and same_weights(again.message.weights, weights)  # type: ignore[attr-defined]

    run(scenario())


def test_the_client_streams_requests_and_reads_streamed_replies() -> None:
    """WorkerLink against a fake worker that answers a fit with a streamed result of its own."""
    weights = model_weights(100 * KiB, seed=1)
    reply = FitResult(model_weights(100 * KiB, seed=2), 5, 0.5, 1.0)
    seen: list[int] = []

    async def worker(connection: ServerConnection) -> None:
        try:
            while True:
                incoming = await receive_message(connection, 8 * MiB)
                envelope = incoming.finish()
                seen.append(incoming.size)
                answer = reply if isinstance(envelope.message, Fit) else Info("w", "trainer", "d", (1,), 1, (5,), ())
                await send_message(connection, encode_fragments(envelope.id, answer, chunk_size=8 * KiB))
        except ConnectionClosed:
            return

    async def scenario() -> None:
        async with serve(worker, "127.0.0.1", 0, **connection_options(8 * MiB)) as server:
            uri = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
            async with WorkerLink("fake", uri, max_message_size=8 * MiB, chunk_size=8 * KiB) as client:
                assert isinstance(await client.request(Hello()), Info)
                received = await client.request(Fit("m", weights, PLAN))
                assert received == reply
                request_size = encode_fragments(2, Fit("m", weights, PLAN), chunk_size=8 * KiB).size
                assert seen[-1] == request_size and client.bytes_sent == seen[0] + request_size
                assert client.bytes_received == sum(
                    encode_fragments(i, m, chunk_size=8 * KiB).size
                    for i, m in ((1, Info("w", "trainer", "d", (1,), 1, (5,), ())), (2, reply))
                )

    run(scenario())


def test_a_cancelled_streamed_send_closes_the_connection() -> None:
    """Half a fragmented message cannot be followed by anything: the sender hangs up."""

    async def never_reads(connection: ServerConnection) -> None:
        await connection.wait_closed()

    async def scenario() -> None:
        # The server never reads, so it does not see the hang-up; close_timeout bounds its own close.
        async with serve(
            never_reads, "127.0.0.1", 0, close_timeout=100 * MS, **connection_options(512 * MiB)
        ) as server:
            uri = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
            async with client_of(uri, 512 * MiB) as connection:
                outgoing = encode_fragments(1, FitResult(model_weights(16 * MiB), 1, 0.0), chunk_size=MiB)
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(500 * MS):
                        await send_message(connection, outgoing)
                async with asyncio.timeout(5000 * MS):
                    await connection.wait_closed()
                with pytest.raises(ConnectionClosed):
                    await connection.send(encode(2, Ping()))

    run(scenario())


def test_a_real_worker_reads_a_streamed_fit_request(disposable_worker: WorkerProcess) -> None:
    torch.manual_seed(0)
    weights = get_weights(DigitsCNN())

    async def scenario() -> None:
        async with WorkerLink("erin", disposable_worker.uri, max_message_size=64 * MiB, chunk_size=32 * KiB) as erin:
            await erin.request(Hello())
            sent = erin.bytes_sent
            result = await erin.request(Fit("digits-cnn", weights, PLAN), timeout=60_000 * MS)
            assert (
                erin.bytes_sent - sent
                == encode_fragments(2, Fit("digits-cnn", weights, PLAN), chunk_size=32 * KiB).size
            )
            assert erin.bytes_sent - sent > 64 * 32 * KiB  # dozens of fragments
            assert isinstance(result, FitResult) and list(result.weights) == list(weights)
            assert any(not np.array_equal(result.weights[name], weights[name]) for name in weights)
            assert await erin.request(Ping()) == Pong()

    run(scenario(), timeout=90_000 * MS)


# Memory: no second buffer of the message's size -------------------------------------


def test_a_100m_parameter_message_needs_no_second_whole_size_buffer() -> None:
    parameters = 100_000_000
    weights = {"w": np.arange(parameters, dtype=np.float32), "b": np.ones(10, dtype=np.float32)}
    payload = weights["w"].nbytes
    message = FitResult(weights, 1, 0.0)

    async def scenario() -> tuple[Envelope | ProtocolError, float]:
        async with receiving_server(512 * MiB) as (uri, results), client_of(uri, 512 * MiB) as connection:
            started = time.perf_counter()
            await send_message(connection, encode_fragments(1, message))
            received = await results.get()
            return received, time.perf_counter() - started

    tracemalloc.start()
    try:
        received, seconds = run(scenario(), timeout=120_000 * MS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(received, Envelope)
    assert np.array_equal(received.message.weights["w"], weights["w"])  # type: ignore[attr-defined]
    print(f"\n100M float32 parameters ({payload / 1e6:.0f} MB) sent and received in {seconds:.2f} s;")
    print(f"traced peak {peak / 1e6:.0f} MB = {peak / payload:.2f} x the payload (the received arrays are 1.00 x)")
    assert peak < 1.5 * payload
