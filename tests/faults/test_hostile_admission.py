"""Hostile peers against a worker's connection slots (issue 14, item 4).

Peers that never authenticate must not keep a real coordinator out, idle
connections must be closed, and a connection that is busy (a long fit, an
update held for fetching, a slow upload) must not be taken for idle. Every
test drives a real worker process on 127.0.0.1 with raw websockets peers and
the real :class:`WorkerLink`; the pure admission rules are tested at their
limits first. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from conftest import THREADS, running_workers
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from syncfed.admission import Admission, IdleClock
from syncfed.exceptions import WorkerUnavailable
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    Envelope,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Ping,
    Pong,
    TrainingPlan,
    decode,
    encode,
    encode_fragments,
)

T = TypeVar("T")

TOKEN = b"0123456789abcdef0123456789abcdef"
MAX_SIZE = 16 * 2**20

# Durations, in seconds.
TEST_TIMEOUT = 90_000 * MS  # one test's event loop
PROMPT = 20_000 * MS  # a hello and a short fit, on a busy 2-core machine (about 4 s at load 12)
IDLE = 1.5  # the quiet worker's --idle-timeout
HANDSHAKE = 3.0  # the gate worker's --handshake-timeout
SLACK = 3000 * MS  # how late a worker may close what it should close
BATCH_DELAY = 0.5  # the quiet worker's --batch-delay: a fit of n batches takes n/2 s

PLAN = TrainingPlan(round=1, batch_size=8, num_batches=1, lr=0.05, seed=3)
LONG_PLAN = TrainingPlan(round=1, batch_size=8, num_batches=6, lr=0.05, seed=3)  # 3 s, twice IDLE


def run(coroutine: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_bytes(TOKEN + b"\n")
    return path


@pytest.fixture(scope="module")
def locked(token_file: Path) -> Iterator[WorkerProcess]:
    """A token worker with two slots and every other setting at its default."""
    arguments = [*THREADS, "--digits", "1,2", "--auth-token-file", str(token_file), "--max-connections", "2"]
    with running_workers([("locked", arguments)]) as workers:
        yield workers["locked"]


@pytest.fixture(scope="module")
def gate(token_file: Path) -> Iterator[WorkerProcess]:
    """A token worker with one slot, three pending places and a short handshake timeout."""
    arguments = [
        *THREADS,
        "--digits",
        "3,4",
        "--auth-token-file",
        str(token_file),
        "--max-connections",
        "1",
        "--max-pending-connections",
        "3",
        "--handshake-timeout",
        str(HANDSHAKE),
    ]
    with running_workers([("gate", arguments)]) as workers:
        yield workers["gate"]


@pytest.fixture(scope="module")
def quiet() -> Iterator[WorkerProcess]:
    """A worker without a token: two slots, a short idle timeout, slow batches."""
    arguments = [
        *THREADS,
        "--digits",
        "5,6",
        "--max-connections",
        "2",
        "--idle-timeout",
        str(IDLE),
        "--batch-delay",
        str(BATCH_DELAY),
    ]
    with running_workers([("quiet", arguments)]) as workers:
        yield workers["quiet"]


def figures(name: str, **values: object) -> None:
    """Print what a test measured (``pytest -s``), for docs/security.md."""
    print(f"\n[figures] {name}: " + ", ".join(f"{key}={value}" for key, value in values.items()))


def weights() -> dict[str, np.ndarray]:
    return get_weights(DigitsCNN())


def client(worker: WorkerProcess, token: bytes | None = None) -> WorkerLink:
    return WorkerLink(worker.worker_id, worker.uri, max_message_size=MAX_SIZE, connect_timeout=PROMPT, auth_token=token)


async def raw(uri: str, **options: Any) -> ClientConnection:
    return await connect(uri, compression=None, max_size=None, open_timeout=PROMPT, close_timeout=1000 * MS, **options)


async def attackers(uri: str, count: int, *, challenged: bool) -> tuple[list[ClientConnection], int]:
    """``count`` peers that connect one after the other and then send nothing; and how many got HTTP 503.

    With ``challenged`` each waits for the worker's challenge, so its session runs before the next one comes.
    """
    opened: list[ClientConnection] = []
    refused = 0
    for _ in range(count):
        try:
            connection = await raw(uri)
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            refused += 1
            continue
        if challenged:
            async with asyncio.timeout(PROMPT):
                await connection.recv(decode=False)
        opened.append(connection)
    return opened, refused


async def closed_after(connection: ClientConnection, since: float, timeout: float) -> tuple[float, int | None, str]:
    """Seconds from ``since`` until the worker closes ``connection``, with its close code and reason."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await connection.recv(decode=False)
    rcvd = connection.protocol.close_rcvd
    return time.monotonic() - since, rcvd.code if rcvd else None, rcvd.reason if rcvd else ""


