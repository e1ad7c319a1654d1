"""Fault tests, worker side: peers that send garbage or break the rules.

A raw websockets client sends a real worker process bad bytes, bad envelopes,
bad tensors and oversized messages; each gets an error reply with a code and
a short reason, and the worker keeps serving. The ``weights`` fixture comes
from faults_kit.py, imported by name so that pytest finds it here.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
from faults_kit import PLAN, MiB, run
from faults_kit import weights as weights
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    Envelope,
    Error,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Hello,
    Info,
    Ping,
    Pong,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.tensors import encode_weights

FAULT_LIMIT = 3 * 2**20  # dave's --max-message-size in conftest.py
REPLY_TIMEOUT = 30_000 * MS  # any one reply, a short fit included
QUIET = 300 * MS  # of silence that show no further reply is coming


def pack(request_id: Any, kind: Any, body: Any, *, v: Any = 1) -> bytes:
    """An envelope built by hand, so that it can break the rules :func:`encode` enforces."""
    return msgpack.packb({"v": v, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)


class Peer:
    """A raw websocket peer: sends whatever bytes it is given, reads envelopes with deadlines."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, data: bytes | list[bytes]) -> None:
        await self.connection.send(data)  # a list goes as one fragmented message

    async def request(self, request_id: int, message: Any) -> None:
        await self.send(encode(request_id, message))

    async def receive(self, timeout: float = REPLY_TIMEOUT) -> Envelope:
        async with asyncio.timeout(timeout):
            data = await self.connection.recv(decode=False)
        return decode(data)

    async def receive_many(self, count: int, timeout: float = REPLY_TIMEOUT) -> list[Envelope]:
        return [await self.receive(timeout) for _ in range(count)]

    async def assert_silent(self) -> None:
        """No further reply arrives within :data:`QUIET` seconds."""
        try:
            async with asyncio.timeout(QUIET):
                data = await self.connection.recv(decode=False)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected reply {decode(data)}")

    async def hello(self, request_id: int = 1) -> Info:
        await self.request(request_id, Hello())
        reply = await self.receive()
        assert reply.id == request_id and isinstance(reply.message, Info), reply
        return reply.message

    async def expect_error(self, request_id: int, code: str) -> str:
        reply = await self.receive()
        assert isinstance(reply.message, Error), f"expected error {code}, got {reply.message.kind}"
        assert (reply.id, reply.message.code) == (request_id, code), reply.message.reason
        assert_clean(reply.message.reason)
        return reply.message.reason

    async def fit(self, request_id: int, weights: dict[str, np.ndarray], plan: TrainingPlan = PLAN) -> FitResult:
        await self.request(request_id, Fit("digits-cnn", weights, plan))
        reply = await self.receive()
        assert reply.id == request_id and isinstance(reply.message, FitResult), reply.message
        return reply.message


@asynccontextmanager
async def open_peer(uri: str) -> AsyncIterator[Peer]:
    async with connect(
        uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
    ) as connection:
        yield Peer(connection)


def assert_clean(reason: str) -> None:
    """A reason is one short line for a user, never a stack dump."""
    assert "Traceback" not in reason
    assert 'File "' not in reason
    assert "\n" not in reason
    assert 0 < len(reason) <= 1000


def assert_trained(result: FitResult, weights: dict[str, np.ndarray], num_examples: int) -> None:
    assert result.num_examples == num_examples
    assert math.isfinite(result.loss) and result.loss > 0
    assert list(result.weights) == list(weights)
    for name, array in weights.items():
        assert result.weights[name].shape == array.shape and result.weights[name].dtype == array.dtype, name
        assert np.isfinite(result.weights[name]).all(), name
    assert any(not np.array_equal(result.weights[name], weights[name]) for name in weights), "nothing was trained"


@pytest.fixture(scope="module")
def dave(digits_workers: dict[str, WorkerProcess]) -> WorkerProcess:
    """The fault tests' worker: digits 0, 5 and 9, a message limit of 3 MiB."""
    return digits_workers["dave"]


