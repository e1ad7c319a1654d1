"""The benchmark's workers on 127.0.0.1: processes, or asyncio servers hosted several to a process.

Hosting lets 100 workers run on a 2-core machine without 100 imports of torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import cProfile
import functools
import json
import math
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from syncfed.cli.allocator import keep_freed_memory
from syncfed.config import WorkerConfig
from syncfed.net.spawn import spawn_workers
from syncfed.worker import load_holdings, run_worker

from .plan import TRAINERS, Plan
from .processes import BENCH, STARTUP_TIMEOUT, drain, stop

__all__ = ["READY", "worker_ids", "Fleet", "fleet", "hosts", "host"]

#: A worker's line once it listens: its name and address.
READY = re.compile(r"^syncfed worker (\S+) listening on (ws://\S+)$")


def worker_ids(count: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Three workers are the demo's alice, bob and charlie (classes 0-3, 4-6, 7-9); more hold IID shards."""
    if count == len(TRAINERS):
        return [(name, None) for name in TRAINERS]
    return [(f"w{index:03d}", (index, count)) for index in range(count)]


@dataclass(frozen=True)
class Fleet:
    """Running workers: their addresses, how they are hosted (said in every table), their processes' last lines."""

    uris: dict[str, str]
    hosting: str
    output: Sequence[collections.deque[str]]
    pids: tuple[int, ...]


@asynccontextmanager
async def fleet(count: int, plan: Plan) -> AsyncIterator[Fleet]:
    """``count`` workers on 127.0.0.1: processes up to ``plan.max_processes``, else hosted a few to a process.

    When the run fails, the workers' last lines are printed: their log says why.
    """
    ids = worker_ids(count)
    async with contextlib.AsyncExitStack() as stack:
        if count <= plan.max_processes:
            arguments = [
                (
                    name,
                    [
                        "--threads",
                        str(plan.threads),
                        "--bench-models",
                        *(["--shard", f"{s[0] + 1}/{s[1]}"] if s else []),
                    ],
                )
                for name, s in ids
            ]
            workers = await stack.enter_async_context(spawn_workers(arguments, startup_timeout=STARTUP_TIMEOUT))
            running = Fleet(
                {name: worker.uri for name, worker in workers.items()},
                f"{count} processes",
                [worker.output for worker in workers.values()],
                tuple(worker.process.pid for worker in workers.values()),
            )
        else:
            size = math.ceil(count / math.ceil(count / plan.per_host))
            groups = [ids[start : start + size] for start in range(0, count, size)]
            running = await stack.enter_async_context(hosts(groups, plan.threads))
        try:
            yield running
        except BaseException:
            for lines in running.output:
                print("\n".join(lines), file=sys.stderr)
            raise


@asynccontextmanager
async def hosts(
    groups: Sequence[Sequence[tuple[str, tuple[int, int] | None]]], threads: int, *, profile: Path | None = None
) -> AsyncIterator[Fleet]:
    """One ``bench.py host`` process per group, all of whose workers are ready."""
    processes: list[asyncio.subprocess.Process] = []
    output: list[collections.deque[str]] = []
    drains: list[asyncio.Task[None]] = []

    async def start(group: Sequence[tuple[str, tuple[int, int] | None]], profile: Path | None) -> dict[str, str]:
        spec = {"workers": group, "threads": threads, "profile": str(profile) if profile is not None else None}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            BENCH,
            "host",
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,  # its end stops the host: no orphans should bench.py be killed
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        processes.append(process)
        lines: collections.deque[str] = collections.deque(maxlen=40)
        output.append(lines)
        assert process.stdout is not None
        uris: dict[str, str] = {}
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while len(uris) < len(group):
                line = (await process.stdout.readline()).decode(errors="replace").rstrip()
                if not line and process.stdout.at_eof():
                    raise RuntimeError(f"worker host exited with status {await process.wait()}: {' | '.join(lines)}")
                lines.append(line)
                match = READY.match(line)
                if match:
                    uris[match.group(1)] = match.group(2)
        drains.append(asyncio.create_task(drain(process, lines)))
        return uris

    try:
        results = await asyncio.gather(*(start(group, profile if i == 0 else None) for i, group in enumerate(groups)))
        count, plural = sum(map(len, groups)), "es" if len(groups) > 1 else ""
        yield Fleet(
            {name: uri for uris in results for name, uri in uris.items()},
            f"{count} asyncio servers in {len(groups)} process{plural}",
            output,
            tuple(process.pid for process in processes),
        )
    finally:
        await asyncio.gather(*(stop(process) for process in processes))
        for task in drains:
            task.cancel()


async def host(workers: Sequence[tuple[str, Sequence[int] | None]], threads: int, profile: str | None) -> None:
    """Serve several workers in this one process and event loop; with ``profile``, write a profile there when stopped.

    The profile starts once the data is loaded, so it shows serving, not start-up.
    """
    keep_freed_memory()  # as the worker program does
    torch.set_num_threads(threads)
    configs = [
        WorkerConfig(
            name,
            host="127.0.0.1",
            port=0,
            threads=threads,
            shard=(shard[0], shard[1]) if shard else None,
            bench_models=True,
        )
        for name, shard in workers
    ]
    holdings = [load_holdings(config) for config in configs]
    profiler = cProfile.Profile()
    if profile is not None:
        profiler.enable()
    try:
        ready = functools.partial(print, flush=True)
        await asyncio.gather(
            *(run_worker(config, held, ready=ready) for config, held in zip(configs, holdings, strict=True))
        )
    finally:
        if profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
