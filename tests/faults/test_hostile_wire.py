"""Hostile peers on the wire (issue 14, items 1, 2 and 7): decoding cost is bounded by message size.

Each attack is sent as the review sent it, to a real worker process on
127.0.0.1 or, for the coordinator's side, to a real :class:`WorkerLink`
from a fake worker. Memory is measured with tracemalloc in this process
(pure decoding and the client) and as the worker's RSS (``/proc``).
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
from conftest import THREADS, running_workers
from units import MS
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from syncfed.exceptions import ProtocolError, RemoteError, WorkerUnavailable
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    STREAM_MAGIC,
    Envelope,
    Error,
    FitResult,
    Hello,
    Info,
    MessageDecoder,
    Ping,
    Query,
    SecAggUnmask,
    decode,
    encode,
    encode_fragments,
)
from syncfed.protocol.unpacking import AMPLIFICATION, BUDGET_FLOOR, budget, decoded_cost
from syncfed.secagg import UnmaskRequest, neighbour_graph, neighbours_of

T = TypeVar("T")

MiB = 2**20
#: The hostile-wire worker's message size limit: a bomb at the limit is cheap to build and send.
LIMIT = 16 * MiB
#: Seconds any reply may take; the review's graph bomb froze the worker for 55 s.
REPLY_TIMEOUT = 10_000 * MS
#: The longest ping round trip allowed on a second connection while an attack is processed.
MAX_STALL = 1.0


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 60_000 * MS) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


def pack(request_id: int, kind: str, body: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)


def graph_bomb(request_id: int, clients: int = 20_000, neighbours: int = 2_000) -> bytes:
    """The review's 183-byte secagg_start: 20,000 clients of 2,000 neighbours each."""
    config = {
        "num_clients": clients,
        "threshold": neighbours,
        "length": 1,
        "graph_seed": 7,
        "bits": 32,
        "max_count": 1,
        "clip": 1.0,
        "session": b"s" * 32,
        "neighbours": neighbours,
    }
    return pack(request_id, "secagg_start", {"config": config, "client": 3})


def object_bomb(size: int, request_id: int = 5) -> bytes:
    """An array of empty maps: one byte per element on the wire, 64 bytes each once decoded."""
    return pack(request_id, "ping", [{}] * size)