@contextlib.asynccontextmanager
async def closing(connections: list[ClientConnection]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for connection in connections:
            connection.transport.abort()


async def hello_and_fit(worker_client: WorkerLink, plan: TrainingPlan = PLAN) -> float:
    """Seconds a hello and a fit take on an open client."""
    started = time.monotonic()
    info = await worker_client.request(Hello(), timeout=PROMPT)
    assert isinstance(info, Info)
    reply = await worker_client.request(Fit("digits-cnn", weights(), plan), timeout=PROMPT + 5 * IDLE)
    assert isinstance(reply, FitResult) and reply.num_examples > 0
    return time.monotonic() - started


# The pure rules.


def test_admission_counts_only_authenticated_connections() -> None:
    admission: Admission[str] = Admission(max_connections=2, max_pending=3)
    for peer in "abc":
        assert admission.arrive(peer) is None  # under and at the pending limit
    assert not admission.full
    assert admission.arrive("d") == "a"  # one past it: the oldest goes
    assert not admission.authenticate("a")  # an evicted peer gets no slot
    assert admission.authenticate("b") and admission.authenticate("c")
    assert admission.full and admission.counts == (2, 1)
    assert not admission.authenticate("d")  # no free slot: forgotten
    assert admission.counts == (2, 0)
    admission.leave("b")
    admission.leave("b")  # idempotent
    assert not admission.full and admission.counts == (1, 0)


def test_idle_clock_deadlines() -> None:
    clock = IdleClock(100.0, handshake_timeout=10.0, idle_timeout=60.0)
    assert clock.deadline(100.0, authenticated=False, busy=False) == (110.0, "no hello within 10 s")
    assert clock.deadline(100.0, authenticated=True, busy=False) == (160.0, "idle for 60 s")
    assert clock.deadline(500.0, authenticated=True, busy=True) == (560.0, "idle for 60 s")  # looked at again
    clock.fragment(150.0)  # a message arriving: quiet since its last fragment
    assert clock.deadline(150.0, authenticated=True, busy=False) == (210.0, "idle for 60 s")
    clock.fragment(None)
    clock.used(170.0)
    assert clock.deadline(170.0, authenticated=True, busy=False) == (230.0, "idle for 60 s")
    off = IdleClock(0.0, handshake_timeout=10.0, idle_timeout=0)
    assert off.deadline(1e9, authenticated=True, busy=False) is None


# (a) Peers that never answer the token challenge.


def test_silent_peers_do_not_lock_out_a_coordinator_with_the_token(locked: WorkerProcess) -> None:
    """Four peers (twice --max-connections) hold the challenge unanswered; the coordinator gets in at once."""

    async def scenario() -> tuple[int, float, float]:
        opened, refused = await attackers(locked.uri, 4, challenged=False)
        async with closing(opened):
            started = time.monotonic()
            async with client(locked, TOKEN) as coordinator:
                connected = time.monotonic() - started
                served = await hello_and_fit(coordinator)
            return refused, connected, served

    refused, connected, served = run(scenario())
    assert refused == 0  # none of the silent peers was turned away either: they wait apart
    assert connected < PROMPT and served < PROMPT
    figures("4 silent peers, --max-connections 2", connect_s=f"{connected:.3f}", hello_and_fit_s=f"{served:.3f}")


def test_a_coordinator_gets_in_through_a_churn_of_silent_peers(locked: WorkerProcess) -> None:
    """More silent peers than pending places, each reconnecting the moment it is dropped: every arrival
    evicts the oldest, yet the coordinator, which answers its challenge within one round trip, gets in."""
    churners, attempts_allowed = 80, 5  # 80 > the 64 pending places of the default

    async def churn(stop: asyncio.Event, opened: list[int]) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, TimeoutError, InvalidStatus, ConnectionClosed):
                connection = await raw(locked.uri)
                opened[0] += 1
                try:
                    await connection.wait_closed()  # dropped for a newcomer, or the handshake timeout
                finally:
                    connection.transport.abort()

    async def scenario() -> tuple[int, float, int]:
        stop, opened = asyncio.Event(), [0]
        tasks = [asyncio.create_task(churn(stop, opened)) for _ in range(churners)]
        try:
            await asyncio.sleep(2000 * MS)  # the queue is full and turning over
            started = time.monotonic()
            for attempt in range(1, attempts_allowed + 1):
                try:
                    async with client(locked, TOKEN) as coordinator:
                        await hello_and_fit(coordinator)
                    return attempt, time.monotonic() - started, opened[0]
                except WorkerUnavailable:
                    continue
            raise AssertionError(f"no way in after {attempts_allowed} attempts among {opened[0]} churning connections")
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    attempts, seconds, opened = run(scenario())
    figures(f"{churners} churning silent peers", attempts=attempts, in_and_served_s=f"{seconds:.2f}", opened=opened)


