"""Hostile messages against a real worker: worst memory per byte received, and worst event-loop stall.

Starts one worker process on 127.0.0.1 (digits, ``--max-message-size`` as
given), then for each worst-case message sends it on one connection while a
second connection pings the worker every 10 ms, and prints:

- the worker's RSS growth (``VmRSS``, sampled every 2 ms while the message is
  sent and processed, against its value before) divided by the message's bytes;
- the longest ping round trip seen while the message was processed.

Prints figures, asserts nothing. Usage::

    python scripts/bench_hostile.py [--limit-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio.client import connect

from syncfed.net.spawn import spawn_workers
from syncfed.protocol import Evaluate, Hello, Ping, Query, SecAggUnmask, decode, encode, encode_fragments
from syncfed.secagg import UnmaskRequest

MiB = 2**20


def pack(request_id: int, kind: str, body: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)


def secagg_start(clients: int, neighbours: int) -> bytes:
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
    return pack(2, "secagg_start", {"config": config, "client": 3})


def messages(limit: int) -> dict[str, bytes | list[bytes]]:
    """Worst-case messages of each kind, at or near the size limit."""
    body = limit - 256
    header = pack(2, "fit_result", [[{}] * 2**16] * 64)
    weights = {"w": np.zeros(body // 4, np.float32)}
    streamed = encode_fragments(2, Evaluate("no-such-model", weights, 1), chunk_size=MiB)
    return {
        "empty maps (array of 16M+)": pack(2, "ping", [{}] * body),
        "nested arrays of empty maps": pack(2, "ping", [[{}] * 2**16] * (body // 2**16)),
        "nested arrays of -32 ints": pack(2, "ping", [[-32] * 4096] * (body // 4100)),
        "streamed header bomb": b"\xc7SF1" + len(header).to_bytes(4, "big") + header,
        "secagg_start 20000 x 2000 (review)": secagg_start(20_000, 2_000),
        "secagg_start 65536 x 65534 (protocol limit)": secagg_start(65_536, 65_534),
        "secagg_start 1024 x 1022 (worker limit)": secagg_start(1024, 1022),
        "query of 8,000 features": encode(2, Query("feature-stats", tuple(range(0, 8000)))),
        "quantiles query, 4096 bins x 64 features": encode(2, Query("quantiles", tuple(range(64)), 4096, (0.0, 1.0))),
        "unmask of 5,000 clients": encode(
            2, SecAggUnmask(b"x" * 32, UnmaskRequest(tuple(range(0, 5000, 2)), tuple(range(1, 5000, 2))))
        ),
        "legal streamed evaluate at the limit": list(streamed.fragments()),
        "oversized single frame": fragments(pack(2, "ping", {"pad": bytes(limit)})),
    }


def fragments(data: bytes) -> list[bytes]:
    return [data[i : i + MiB] for i in range(0, len(data), MiB)]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def attack(uri: str, pid: int, data: bytes | list[bytes]) -> tuple[str, float, int]:
    async with connect(uri, max_size=None) as hostile, connect(uri, max_size=None) as watcher:
        for connection in (hostile, watcher):
            await connection.send(encode(1, Hello()))
            await connection.recv()
        slowest = 0.0
        done = asyncio.Event()
        before = highest = rss(pid)

        async def sample() -> None:
            nonlocal highest
            while not done.is_set():
                highest = max(highest, rss(pid))
                await asyncio.sleep(0.002)

        async def ping() -> None:
            nonlocal slowest
            request_id = 100
            while not done.is_set():
                request_id += 1
                started = time.perf_counter()
                await watcher.send(encode(request_id, Ping()))
                await watcher.recv()
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.01)

        pinger, sampler = asyncio.create_task(ping()), asyncio.create_task(sample())
        await asyncio.sleep(0.1)
        await hostile.send(data)
        async with asyncio.timeout(120):
            answer = decode(await hostile.recv())  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        done.set()
        await pinger
        await sampler
        reply = answer.message.kind
        if answer.message.kind == "error":
            reply = f"error {answer.message.code} (id {answer.id})"  # type: ignore[attr-defined]
        return reply, slowest, highest - before


async def main(limit: int) -> None:
    plan = [("bench", ["--threads", "1", "--digits", "1,2", "--max-message-size", str(limit)])]
    async with spawn_workers(plan, startup_timeout=120) as workers:
        worker = workers["bench"]
        pid = worker.process.pid
        # RSS moves in pages and arenas: a ratio means something for large messages only; for small
        # ones the absolute growth (which includes serving them, e.g. a query's answer) is printed.
        worst_ratio = worst_stall = 0.0
        worst_small = 0
        print(f"worker pid {pid}, limit {limit} bytes, RSS {rss(pid) / MiB:.0f} MiB")
        for label, data in messages(limit).items():
            size = len(data) if isinstance(data, bytes) else sum(map(len, data))
            reply, stall, growth = await attack(worker.uri, pid, data)
            ratio = growth / size
            worst_stall = max(worst_stall, stall)
            if size >= MiB:
                worst_ratio = max(worst_ratio, ratio)
            else:
                worst_small = max(worst_small, growth)
            print(
                f"{label:45s} {size:>11d} B  peak RSS +{growth / MiB:7.1f} MiB"
                f" ({ratio:6.2f} x)  stall {stall * 1000:7.1f} ms  -> {reply}"
            )
        print(f"worst memory amplification: {worst_ratio:.2f} bytes of peak RSS per byte received (messages >= 1 MiB)")
        print(f"largest RSS growth from a message under 1 MiB: {worst_small / MiB:.1f} MiB")
        print(f"worst event-loop stall: {worst_stall * 1000:.0f} ms (ping round trip on a second connection)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mib", type=int, default=64, help="the worker's --max-message-size, in MiB")
    asyncio.run(main(parser.parse_args().limit_mib * MiB))
