"""Start workers as local processes on free ports, for one-command runs and tests.

Each worker's input is a pipe this process holds (``--exit-with-stdin``):
should this process die without stopping them, SIGKILL included, the kernel
closes the pipe and each worker stops on its own instead of serving on as an orphan.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..exceptions import WorkerUnavailable

__all__ = ["WorkerProcess", "spawn_workers"]

logger = logging.getLogger("syncfed.spawn")  # the name it had before the move: --verbose lines are unchanged

_READY = re.compile(r"^syncfed worker (\S+) listening on (wss?://\S+)$")
#: The folder that holds the ``syncfed`` package, so that workers import the same copy as this process.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass
class WorkerProcess:
    """A running worker process and the address it serves on."""

    worker_id: str
    process: asyncio.subprocess.Process
    uri: str = ""
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))


async def _start(
    worker_id: str, arguments: Sequence[str], startup_timeout: float, started: dict[str, WorkerProcess]
) -> WorkerProcess:
    """Start one worker and wait for its ready line; it joins ``started`` at once, so it is stopped whatever happens."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncfed.cli.worker",
        "--id",
        worker_id,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--exit-with-stdin",  # its input is a pipe this process holds: should this process die, so does the worker
        *arguments,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    worker = started[worker_id] = WorkerProcess(worker_id, process)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(startup_timeout):
            while not worker.uri:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    await process.wait()
                    lines = " | ".join(worker.output)
                    raise WorkerUnavailable(worker_id, f"process exited with status {process.returncode}: {lines}")
                line = line.rstrip()
                worker.output.append(line)
                logger.info("[%s] %s", worker_id, line)
                match = _READY.match(line)
                if match:
                    worker.uri = match.group(2)
    except TimeoutError:
        raise WorkerUnavailable(worker_id, f"process did not start serving within {startup_timeout:g} s") from None
    return worker


async def _forward(worker: WorkerProcess) -> None:
    """Keep reading the worker's output so its pipe never fills; log it."""
    assert worker.process.stdout is not None
    async for raw in worker.process.stdout:
        line = raw.decode(errors="replace").rstrip()
        worker.output.append(line)
        logger.debug("[%s] %s", worker.worker_id, line)


async def _stop(worker: WorkerProcess, timeout: float = 5.0) -> None:
    if worker.process.returncode is None:
        worker.process.terminate()
        try:
            async with asyncio.timeout(timeout):
                await worker.process.wait()
        except TimeoutError:
            worker.process.kill()
            await worker.process.wait()


@asynccontextmanager
async def spawn_workers(
    workers: Sequence[tuple[str, Sequence[str]]],
    *,
    # Timeouts
    startup_timeout: float = 120.0,
) -> AsyncIterator[dict[str, WorkerProcess]]:
    """Start one process per ``(worker_id, extra_arguments)`` and stop them all on exit.

    Each worker binds 127.0.0.1 on a port the system picks; the yielded
    mapping gives its ``uri``.

    Raises:
        WorkerUnavailable: if a worker exits or stays silent during startup.
    """
    started: dict[str, WorkerProcess] = {}
    forwarders: list[asyncio.Task[None]] = []
    try:
        results = await asyncio.gather(
            *(_start(worker_id, arguments, startup_timeout, started) for worker_id, arguments in workers),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        forwarders = [asyncio.create_task(_forward(worker)) for worker in started.values()]
        yield started
    finally:
        await asyncio.gather(*(_stop(worker) for worker in started.values()))
        for task in forwarders:
            task.cancel()