# -- Bad requests, one connection each ------------------------------------------------------


def fit_body(weights: dict[str, np.ndarray], *, tensors: dict[str, Any] | None = None, **plan: Any) -> dict[str, Any]:
    """A fit body whose tensors and plan fields may be replaced by anything."""
    encoded: dict[str, Any] = encode_weights(weights)
    for name, tensor in (tensors or {}).items():
        if tensor is None:
            del encoded[name]
        else:
            encoded[name] = tensor
    return {"model": "digits-cnn", "weights": encoded, "plan": {**PLAN.to_body(), **plan}}


def retyped(weights: dict[str, np.ndarray], name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    return {key: array if key == name else value for key, value in weights.items()}


@dataclass(frozen=True)
class Case:
    name: str
    payload: Callable[[dict[str, np.ndarray]], bytes]
    request_id: int  # the id the error reply must carry
    code: str
    reason: str | None  # a regular expression the reason must match in full, or None


CASES = [
    Case("random_bytes", lambda w: random.Random(0).randbytes(200), 0, "malformed", r"invalid msgpack: \w+"),
    Case("truncated_msgpack", lambda w: encode(5, Hello())[:-4], 0, "malformed", r"invalid msgpack: \w+"),
    Case("never_used_byte", lambda w: b"\xc1", 0, "malformed", r"invalid msgpack: \w+"),
    Case(
        "msgpack_not_an_envelope",
        lambda w: msgpack.packb([1, 2, 3]),
        0,
        "malformed",
        r"envelope must be a map with keys v, id, kind and body",
    ),
    Case(
        "envelope_without_body",
        lambda w: msgpack.packb({"v": 1, "id": 4, "kind": "ping"}),
        0,
        "malformed",
        r"envelope must be a map with keys v, id, kind and body",
    ),
    Case("nested_too_deep", lambda w: b"\x91" * 100_000 + b"\x00", 0, "malformed", r"invalid msgpack: \w+"),
    Case(
        "extension_type",
        lambda w: msgpack.packb(msgpack.ExtType(5, b"x")),
        0,
        "malformed",
        r"msgpack extension type 5 is not allowed",
    ),
    Case("integer_map_key", lambda w: msgpack.packb({1: 2}), 0, "malformed", r"invalid msgpack: \w+"),
    Case(
        "id_not_an_integer",
        lambda w: pack("4", "ping", {}),
        0,
        "malformed",
        r"request id '4' is not an integer in 0\.\.\d+",
    ),
    Case(
        "id_a_boolean",
        lambda w: pack(True, "ping", {}),
        0,
        "malformed",
        r"request id True is not an integer in 0\.\.\d+",
    ),
    Case(
        "id_zero_is_reserved",
        lambda w: encode(0, Ping()),
        0,
        "malformed",
        r"request id 0 is reserved for unattributable errors",
    ),
    Case("body_not_a_map", lambda w: pack(6, "ping", [1]), 6, "malformed", r"ping body must be a map"),
    Case(
        "extra_field",
        lambda w: pack(7, "ping", {"x": 1}),
        7,
        "malformed",
        r"ping body has fields \['x'\], expected \[\]",
    ),
    Case("unknown_kind", lambda w: pack(8, "launch", {}), 8, "unknown_kind", r"message kind 'launch' is unknown"),
    Case(
        "reply_sent_as_request", lambda w: encode(9, Pong()), 9, "unknown_kind", r"message kind 'pong' is not a request"
    ),
    Case(
        "envelope_version_2",
        lambda w: pack(10, "ping", {}, v=2),
        10,
        "unsupported_version",
        r"protocol version 2 is not supported \(this peer speaks 1\)",
    ),
    Case(
        "hello_version_2",
        lambda w: encode(11, Hello(2)),
        11,
        "unsupported_version",
        r"protocol version 2 is not supported \(this worker speaks 1\)",
    ),
    Case(
        "plan_negative_lr",
        lambda w: pack(12, "fit", fit_body(w, lr=-1.0)),
        12,
        "malformed",
        r"lr must be a positive finite number, not -1\.0",
    ),
    Case(
        "plan_missing_field",
        lambda w: pack(13, "fit", {**fit_body(w), "plan": {"round": 1}}),
        13,
        "malformed",
        r"plan body has fields \['round'\], expected \['batch_size', 'lr', 'num_batches', 'round', 'seed'\]"
        r" and optionally \[('\w+'(, )?)+\]",
    ),
    Case(
        "tensor_dtype_not_allowed",
        lambda w: pack(
            14, "fit", fit_body(w, tensors={"conv1.bias": {"dtype": "object", "shape": [64], "data": bytes(512)}})
        ),
        14,
        "bad_tensor",
        r"tensor conv1\.bias has dtype 'object', not one of float16, .*",
    ),
    Case(
        "tensor_bytes_do_not_match_shape",
        lambda w: pack(
            15, "fit", fit_body(w, tensors={"conv1.bias": {"dtype": "float32", "shape": [65], "data": bytes(256)}})
        ),
        15,
        "bad_tensor",
        r"tensor conv1\.bias has 256 bytes but dtype float32 and shape \(65,\) need 260",
    ),
    Case(
        "tensor_data_not_bytes",
        lambda w: pack(
            16, "fit", fit_body(w, tensors={"conv1.bias": {"dtype": "float32", "shape": [1], "data": "abcd"}})
        ),
        16,
        "bad_tensor",
        r"tensor conv1\.bias data must be bytes, not str",
    ),
    Case(
        "weights_of_another_dtype",
        lambda w: encode(17, Fit("digits-cnn", retyped(w, "conv1.bias", w["conv1.bias"].astype(np.float64)), PLAN)),
        17,
        "incompatible",
        r"tensor conv1\.bias has dtype float64, the model needs float32",
    ),
    Case(
        "weights_of_another_shape",
        lambda w: encode(18, Fit("digits-cnn", retyped(w, "conv1.bias", w["conv1.bias"][:32]), PLAN)),
        18,
        "incompatible",
        r"tensor conv1\.bias has shape \(32,\), the model needs \(64,\)",
    ),
    Case(
        "weights_missing_a_tensor",
        lambda w: pack(19, "fit", fit_body(w, tensors={"fc2.bias": None})),
        19,
        "incompatible",
        r"weights do not fit the model: missing \['fc2\.bias'\], unexpected \[\]",
    ),
    Case(
        "weights_of_another_model",
        lambda w: encode(20, Evaluate("mnist-cnn", w, 32)),
        20,
        "incompatible",
        r"tensor conv1\.weight has shape \(64, 1, 3, 3\), the model needs \(20, 1, 5, 5\)",
    ),
    Case(
        "unknown_model",
        lambda w: encode(21, Fit("no-such-model", w, PLAN)),
        21,
        "unknown_model",
        r"model 'no-such-model' is not registered on this worker"
        r" \(it has mnist-cnn, digits-cnn; start it with --model to add one\)",
    ),
    Case(
        "weights_that_diverge",
        lambda w: encode(22, Fit("digits-cnn", retyped(w, "fc2.bias", np.full(10, np.nan, np.float32)), PLAN)),
        22,
        "internal",
        r"training diverged \(loss nan\); lower the learning rate",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_an_error_reply(dave: WorkerProcess, weights: dict[str, np.ndarray], case: Case) -> None:
    async def scenario() -> str:
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            await peer.send(case.payload(weights))
            reason = await peer.expect_error(case.request_id, case.code)
            await peer.assert_silent()
            # The session goes on.
            await peer.request(2, Ping())
            reply = await peer.receive()
            assert (reply.id, reply.message) == (2, Pong())
            return reason

    reason = run(scenario())
    if case.reason is not None:
        assert re.fullmatch(case.reason, reason), reason


def test_requests_before_hello_are_out_of_order(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            await peer.request(3, Fit("digits-cnn", weights, PLAN))
            assert await peer.expect_error(3, "out_of_order") == "fit before hello"
            await peer.request(4, Ping())
            assert await peer.expect_error(4, "out_of_order") == "ping before hello"
            # A hello of the wrong version does not open the session either.
            await peer.request(5, Hello(2))
            await peer.expect_error(5, "unsupported_version")
            await peer.request(6, Ping())
            assert await peer.expect_error(6, "out_of_order") == "ping before hello"
            info = await peer.hello(7)
            assert info.worker_id == "dave" and info.role == "trainer"
            await peer.request(8, Ping())
            assert (await peer.receive()).message == Pong()

    run(scenario())


def test_fit_on_the_evaluator_is_the_wrong_role(
    digits_workers: dict[str, WorkerProcess], weights: dict[str, np.ndarray]
) -> None:
    async def scenario() -> None:
        async with open_peer(digits_workers["testing"].uri) as peer:
            info = await peer.hello()
            assert info.role == "evaluator"
            await peer.request(2, Fit("digits-cnn", weights, PLAN))
            assert await peer.expect_error(2, "wrong_role") == "this worker is an evaluator and does not train"
            # It still evaluates.
            await peer.request(3, Evaluate("digits-cnn", weights, 128))
            reply = await peer.receive()
            assert reply.id == 3 and isinstance(reply.message, EvalResult)
            assert reply.message.num_examples == info.num_examples

    run(scenario())


def test_duplicate_in_flight_id_is_refused(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            await peer.request(20, Fit("digits-cnn", weights, TrainingPlan(1, 1, 300, 0.01, 1)))
            await peer.request(20, Ping())
            assert await peer.expect_error(20, "out_of_order") == "request id 20 is already in flight"
            fitted = await peer.receive()
            assert fitted.id == 20 and isinstance(fitted.message, FitResult)
            # Once answered, the id may be used again.
            await peer.request(20, Ping())
            assert await peer.receive() == Envelope(20, Pong())

    run(scenario())


def test_requests_past_the_in_flight_limit_are_busy(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            # A long fit holds the compute lock; seven evaluations queue behind it: eight in flight.
            await peer.request(2, Fit("digits-cnn", weights, TrainingPlan(1, 1, 1000, 0.01, 1)))
            for request_id in range(3, 10):
                await peer.request(request_id, Evaluate("digits-cnn", weights, 256))
            await peer.request(10, Ping())
            assert await peer.expect_error(10, "busy") == "9 requests in flight exceed limit of 8"
            replies = await peer.receive_many(8, timeout=60_000 * MS)
            assert sorted((reply.id, reply.message.kind) for reply in replies) == [(2, "fit_result")] + [
                (request_id, "eval_result") for request_id in range(3, 10)
            ]
            await peer.request(10, Ping())
            assert await peer.receive() == Envelope(10, Pong())

    run(scenario())


# -- Size limits ------------------------------------------------------------------------


def test_fragmented_message_over_the_limit_is_refused_and_the_session_goes_on(
    dave: WorkerProcess, weights: dict[str, np.ndarray]
) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            info = await peer.hello()
            # At the limit: the message is read whole, and found not to be msgpack.
            await peer.send([bytes(MiB)] * 3)
            assert (await peer.expect_error(0, "malformed")).startswith("invalid msgpack")
            # One byte past it: drained and refused.
            await peer.send([bytes(MiB)] * 3 + [b"\x00"])
            reason = await peer.expect_error(0, "too_large")
            assert reason == f"message with {FAULT_LIMIT + 1} bytes exceeds limit of {FAULT_LIMIT} bytes"
            # Far past it, in many fragments.
            await peer.send([bytes(MiB // 2)] * 16)
            await peer.expect_error(0, "too_large")
            await peer.assert_silent()
            # The same connection still trains; its fit request is just under the limit.
            assert len(encode(2, Fit("digits-cnn", weights, PLAN))) < FAULT_LIMIT
            assert_trained(await peer.fit(2, weights), weights, info.num_examples)

    run(scenario())


def test_single_frame_over_the_limit_closes_the_connection(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            # At the limit, one frame is accepted.
            await peer.send(bytes(FAULT_LIMIT))
            assert (await peer.expect_error(0, "malformed")).startswith("invalid msgpack")
            # One byte past it, websockets closes with 1009 (message too big).
            await peer.send(bytes(FAULT_LIMIT + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await peer.receive()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        async with open_peer(dave.uri) as peer:
            info = await peer.hello()
            assert_trained(await peer.fit(2, weights), weights, info.num_examples)

    run(scenario())


# -- The worker keeps serving -------------------------------------------------------------


def test_worker_survives_a_barrage_on_one_connection(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    """Every bad request above, pipelined on one connection, then a real fit on it and on a new one."""

    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            info = await peer.hello()
            assert [label for label, count in enumerate(info.histogram) if count] == [0, 5, 9]  # --digits 0,5,9
            for case in CASES:
                await peer.send(case.payload(weights))
            await peer.send([bytes(MiB)] * 4)  # too large, fragmented
            replies = await peer.receive_many(len(CASES) + 1)
            for reply in replies:
                assert isinstance(reply.message, Error)
                assert_clean(reply.message.reason)
            expected = sorted([(case.request_id, case.code) for case in CASES] + [(0, "too_large")])
            assert sorted((reply.id, reply.message.code) for reply in replies) == expected
            await peer.assert_silent()
            assert_trained(await peer.fit(100, weights), weights, info.num_examples)
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            assert_trained(await peer.fit(2, weights), weights, info.num_examples)

    run(scenario())
    assert dave.process.returncode is None, "the worker process died"


def test_ping_is_answered_while_a_long_fit_runs(dave: WorkerProcess, weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with open_peer(dave.uri) as peer:
            await peer.hello()
            long_plan = TrainingPlan(round=1, batch_size=1, num_batches=2000, lr=0.01, seed=5)
            await peer.request(2, Fit("digits-cnn", weights, long_plan))
            await asyncio.sleep(300 * MS)  # let the fit start in its thread
            latencies = []
            for request_id in (3, 4, 5):
                sent = time.perf_counter()
                await peer.request(request_id, Ping())
                reply = await peer.receive()
                latencies.append(time.perf_counter() - sent)
                assert reply == Envelope(request_id, Pong()), f"{reply.message.kind} came before the pong"
            fitted = await peer.receive(timeout=60_000 * MS)
            assert fitted.id == 2 and isinstance(fitted.message, FitResult)
            assert max(latencies) < fitted.message.seconds / 2, (latencies, fitted.message.seconds)

    run(scenario())


def test_two_connections_with_the_same_ids_get_only_their_own_replies(
    digits_workers: dict[str, WorkerProcess], weights: dict[str, np.ndarray]
) -> None:
    uri = digits_workers["alice"].uri

    async def session(requests: list[Any]) -> dict[int, str]:
        async with open_peer(uri) as peer:
            for request_id, message in enumerate(requests, start=1):
                await peer.request(request_id, message)
            replies = await peer.receive_many(len(requests))
            await peer.assert_silent()
            for reply in replies:
                if isinstance(reply.message, Info):
                    assert reply.message.worker_id == "alice"
            return {reply.id: reply.message.kind for reply in replies}

    async def scenario() -> tuple[dict[int, str], dict[int, str]]:
        first = session([Hello(), Fit("digits-cnn", weights, PLAN), Ping()])
        second = session([Hello(), Ping(), Evaluate("digits-cnn", weights, 64)])
        return await asyncio.gather(first, second)

    first, second = run(scenario())
    assert first == {1: "info", 2: "fit_result", 3: "pong"}
    assert second == {1: "info", 2: "pong", 3: "eval_result"}