def test_the_oldest_silent_peer_makes_room_and_slots_stay_capped(gate: WorkerProcess) -> None:
    """Six silent peers against three pending places: the oldest are dropped, the coordinator still gets in;
    a second coordinator beyond --max-connections 1 gets HTTP 503; the silent ones time out with 1008."""

    async def scenario() -> tuple[list[bool], float, str, list[tuple[float, int | None, str]]]:
        started = time.monotonic()
        opened, refused = await attackers(gate.uri, 6, challenged=True)
        assert refused == 0
        async with closing(opened):
            await asyncio.sleep(200 * MS)
            alive = [connection.state is State.OPEN for connection in opened]
            watched = [
                asyncio.create_task(closed_after(connection, started, HANDSHAKE + SLACK)) for connection in opened[4:]
            ]
            async with client(gate, TOKEN) as coordinator:
                served = await hello_and_fit(coordinator)
                with pytest.raises(WorkerUnavailable) as second:
                    await client(gate, TOKEN).connect()
            ends = await asyncio.gather(*watched)
            return alive, served, second.value.reason, ends

    alive, served, refusal, ends = run(scenario())
    assert alive == [False, False, False, True, True, True]
    assert served < PROMPT
    assert refusal.endswith("answered HTTP 503: too many connections")
    for seconds, code, reason in ends:  # opened[3] made room for the coordinator
        assert code == 1008 and reason == "authentication failed: no answer in time"
        assert HANDSHAKE <= seconds < HANDSHAKE + SLACK
    figures(
        "6 silent peers, 3 pending places, 1 slot",
        hello_and_fit_s=f"{served:.3f}",
        closed_after_s=[f"{seconds:.2f}" for seconds, _, _ in ends],
    )


def test_a_coordinator_dropped_from_the_queue_is_unavailable_not_refused(gate: WorkerProcess) -> None:
    """Losing the race to silent peers is no wrong token: the coordinator retries such a worker later."""

    async def scenario() -> str:
        victim = await raw(gate.uri)  # a coordinator that has not answered its challenge yet
        async with closing([victim]):
            opened, _ = await attackers(gate.uri, 3, challenged=True)  # the queue's 3 places: it goes
            async with closing(opened):
                with pytest.raises(WorkerUnavailable) as dropped:
                    await client(gate, TOKEN)._authenticate(victim, TOKEN)
                return dropped.value.reason

    assert run(scenario()).startswith("connection lost while authenticating")


# (b) Without a token: idle connections.


def test_idle_peers_without_hello_are_closed_and_do_not_lock_out(quiet: WorkerProcess) -> None:
    async def scenario() -> tuple[float, list[tuple[float, int | None, str]]]:
        started = time.monotonic()
        opened, refused = await attackers(quiet.uri, 4, challenged=False)
        assert refused == 0
        async with closing(opened):
            watched = [asyncio.create_task(closed_after(connection, started, IDLE + SLACK)) for connection in opened]
            async with client(quiet) as coordinator:
                served = await hello_and_fit(coordinator)
            ends = await asyncio.gather(*watched)
        return served, ends

    served, ends = run(scenario())
    assert served < PROMPT
    for seconds, code, reason in ends:
        assert (code, reason) == (1008, f"idle for {IDLE:g} s")
        assert IDLE <= seconds < IDLE + SLACK
    figures(
        "4 idle peers without hello, --idle-timeout 1.5",
        hello_and_fit_s=f"{served:.3f}",
        closed_after_s=[f"{seconds:.2f}" for seconds, _, _ in ends],
    )