def nested_bomb(size: int, request_id: int = 5) -> bytes:
    """Arrays of at most the array limit, nested so that no one container breaks a length limit."""
    inner = [{}] * 2**16
    return pack(request_id, "ping", [inner] * (size // 2**16))


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    arguments = [*THREADS, "--digits", "1,2", "--max-message-size", str(LIMIT)]
    with running_workers([("hostile", arguments)]) as workers:
        yield workers["hostile"]


async def reply(connection: Any, timeout: float = REPLY_TIMEOUT) -> Envelope:
    async with asyncio.timeout(timeout):
        return decode(await connection.recv())


async def attack_while_pinging(uri: str, attack: bytes | list[bytes], *, greet: bool) -> tuple[Envelope, float]:
    """Send ``attack`` on one connection while a second pings; return its reply and the slowest ping."""
    async with connect(uri, max_size=None) as hostile, connect(uri, max_size=None) as watcher:
        await watcher.send(encode(1, Hello()))
        await reply(watcher)
        if greet:
            await hostile.send(encode(1, Hello()))
            await reply(hostile)
        slowest = 0.0
        done = asyncio.Event()

        async def ping() -> None:
            nonlocal slowest
            request_id = 100
            while not done.is_set():
                request_id += 1
                started = time.perf_counter()
                await watcher.send(encode(request_id, Ping()))
                await reply(watcher)
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(10 * MS)

        pinger = asyncio.create_task(ping())
        await asyncio.sleep(50 * MS)
        await hostile.send(attack)
        answer = await reply(hostile)
        done.set()
        await pinger
        return answer, slowest


# Item 1: the secure-aggregation graph bomb


def test_neighbours_of_one_client_match_the_whole_graph() -> None:
    for n, k, seed in [(2, 1, 0), (7, 4, 3), (10, 3, 9), (30, 29, 1), (64, 17 - 1, 5)]:
        graph = neighbour_graph(n, k, seed)
        assert [neighbours_of(u, n, k, seed) for u in range(n)] == list(graph)


def test_a_config_at_the_protocol_limits_is_checked_without_building_the_graph() -> None:
    """65,536 x 65,534 is legal on the wire; reading it must cost nothing like n * k."""
    started = time.perf_counter()
    envelope = decode(graph_bomb(4, clients=65_536, neighbours=65_534))
    assert time.perf_counter() - started < 0.5
    assert envelope.message.config.num_clients == 65_536  # type: ignore[attr-defined]


def test_graph_bomb_before_hello_is_refused_before_its_body_is_built(worker: WorkerProcess) -> None:
    answer, slowest = run(attack_while_pinging(worker.uri, graph_bomb(2), greet=False))
    assert answer.id == 2 and answer.message == Error("out_of_order", "secagg_start before hello")
    assert slowest < MAX_STALL, slowest


def test_graph_bomb_after_hello_is_refused_with_the_limit(worker: WorkerProcess) -> None:
    before = rss(worker.process.pid)
    answer, slowest = run(attack_while_pinging(worker.uri, graph_bomb(2), greet=True))
    assert answer.id == 2 and answer.message == Error("refused", "round of 20000 clients exceeds limit of 1024 clients")
    assert slowest < MAX_STALL, slowest
    assert rss(worker.process.pid) - before < 50 * MiB


def test_a_round_at_the_worker_limit_starts_without_a_stall(worker: WorkerProcess) -> None:
    answer, slowest = run(attack_while_pinging(worker.uri, graph_bomb(2, 1024, 1022), greet=True))
    assert answer.id == 2 and answer.message.kind == "secagg_keys"
    assert slowest < MAX_STALL, slowest


# Item 2: msgpack object bombs, and amplification at most 8 times


def decoding_peak(data: bytes, **options: Any) -> tuple[int, Exception | None]:
    """Peak Python memory of decoding ``data``, and the error it raised, if any."""
    tracemalloc.start()
    try:
        decode(data, **options)
        error = None
    except ProtocolError as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


@pytest.mark.parametrize("bomb", [object_bomb, nested_bomb])
def test_object_bombs_at_the_limit_are_refused_before_anything_is_built(bomb: Any) -> None:
    data = bomb(LIMIT)
    peak, error = decoding_peak(data, max_size=len(data))
    assert error is not None and error.code == "malformed" and error.request_id is None
    assert peak < MiB, peak


def test_a_streamed_header_bomb_is_refused_before_anything_is_built() -> None:
    header = pack(5, "fit_result", [[{}] * 2**16] * 200)
    data = STREAM_MAGIC + len(header).to_bytes(4, "big") + header
    peak, error = decoding_peak(data, max_size=LIMIT)
    assert error is not None and error.code == "malformed"
    assert peak < 3 * len(data), peak  # copies of the received bytes, no decoded objects


def legal_heavy_messages() -> list[tuple[str, bytes]]:
    """Legal messages dense in objects, as large as the budget lets them be."""
    weights = {f"layer{i}.weight": np.zeros(256, np.float32) for i in range(1000)}
    survivors, dropped = tuple(range(300, 5300, 2)), tuple(range(301, 5301, 2))
    return [
        ("query of 8,000 features", encode(3, Query("feature-stats", tuple(range(1000, 9_000))))),
        ("unmask of 5,000 clients", encode(3, SecAggUnmask(b"x" * 32, UnmaskRequest(survivors, dropped)))),
        ("fit_result of 1,000 small tensors", encode(3, FitResult(weights, 1, 0.0))),
        ("fit_result of 4 MiB", encode(3, FitResult({"w": np.zeros(MiB, np.float32)}, 1, 0.0))),
    ]


@pytest.mark.parametrize("label,data", legal_heavy_messages(), ids=lambda value: str(value)[:30])
def test_legal_messages_decode_within_their_budget(label: str, data: bytes) -> None:
    peak, error = decoding_peak(data)
    assert error is None, error
    assert peak <= budget(len(data)), (label, peak, len(data))
    assert peak <= decoded_cost(data), (label, peak, decoded_cost(data))


def test_decoding_amplifies_at_most_8_times_at_the_limit() -> None:
    """The worst message the budget accepts, at 16 MiB: one byte objects in as many containers as allowed."""
    # Arrays of 4,096 negative fixints (-32 is not cached: 32 bytes each): the densest accepted cost per byte.
    count = (LIMIT - 64) // 4099
    data = pack(5, "ping", [[-32] * 4096] * count)
    try:
        cost = decoded_cost(data)
    except ProtocolError:
        cost = None
    peak, error = decoding_peak(data, max_size=LIMIT)
    if error is None:  # accepted: then it held at most 8 bytes per byte (plus the floor)
        assert cost is not None and peak <= cost
    assert peak <= AMPLIFICATION * len(data) + BUDGET_FLOOR, peak
    assert peak <= AMPLIFICATION * len(data), peak  # at the limit the floor is not needed


def test_object_bomb_against_a_real_worker(worker: WorkerProcess) -> None:
    """16 MiB of empty maps grew a worker by 1.2 GB; now it is refused, and pings keep flowing."""
    before = peak_rss(worker.process.pid)
    data = object_bomb(LIMIT - 64, request_id=9)
    answer, slowest = run(attack_while_pinging(worker.uri, data, greet=True))
    assert answer.id == 0 and isinstance(answer.message, Error) and answer.message.code == "malformed"
    assert "exceeds limit of 262144 entries" in answer.message.reason
    assert slowest < MAX_STALL, slowest
    # The received bytes (16 MiB, a few copies in websockets) but nothing like 75 times them.
    assert peak_rss(worker.process.pid) - before < 4 * LIMIT


async def fake_worker(answer: bytes | None) -> Any:
    """A worker that answers hello with ``answer`` (None: never answers)."""

    async def handler(connection: ServerConnection) -> None:
        async for _ in connection:
            if answer is not None:
                await connection.send(answer)

    return await serve(handler, "127.0.0.1", 0, max_size=None, compression=None)


def test_a_bomb_reply_costs_the_coordinator_nothing_like_75_times() -> None:
    """A hostile worker answers hello with 16 MiB of empty maps (a 24 MiB reply took the coordinator to 3.9 GB)."""
    bomb = object_bomb(LIMIT - 64, request_id=1)

    async def scenario() -> tuple[Exception, int]:
        server = await fake_worker(bomb)
        port = next(iter(server.sockets)).getsockname()[1]
        async with server:
            client = WorkerLink("hostile", f"ws://127.0.0.1:{port}", max_message_size=LIMIT, ping_interval=None)
            await client.connect()
            tracemalloc.start()
            try:
                with pytest.raises((RemoteError, ProtocolError, WorkerUnavailable)) as info:
                    await client.request(Hello(), timeout=REPLY_TIMEOUT)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                await client.close()
            return info.value, peak

    error, peak = run(scenario())
    assert "exceeds limit of 262144 entries" in str(error)
    # The reply's bytes are held once or twice while they are read; decoding adds nothing.
    assert peak <= 3 * len(bomb), peak


# Item 7: too_large replies carry the request's id; id 0 fails everything in flight


def oversized(request_id: int) -> bytes:
    """A fit too large for the worker's limit, as one single-frame message."""
    return pack(
        request_id,
        "fit",
        {
            "model": "digits-cnn",
            "weights": {"w": {"dtype": "uint8", "shape": [LIMIT], "data": bytes(LIMIT)}},
            "plan": {},
        },
    )


@pytest.mark.parametrize("fragmented", [False, True])
def test_too_large_carries_the_request_id(worker: WorkerProcess, fragmented: bool) -> None:
    data = oversized(77)

    async def scenario() -> Envelope:
        async with connect(worker.uri, max_size=None) as connection:
            await connection.send(encode(1, Hello()))
            await reply(connection)
            # A fragmented message is read to its end and dropped; websockets refuses a whole frame over
            # the limit itself, so the single-frame case goes in fragments of 1 MiB too.
            pieces = (
                [data[i : i + MiB] for i in range(0, len(data), MiB)] if fragmented else [data[:LIMIT], data[LIMIT:]]
            )
            await connection.send(pieces)
            return await reply(connection)

    answer = run(scenario())
    assert answer.id == 77 and isinstance(answer.message, Error) and answer.message.code == "too_large"


def test_streamed_too_large_carries_the_request_id() -> None:
    outgoing = encode_fragments(41, FitResult({"w": np.zeros(MiB, np.float32)}, 1, 0.0), chunk_size=64 * 1024)
    decoder = MessageDecoder(max_size=MiB)
    for fragment in outgoing.fragments():
        decoder.feed(fragment)
    with pytest.raises(ProtocolError) as info:
        decoder.finish()
    assert (info.value.code, info.value.request_id) == ("too_large", 41)


def test_an_error_with_id_0_fails_every_request_in_flight_at_once() -> None:
    """A worker answers with too_large and id 0: the coordinator must not wait for its request timeout."""

    async def handler(connection: ServerConnection) -> None:
        greeted = False
        async for data in connection:
            envelope = decode(data)  # type: ignore[arg-type]
            if not greeted:
                greeted = True
                info = Info("w", "trainer", "digits", (8, 8), 10, (1,) * 10, ("digits-cnn",))
                await connection.send(encode(envelope.id, info))
            elif envelope.id == 3:  # both requests are in flight: refuse one, unattributed
                await connection.send(encode(0, Error("too_large", "message with 9 bytes exceeds limit of 8 bytes")))

    async def scenario() -> tuple[list[Any], float]:
        server = await serve(handler, "127.0.0.1", 0, max_size=None)
        port = next(iter(server.sockets)).getsockname()[1]
        async with server:
            async with WorkerLink("w", f"ws://127.0.0.1:{port}", max_message_size=MiB, ping_interval=None) as client:
                await client.request(Hello())
                started = time.perf_counter()
                outcomes = await asyncio.gather(
                    client.request(Ping(), timeout=30_000 * MS),
                    client.request(Ping(), timeout=30_000 * MS),
                    return_exceptions=True,
                )
                return outcomes, time.perf_counter() - started

    outcomes, seconds = run(scenario())
    assert seconds < 5, seconds
    assert all(isinstance(outcome, RemoteError) and outcome.code == "too_large" for outcome in outcomes), outcomes
