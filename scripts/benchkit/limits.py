"""Section 0: the physical limits syncfed is measured against, in MB/s on this machine and in this run.

A numpy copy (memcpy), one loopback TCP stream, and websockets itself, the library under syncfed.
"""

from __future__ import annotations

import asyncio
import mmap
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from .figures import MB
from .plan import Plan

__all__ = ["SOCKET", "FRAGMENTS", "copy_throughput", "socket_throughput", "websocket_throughput", "limits"]

SOCKET = "loopback TCP socket"


def copy_throughput(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """MB/s of numpy copies: into a buffer already in memory (memcpy), and into a fresh one (plus page faults).

    The fresh buffer is a new mapping, as numpy's large allocations are by
    default: the benchmark's process keeps freed memory (``keep_freed_memory``),
    so ``source.copy()`` would reuse the last copy's pages.
    """
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.zeros_like(source)
    warm, fresh = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        warm.append(time.perf_counter() - started)
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory gets no huge pages
        started = time.perf_counter()
        if hasattr(mmap, "MADV_HUGEPAGE"):
            pages.madvise(mmap.MADV_HUGEPAGE)  # as numpy advises its large allocations
        copy = np.frombuffer(pages, dtype=np.uint8)
        np.copyto(copy, source)
        fresh.append(time.perf_counter() - started)
        del copy
        pages.close()
    return {
        "numpy copy into memory (memcpy)": nbytes / statistics.median(warm) / MB,
        "numpy copy with allocation": nbytes / statistics.median(fresh) / MB,
    }


_SENDER = """
import socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
block = memoryview(bytes(4 * 2**20))
with socket.create_connection(("127.0.0.1", port)) as sock:
    left = size
    while left:
        left -= sock.send(block[: min(left, len(block))])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
"""


def socket_throughput(nbytes: int, repeats: int = 3) -> float:
    """MB/s of one TCP stream over 127.0.0.1 between two processes, 4 MiB reads and writes; the median of a few."""
    rates = []
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(nbytes), str(server.getsockname()[1])])
            connection, _ = server.accept()
            with connection:
                buffer = bytearray(4 * 2**20)
                first = received = connection.recv_into(buffer)
                started = time.perf_counter()  # from the first byte: the sender's start-up is not the wire's
                while count := connection.recv_into(buffer):
                    received += count
                seconds = time.perf_counter() - started
                connection.sendall(b"k")
            sender.wait(timeout=60)
        if received != nbytes:
            raise RuntimeError(f"loopback test received {received} of {nbytes} bytes")
        rates.append((received - first) / seconds / MB)
    return statistics.median(rates)


_ECHO = """
import asyncio
from websockets.asyncio.server import serve
async def handler(connection):
    while True:
        async for _ in connection.recv_streaming(decode=False):
            pass
        await connection.send(b"k")
async def main():
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await server.serve_forever()
asyncio.run(main())
"""
#: Fragment sizes of the websockets measurement; None: the message in one frame.
FRAGMENTS: tuple[int | None, ...] = (None, 4 * 2**20, 2**20, 256 * 2**10)


async def websocket_throughput(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """MB/s of one binary websockets message, client to server (masked, as coordinator to worker), acknowledged.

    In one frame, and fragmented as syncfed streams large messages: websockets copies
    each frame several times on the way, so the fragment size sets its speed.
    """
    from websockets.asyncio.client import connect

    echo = await asyncio.create_subprocess_exec(sys.executable, "-c", _ECHO, stdout=asyncio.subprocess.PIPE)
    figures = {}
    try:
        assert echo.stdout is not None
        port = int(await asyncio.wait_for(echo.stdout.readline(), 60))
        payload = memoryview(bytes(nbytes))
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, ping_interval=None) as ws:
            for size in FRAGMENTS:
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    await ws.send(payload if size is None else (payload[i : i + size] for i in range(0, nbytes, size)))
                    await ws.recv()
                    seconds.append(time.perf_counter() - started)
                name = "one frame" if size is None else f"{size // 2**10} KiB fragments"
                figures[f"websocket {name}"] = nbytes / statistics.median(seconds) / MB
        return figures
    finally:
        echo.terminate()
        await echo.wait()


async def limits(plan: Plan) -> dict[str, float]:
    """MB/s of each physical limit (and of websockets, the library under syncfed), by name."""
    figures = copy_throughput(plan.copy_bytes)
    figures[SOCKET] = await asyncio.to_thread(socket_throughput, plan.socket_bytes)
    figures.update(await websocket_throughput(plan.websocket_bytes))
    return figures