def test_pings_do_not_keep_a_connection_alive(quiet: WorkerProcess) -> None:
    """A peer that sends hello and then only pings (protocol and websocket) is closed as idle."""

    async def pinging(connection: ClientConnection) -> int:
        request_id, pongs = 2, 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                await connection.send(encode(request_id, Ping()))
                reply: Envelope = decode(await connection.recv(decode=False))
                assert isinstance(reply.message, Pong)
                pongs += 1
                request_id += 1
                await asyncio.sleep(IDLE / 5)
        return pongs

    async def scenario() -> tuple[float, int | None, str, int]:
        connection = await raw(quiet.uri, ping_interval=IDLE / 5)
        async with closing([connection]):
            greeted = time.monotonic()  # before the worker's idle clock starts: when it has answered
            await connection.send(encode(1, Hello()))
            assert isinstance(decode(await connection.recv(decode=False)).message, Info)
            async with asyncio.timeout(IDLE + SLACK):
                pongs = await pinging(connection)
            seconds, code, reason = await closed_after(connection, greeted, SLACK)
            return seconds, code, reason, pongs

    seconds, code, reason, pongs = run(scenario())
    assert (code, reason) == (1008, f"idle for {IDLE:g} s")
    assert IDLE <= seconds < IDLE + SLACK
    assert pongs >= 3  # it was answered all along
    figures("a peer that only pings, --idle-timeout 1.5", closed_after_s=f"{seconds:.2f}", pongs=pongs)


# (c) A busy connection is not idle.


def test_a_busy_coordinator_is_not_cut_off(quiet: WorkerProcess) -> None:
    """A fit twice as long as the idle timeout, an update held twice as long, and a slow upload all go through;
    once the coordinator really is idle, the worker closes its connection."""

    async def slow_upload(connection: ClientConnection, request_id: int) -> FitResult:
        outgoing = encode_fragments(request_id, Fit("digits-cnn", weights(), PLAN), chunk_size=64 * 2**10)
        pieces = list(outgoing.fragments())
        pause = 2 * IDLE / len(pieces)  # the whole upload takes twice the idle timeout

        async def trickle() -> AsyncIterator[bytes]:
            for piece in pieces:
                await asyncio.sleep(pause)
                yield bytes(piece)

        await connection.send(trickle())
        reply = decode(await connection.recv(decode=False))
        assert reply.id == request_id and isinstance(reply.message, FitResult), reply
        return reply.message

    async def scenario() -> tuple[float, float, float]:
        async with client(quiet) as coordinator:
            long_fit = await hello_and_fit(coordinator, LONG_PLAN)
            held = await coordinator.request(
                Fit(
                    "digits-cnn",
                    weights(),
                    TrainingPlan(round=2, batch_size=8, num_batches=1, lr=0.05, seed=3, hold=True),
                ),
                timeout=PROMPT,
            )
            assert isinstance(held, FitHeld)
            await asyncio.sleep(2 * IDLE)
            last_request = time.monotonic()  # the worker's idle clock starts after it, when the reply is sent
            fetched = await coordinator.request(Fetch(held.token), timeout=PROMPT)
            assert isinstance(fetched, FitResult)
            async with asyncio.timeout(IDLE + SLACK):
                while coordinator.connected:
                    await asyncio.sleep(50 * MS)
            cut = time.monotonic() - last_request
        connection = await raw(quiet.uri)
        async with closing([connection]):
            await connection.send(encode(1, Hello()))
            assert isinstance(decode(await connection.recv(decode=False)).message, Info)
            started = time.monotonic()
            await slow_upload(connection, 2)
            upload = time.monotonic() - started
        return long_fit, cut, upload

    long_fit, cut, upload = run(scenario())
    assert long_fit > 2 * IDLE  # it really was longer than the idle timeout
    assert IDLE <= cut < IDLE + SLACK
    assert upload > 2 * IDLE
    figures(
        "busy coordinator, --idle-timeout 1.5",
        long_fit_s=f"{long_fit:.2f}",
        held_s=f"{2 * IDLE:.1f}",
        slow_upload_s=f"{upload:.2f}",
        closed_once_idle_after_s=f"{cut:.2f}",
    )
