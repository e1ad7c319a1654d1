"""The benchmark's child processes: bench.py's internal commands started, read, and stopped within limits.

Every child runs ``scripts/bench.py`` (``BENCH``), whichever module starts it: its ``main`` dispatches
the internal commands.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "BENCH",
    "RESULT",
    "STARTUP_TIMEOUT",
    "SECTION_TIMEOUT",
    "child",
    "drain",
    "stop",
    "free_port",
    "listening",
]

#: The repository root, where the demo's commands run, and the benchmark's command line.
REPO = Path(__file__).resolve().parent.parent.parent
BENCH = REPO / "scripts" / "bench.py"
#: The prefix of a child command's result, one line of JSON.
RESULT = "BENCH-RESULT "

# Timeouts
STARTUP_TIMEOUT = 180.0  # a set of workers importing torch on a busy 2-core machine
SECTION_TIMEOUT = 1800.0  # one child run (a coordinator, Flower): a hung one must not hang the suite


async def drain(process: asyncio.subprocess.Process, lines: collections.deque[str]) -> None:
    """Keep reading a child's output, so its pipe never fills, keeping its last lines."""
    assert process.stdout is not None
    async for line in process.stdout:
        lines.append(line.decode(errors="replace").rstrip())


async def stop(process: asyncio.subprocess.Process) -> None:
    """Terminate a child, then kill it if it is still there after 10 s: no run leaves a process behind."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                process.kill()
            await process.wait()


async def child(
    command: str, spec: Mapping[str, Any], *, env: Mapping[str, str] | None = None, python: str | None = None
) -> dict[str, Any]:
    """Run ``bench.py COMMAND SPEC`` under ``python`` (else this one); return the JSON after ``BENCH-RESULT``."""
    process = await asyncio.create_subprocess_exec(
        python or sys.executable,
        BENCH,
        command,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SECTION_TIMEOUT)
    finally:
        await stop(process)
    text = output.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT):
            return dict(json.loads(line[len(RESULT) :]))
    raise RuntimeError(f"bench.py {command} printed no result (status {process.returncode}): {text[-2000:]}")


def free_port() -> int:
    """A port on 127.0.0.1 free just now, for a server that cannot report the one it bound (Flower's)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


async def listening(port: int, gone: Callable[[], bool]) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections, or its server is ``gone``."""
    for _ in range(int(STARTUP_TIMEOUT * 10)):  # the server imports torch and Flower before it listens
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        if gone():
            return
        await asyncio.sleep(0.1)
