"""Section 6: the README's four-terminal walk-through against the one-command demo (issue 18: within 1.5x)."""

from __future__ import annotations

import asyncio
import collections
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .figures import print_table, steady
from .fleet import READY
from .plan import Plan
from .processes import REPO, SECTION_TIMEOUT, STARTUP_TIMEOUT, drain, stop

__all__ = ["WALKTHROUGH", "WALKTHROUGH_LIMIT", "timed_command", "terminals", "walkthrough"]

#: The README's four terminals: the worker flags beside --id, and the coordinator's per-round line.
WALKTHROUGH = (("alice", ()), ("bob", ()), ("charlie", ()), ("testing", ("--testing",)))
_ROUND_DONE = re.compile(r"^Round \d+/\d+ done in ([0-9.]+) s")
WALKTHROUGH_LIMIT = 1.5  # issue 18


async def timed_command(arguments: Sequence[str]) -> tuple[float, list[float]]:
    """Run ``python ARGUMENTS`` from the repository root: its wall seconds and the rounds' seconds it printed."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, *arguments, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(SECTION_TIMEOUT):
            output, _ = await process.communicate()
    finally:
        await stop(process)
    seconds = time.perf_counter() - started
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} exited with status {process.returncode}: {text[-2000:]}")
    return seconds, [float(match.group(1)) for match in map(_ROUND_DONE.match, text.splitlines()) if match]


@asynccontextmanager
async def terminals() -> AsyncIterator[dict[str, str]]:
    """The walk-through's four workers, each a process as a terminal would start it, on free ports: ``{id: uri}``."""
    processes: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []

    async def start(name: str, flags: Sequence[str]) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "run_websocket_server.py",
            "--id",
            name,
            "--port",
            "0",  # the README's 8777-8780 may be taken on a shared machine
            *flags,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        processes.append(process)
        lines: collections.deque[str] = collections.deque(maxlen=40)
        assert process.stdout is not None
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace").rstrip()
                if not line and process.stdout.at_eof():
                    raise RuntimeError(f"worker {name} exited with status {await process.wait()}: {' | '.join(lines)}")
                lines.append(line)
                match = READY.match(line)
                if match:
                    drains.append(asyncio.create_task(drain(process, lines)))
                    return match.group(2)

    try:
        uris = await asyncio.gather(*(start(name, flags) for name, flags in WALKTHROUGH))
        yield {name: uri for (name, _), uri in zip(WALKTHROUGH, uris, strict=True)}
    finally:
        await asyncio.gather(*(stop(process) for process in processes))
        for task in drains:
            task.cancel()


async def walkthrough(plan: Plan) -> dict[str, Any]:
    """The walk-through's coordinator over four separately started workers, then the spawned demo, same rounds."""
    common = ["run_websocket_client.py", "--training-rounds", str(plan.walkthrough_rounds), "--no-progress"]
    async with terminals() as uris:
        workers = ",".join(f"{name}={uris[name]}" for name, _ in WALKTHROUGH[:3])
        separate = await timed_command([*common, "--workers", workers, "--evaluator", f"testing={uris['testing']}"])
    spawned = await timed_command([*common, "--spawn-workers"])
    rows = []
    for name, (seconds, rounds) in (("four terminals", separate), ("--spawn-workers", spawned)):
        rows.append({"run": name, "wall_s": seconds, "rounds_s": sum(rounds), "median_round_s": steady(rounds)})
    ratio = rows[0]["rounds_s"] / rows[1]["rounds_s"]
    print_table(
        f"6. The README's walk-through against the spawned demo, {plan.walkthrough_rounds} rounds"
        " (wall: the coordinator's command, which for --spawn-workers starts the workers too)",
        ["run", "wall s", "rounds s", "median round s"],
        [[r["run"], f"{r['wall_s']:.1f}", f"{r['rounds_s']:.1f}", f"{r['median_round_s']:.2f}"] for r in rows],
    )
    met = "met" if ratio <= WALKTHROUGH_LIMIT else "NOT met"
    print(f"  walk-through / spawned demo, rounds: {ratio:.2f}x (target {WALKTHROUGH_LIMIT:g}x: {met})")
    return {"rounds": plan.walkthrough_rounds, "rows": rows, "ratio": ratio, "limit": WALKTHROUGH_LIMIT}
