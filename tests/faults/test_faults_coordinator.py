"""Fault tests, coordinator side: workers that disagree, are not there, stall, send garbage or die.

The coordinator and its worker link meet real worker processes that disagree
with the listing or with each other, fake workers that stall, send garbage,
answer out of turn or hang up, and workers that die or cannot start; each is
refused or dropped with one clear message. The ``weights`` fixture comes from
faults_kit.py, imported by name so that pytest finds it here.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faults_kit import PLAN, MiB, free_port, run
from faults_kit import weights as weights
from units import MS
from websockets.asyncio.server import ServerConnection, serve

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator
from syncfed.exceptions import IncompatibleWorkers, MessageTooLarge, ProtocolError, RemoteError, WorkerUnavailable
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess, spawn_workers
from syncfed.protocol import Error, Fit, Hello, Info, Ping, Pong, TrainingPlan, decode, encode

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
