"""Fault tests: peers that send garbage, break the rules, stall or die.

Worker side: a raw websockets client sends a real worker process bad bytes,
bad envelopes, bad tensors and oversized messages; each gets an error reply
with a code and a short reason, and the worker keeps serving. Coordinator
side: fake workers that stall, send garbage or vanish, workers that disagree,
and workers that are not there.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
import torch
from conftest import REPO
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator
from syncfed.exceptions import IncompatibleWorkers, MessageTooLarge, ProtocolError, RemoteError, WorkerUnavailable
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess, spawn_workers
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

T = TypeVar("T")

FAULT_LIMIT = 3 * 2**20  # dave's --max-message-size in conftest.py
MiB = 2**20
REPLY_TIMEOUT = 30_000 * MS  # any one reply, a short fit included
TEST_TIMEOUT = 90_000 * MS  # one test's event loop
QUIET = 300 * MS  # of silence that show no further reply is coming
CLI_TIMEOUT = 60_000 * MS

PLAN = TrainingPlan(round=1, batch_size=8, num_batches=3, lr=0.05, seed=3)


def run(coroutine: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


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
def weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return get_weights(DigitsCNN())


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


# -- Coordinator side: workers that disagree ----------------------------------------------


def incompatible(workers: dict[str, str], evaluator: dict[str, str], tmp_path: Path, **settings: Any) -> str:
    metrics = tmp_path / "metrics.jsonl"
    config = CoordinatorConfig(
        workers=workers,
        evaluator=evaluator,
        training_rounds=1,
        metrics_out=metrics,
        connect_timeout=10_000 * MS,
        **settings,
    )
    with pytest.raises(IncompatibleWorkers) as raised:
        run(Coordinator(config, report=lambda _: None).run())
    assert not metrics.exists(), "the run started although the workers disagree"
    return str(raised.value)


def test_workers_with_different_data_sets_are_refused(
    digits_workers: dict[str, WorkerProcess], mnist_worker: WorkerProcess, tmp_path: Path
) -> None:
    message = incompatible(
        {"alice": mnist_worker.uri, "bob": digits_workers["bob"].uri},
        {"testing": digits_workers["testing"].uri},
        tmp_path,
    )
    assert message == "bob has dataset digits, but alice has mnist"


def test_roles_and_names_must_match_the_listing(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    uri = {name: worker.uri for name, worker in digits_workers.items()}
    assert (
        incompatible({"alice": uri["alice"], "testing": uri["testing"]}, {}, tmp_path)
        == "testing is an evaluator (started with --testing) but is listed as the trainer"
    )
    assert incompatible({"bob": uri["alice"]}, {}, tmp_path) == "the worker listed as bob says it is alice"


def test_a_trainer_listed_as_the_evaluator_is_refused(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    message = incompatible({"alice": digits_workers["alice"].uri}, {"bob": digits_workers["bob"].uri}, tmp_path)
    assert message == "bob is a trainer (started without --testing) but is listed as the evaluator"


def test_models_the_workers_cannot_use_are_refused(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    workers = {"alice": digits_workers["alice"].uri}
    assert incompatible(workers, {}, tmp_path, model="mypkg.models:Net") == (
        "alice cannot build model mypkg.models:Net (it has mnist-cnn, digits-cnn);"
        " start it with --model mypkg.models:Net"
    )
    message = incompatible(workers, {}, tmp_path, model="mnist-cnn")
    assert message.startswith(
        "model mnist-cnn does not fit the workers' digits data: model fails on input of shape (1, 1, 8, 8)"
    )


# -- Coordinator side: workers that are not there, stall, send garbage or die ---------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_client_fails_fast_on_a_closed_port_when_not_waiting_for_a_start() -> None:
    """As a rejoin attempt does: its own backoff paces the tries (tests/unit/net/test_connect_wait.py waits)."""
    port = free_port()

    async def scenario() -> None:
        client = WorkerLink("ghost", f"ws://127.0.0.1:{port}", max_message_size=MiB, connect_timeout=20_000 * MS)
        with pytest.raises(WorkerUnavailable) as raised:
            await client.connect(wait_for_start=False)
        assert raised.value.worker == "ghost"
        assert str(raised.value).startswith(f"worker ghost is unavailable: cannot connect to ws://127.0.0.1:{port}")
        with pytest.raises(WorkerUnavailable, match="not connected"):
            await client.request(Ping())

    started = time.perf_counter()
    run(scenario(), timeout=10_000 * MS)
    assert time.perf_counter() - started < 3, "a refused connection must not wait for the connect timeout"


def test_client_gives_up_on_a_silent_listener() -> None:
    """A port that accepts TCP but never answers the websocket handshake."""

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            uri = f"ws://127.0.0.1:{listener.getsockname()[1]}"
            client = WorkerLink("mute", uri, max_message_size=MiB, connect_timeout=500 * MS)
            with pytest.raises(WorkerUnavailable) as raised:
                await client.connect()
            assert str(raised.value) == f"worker mute is unavailable: no connection to {uri} within 0.5 s"

    run(scenario(), timeout=10_000 * MS)


Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def fake_worker(handler: Handler) -> AsyncIterator[str]:
    """A websocket server on 127.0.0.1 that answers as ``handler`` likes."""
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def stalls(connection: ServerConnection) -> None:
    async for _ in connection:
        pass  # reads every request, answers none


async def sends_garbage(connection: ServerConnection) -> None:
    async for _ in connection:
        await connection.send(b"\xc1garbage")


async def hangs_up(connection: ServerConnection) -> None:
    await connection.recv()
    await connection.close(1011, "gone")


async def answers_wrong_kind(connection: ServerConnection) -> None:
    async for data in connection:
        await connection.send(encode(decode(data).id, Pong()))


async def answers_error(connection: ServerConnection) -> None:
    async for data in connection:
        await connection.send(encode(decode(data).id, Error("busy", "3 requests in flight exceed limit of 2")))


async def request_via(handler: Handler, message: Any, timeout: float = 5000 * MS) -> Any:
    async with fake_worker(handler) as uri:
        async with WorkerLink(
            "fake", uri, max_message_size=MiB, connect_timeout=5000 * MS, request_timeout=timeout
        ) as client:
            return await client.request(message)


def test_client_times_out_on_a_stalled_worker() -> None:
    with pytest.raises(WorkerUnavailable) as raised:
        run(request_via(stalls, Ping(), timeout=300 * MS), timeout=10_000 * MS)
    assert str(raised.value) == "worker fake is unavailable: no reply to ping within 0.3 s"


def test_client_drops_a_worker_that_sends_garbage() -> None:
    with pytest.raises(WorkerUnavailable) as raised:
        run(request_via(sends_garbage, Ping()), timeout=10_000 * MS)
    assert str(raised.value).startswith("worker fake is unavailable: sent an invalid reply: invalid msgpack")


def test_client_reports_a_worker_that_hangs_up() -> None:
    with pytest.raises(WorkerUnavailable) as raised:
        run(request_via(hangs_up, Hello()), timeout=10_000 * MS)
    assert str(raised.value).startswith("worker fake is unavailable: connection lost (")
    assert "1011" in str(raised.value)


def test_client_refuses_a_reply_of_the_wrong_kind() -> None:
    with pytest.raises(ProtocolError) as raised:
        run(request_via(answers_wrong_kind, Hello()), timeout=10_000 * MS)
    assert str(raised.value) == "fake answered hello with pong, expected info"


def test_client_turns_an_error_reply_into_a_remote_error() -> None:
    with pytest.raises(RemoteError) as raised:
        run(request_via(answers_error, Ping()), timeout=10_000 * MS)
    assert (raised.value.peer, raised.value.code) == ("fake", "busy")
    assert str(raised.value) == "fake answered with error busy: 3 requests in flight exceed limit of 2"


def test_a_reply_over_the_client_limit_fails_its_request_clearly(
    digits_workers: dict[str, WorkerProcess], weights: dict[str, np.ndarray]
) -> None:
    """The coordinator's limit holds for replies too: a 2.4 MB fit result against a 2 MiB limit.

    The reply comes streamed (1 MiB fragments by default), so it is read to its end
    and dropped: its request fails naming the limit, and the connection goes on."""

    async def scenario() -> None:
        uri = digits_workers["alice"].uri
        async with WorkerLink("alice", uri, max_message_size=2 * MiB, connect_timeout=10_000 * MS) as client:
            await client.request(Hello())
            with pytest.raises(MessageTooLarge) as raised:
                await client.request(Fit("digits-cnn", weights, PLAN), timeout=30_000 * MS)
            assert re.fullmatch(rf"message with \d+ bytes exceeds limit of {2 * MiB} bytes", str(raised.value))
            assert raised.value.size > 2 * MiB
            assert isinstance(await client.request(Hello()), Info)  # the connection goes on

    run(scenario())


def test_a_worker_that_dies_mid_fit_fails_the_request(
    disposable_worker: WorkerProcess, weights: dict[str, np.ndarray]
) -> None:
    async def scenario() -> None:
        async with WorkerLink(
            "erin", disposable_worker.uri, max_message_size=2**30, connect_timeout=10_000 * MS
        ) as client:
            await client.request(Hello())
            long_plan = TrainingPlan(round=1, batch_size=1, num_batches=100_000, lr=0.01, seed=1)
            fit = asyncio.create_task(client.request(Fit("digits-cnn", weights, long_plan), timeout=60_000 * MS))
            await asyncio.sleep(500 * MS)
            assert not fit.done()
            os.kill(disposable_worker.process.pid, signal.SIGKILL)
            started = time.perf_counter()
            with pytest.raises(WorkerUnavailable) as raised:
                await fit
            assert time.perf_counter() - started < 5
            assert str(raised.value).startswith("worker erin is unavailable: connection lost (")
            with pytest.raises(WorkerUnavailable):
                await client.request(Ping())

    run(scenario(), timeout=30_000 * MS)


def test_a_worker_that_cannot_start_is_reported_with_its_last_words() -> None:
    async def scenario() -> None:
        with pytest.raises(WorkerUnavailable) as raised:
            async with spawn_workers([("zed", ["--threads", "1", "--digits", "42"])], startup_timeout=60_000 * MS):
                raise AssertionError("the worker started")
        message = str(raised.value)
        assert message.startswith("worker zed is unavailable: process exited with status 2: ")
        assert "run_websocket_server.py: error: digits entry '42' is not within 0..9" in message
        assert "Traceback" not in message

    run(scenario(), timeout=90_000 * MS)


# -- The command line ---------------------------------------------------------------------


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_websocket_client.py", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def test_cli_waits_for_an_unreachable_worker_then_exits_with_one_line() -> None:
    """It may still be starting: the coordinator says whom it waits for, then gives up at --connect-timeout."""
    port = free_port()
    done = run_cli(["--workers", f"alice=ws://127.0.0.1:{port}", "--evaluator", "", "--connect-timeout", "2"])
    assert done.returncode == 5  # WorkerUnavailable
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].endswith(f"WARNING waiting for alice at 127.0.0.1:{port} (connection refused), up to 2 s")
    assert lines[1] == (
        f"run_websocket_client.py: error: worker alice is unavailable: no connection to ws://127.0.0.1:{port}"
        " within 2 s (connection refused)"
    )


def test_cli_exits_with_one_line_when_workers_disagree(digits_workers: dict[str, WorkerProcess]) -> None:
    workers = f"alice={digits_workers['alice'].uri},testing={digits_workers['testing'].uri}"
    done = run_cli(["--workers", workers, "--evaluator", "", "--connect_timeout", "10"])
    assert done.returncode == 4  # IncompatibleWorkers
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "run_websocket_client.py: error: testing is an evaluator (started with --testing) but is listed as the trainer"
    ]


def children_of(pid: int) -> list[int]:
    """Ids of the processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interruptible() -> None:
    """Default Ctrl-C handling in the child, even when this test run was started with SIGINT ignored (``cmd &``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sent", "status", "line"),
    [
        pytest.param(signal.SIGINT, 130, "run_websocket_client.py: interrupted", id="ctrl-c"),
        pytest.param(signal.SIGTERM, 143, "run_websocket_client.py: terminated", id="sigterm"),
    ],
)
def test_ctrl_c_or_sigterm_stops_the_cli_and_its_spawned_workers(
    tmp_path: Path, sent: signal.Signals, status: int, line: str
) -> None:
    """SIGTERM (kill, a service manager, a benchmark's timeout) stops the spawned workers too, as Ctrl-C does."""
    metrics = tmp_path / "metrics.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "run_websocket_client.py",
            "--spawn-workers",
            "--workers",
            "alice=ws://localhost:1",
            "--evaluator",
            "",
            "--training-rounds",
            "100000",
            "--metrics-out",
            str(metrics),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while not (metrics.exists() and metrics.read_text().strip()):  # training has begun
            assert process.poll() is None, process.communicate(timeout=5000 * MS)
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(100 * MS)
        workers = children_of(process.pid)
        assert len(workers) == 1
        process.send_signal(sent)
        out, err = process.communicate(timeout=30_000 * MS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10_000 * MS)
    assert process.returncode == status
    assert "Traceback" not in err
    assert err.splitlines() == [line]
    assert not any(is_running(pid) for pid in workers), "a spawned worker outlived the coordinator"


def test_ctrl_c_stops_a_worker_with_one_line() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "run_websocket_server.py",
            "--id",
            "alice",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        preexec_fn=interruptible,
    )
    ready = re.compile(r"syncfed worker alice listening on ws://127\.0\.0\.1:\d+")
    try:
        assert process.stdout is not None
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + CLI_TIMEOUT
            while not any(ready.fullmatch(line) for line in output.decode().splitlines()):
                left = deadline - time.monotonic()
                assert left > 0 and selector.select(left), f"no ready line in time: {output!r}"
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"the worker exited: {output!r}"
                output += chunk
        first = output.decode().splitlines()[0]
        assert first == "alice holds 576 training examples of digits, digits 0-3 (0: 142, 1: 146, 2: 142, 3: 146)"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30_000 * MS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10_000 * MS)
    assert process.returncode == 130
    assert b"Traceback" not in err
    assert err.decode().splitlines() == ["run_websocket_server.py: stopped"]
