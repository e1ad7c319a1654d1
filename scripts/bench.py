"""The benchmark suite of docs/performance.md: syncfed against pure compute, the wire, and Flower.

Usage::

    .venv/bin/python scripts/bench.py --profile --json bench.json       # everything (about 9 minutes on 2 cores)
    .venv/bin/python scripts/bench.py --quick --only overhead,transfer   # a small version (CI runs --quick)

Sections (``--only``, comma-separated; all by default):

1. ``overhead``: seconds per round of syncfed with three worker processes on
   127.0.0.1 against a plain single-process loop doing exactly the workers'
   SGD steps and FedAvg (McMahan et al. 2017),
   for the digits CNN (10 local batches) and the 10M-parameter MLP (1 batch).
   Both end at the same weights, which the run checks.
2. ``transfer``: rounds of pure transfer (no batches) of 1M, 10M and 100M
   parameters to three workers and back, against the machine's own memcpy and
   loopback socket throughput measured in the same run.
3. ``scale``: 3 to 100 workers on the digits CNN (1 batch); up to
   ``--max-processes`` workers are processes, above that asyncio servers
   hosted ``--per-host`` to a process.
4. ``memory``: peak RSS of the coordinator, run in a process of its own,
   over its baseline, for 3 to 30 workers on the 10M model, without flow
   control (``--receive-slots 0``) and with the default receive slots.
5. ``flower``: the overhead tasks under Flower's legacy gRPC mode
   (``start_server``/``start_client``, 512 MiB message limit, offline), when
   ``flwr`` is installed; it is never a dependency of syncfed. Flower's
   processes run under ``--flower-python`` (a separate venv with flwr and
   syncfed) when given, else under this Python.
6. ``walkthrough``: the README's four-terminal walk-through (four
   ``run_websocket_server.py`` processes started as the README starts them,
   default threads, then ``run_websocket_client.py``) against the one-command
   ``run_websocket_client.py --spawn-workers``, the demo's recipe for
   ``--walkthrough-rounds`` rounds each (issue 18: within 1.5x).
7. ``accuracy``: time to accuracy (issue 20). Seconds from a cold start (the
   demo's ``run_websocket_client.py --spawn-workers`` launched, workers not yet
   started) to 95% federated test accuracy on the digits demo, evaluated every
   round, in sync and in async (FedBuff) mode, and for Flower on the same
   shards, initial model, plan seeds and learning rates (its server evaluating
   on the evaluator's test set after every round) when it is available;
   ``--accuracy-plot PNG`` draws the curves.

Every figure is the median of the rounds after the first, a warm-up; MB is
10**6 bytes. Wall and CPU seconds are both reported: ratios come from one run,
so they hold on a machine shared with other work, and CPU seconds hardly
depend on it.

The sections live in ``scripts/benchkit/``, one module each; this file is the command line, and the
entry point of every child process the sections start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # benchkit, also where bench.py is loaded by path, not run
sys.path.insert(0, str(REPO))

from benchkit.accuracy import time_to_accuracy  # noqa: E402
from benchkit.figures import machine, print_table  # noqa: E402
from benchkit.fleet import fleet, host  # noqa: E402
from benchkit.flower import flower, flower_client, flower_server  # noqa: E402
from benchkit.limits import limits  # noqa: E402
from benchkit.plan import FULL, QUICK, TRAINERS, Plan  # noqa: E402
from benchkit.processes import RESULT  # noqa: E402
from benchkit.runs import coordinator_process  # noqa: E402
from benchkit.sections import memory, overhead, scale, transfer  # noqa: E402
from benchkit.targets import targets  # noqa: E402
from benchkit.walkthrough import walkthrough  # noqa: E402

from syncfed.cli.allocator import keep_freed_memory  # noqa: E402
from syncfed.cli.common import until_input_ends  # noqa: E402

__all__ = ["Plan", "FULL", "QUICK", "main"]

SECTIONS = ("overhead", "transfer", "scale", "memory", "flower", "walkthrough", "accuracy")


async def run(plan: Plan, sections: Sequence[str], profile: bool, accuracy_plot: Path | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "plan": dataclasses.asdict(plan), "sections": list(sections)}
    wall: dict[str, float] = {}
    started = time.perf_counter()
    physical = results["limits"] = await limits(plan)
    wall["limits"] = time.perf_counter() - started
    print_table(
        "0. Physical limits on this machine, and websockets (two processes over 127.0.0.1)",
        ["measure", "MB/s"],
        [[name, f"{rate:.0f}"] for name, rate in physical.items()],
    )
    if any(section in sections for section in ("overhead", "transfer", "scale", "memory")):
        started = time.perf_counter()
        async with fleet(len(TRAINERS), plan) as trio:
            wall["start 3 workers"] = time.perf_counter() - started
            runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "overhead": lambda: overhead(plan, trio, profile),
                "transfer": lambda: transfer(plan, trio, physical, profile),
                "scale": lambda: scale(plan, trio),
                "memory": lambda: memory(plan, trio),
            }
            for name, section in runs.items():
                if name in sections:
                    started = time.perf_counter()
                    results[name] = await section()
                    wall[name] = time.perf_counter() - started
    if "flower" in sections:
        started = time.perf_counter()
        results["flower"] = await flower(plan, results)
        wall["flower"] = time.perf_counter() - started
    if "walkthrough" in sections:
        started = time.perf_counter()
        results["walkthrough"] = await walkthrough(plan)
        wall["walkthrough"] = time.perf_counter() - started
    if "accuracy" in sections:
        started = time.perf_counter()
        results["accuracy"] = await time_to_accuracy(plan, accuracy_plot)
        wall["accuracy"] = time.perf_counter() - started
    found = targets(plan, results)
    results["targets"] = [dataclasses.asdict(target) for target in found]
    if found:
        print_table(
            "Targets of issues 9 and 20 (ratios from this run)",
            ["target", "limit", "measured", "met"],
            [[t.name, f"{t.limit:g}", t.text, "yes" if t.met else "NO"] for t in found],
        )
    for name in ("overhead", "transfer"):
        for what, lines in results.get(name, {}).get("profiles", {}).items():
            print(f"\nProfile of {what} (cProfile, by own time):")
            print("\n".join(lines))
    results["wall_s"] = wall
    results["machine"]["load_average_after"] = os.getloadavg()
    print(f"\nSeconds per section: {', '.join(f'{name} {seconds:.0f}' for name, seconds in wall.items())}")
    return results


_CHILDREN: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "coordinator": coordinator_process,
    "flower-server": flower_server,
    "flower-client": flower_client,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast version (CI's smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument(
        "--profile", action="store_true", help="profile the coordinator and a worker in extra runs (cProfile)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per worker and in the plain loop (default: 1)")
    parser.add_argument(
        "--max-processes", type=int, help="more workers than this are hosted several to a process (default: 10)"
    )
    parser.add_argument("--per-host", type=int, help="workers per host process above --max-processes (default: 25)")
    parser.add_argument(
        "--walkthrough-rounds",
        type=int,
        help="rounds of each walkthrough run (default: 40, the demo's; 3 with --quick)",
    )
    parser.add_argument(
        "--accuracy-plot", type=Path, metavar="PNG", help="draw the accuracy section's curves to this PNG file"
    )
    parser.add_argument(
        "--flower-python",
        metavar="PYTHON",
        help="run Flower's processes under this interpreter: a venv with flwr and syncfed (pip install -e .),"
        " so Flower stays out of syncfed's own venv (default: this Python, where flwr imports)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] == "host":  # internal: serve several workers in this process
        spec = json.loads(arguments[1])
        if spec["profile"] is not None:  # stopped like Ctrl-C, so the profile gets written
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(until_input_ends(host(spec["workers"], spec["threads"], spec["profile"])))
        return 0
    if arguments and arguments[0] in _CHILDREN:  # internal: one side of a run, in a process of its own
        print(RESULT + json.dumps(_CHILDREN[arguments[0]](json.loads(arguments[1]))), flush=True)
        return 0
    keep_freed_memory()  # as syncfed's programs do: this process runs the coordinator (and the plain loop)
    parser = build_parser()
    args = parser.parse_args(arguments)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    plan = QUICK if args.quick else FULL
    overrides = {
        "threads": args.threads,
        "max_processes": args.max_processes,
        "per_host": args.per_host,
        "walkthrough_rounds": args.walkthrough_rounds,
        "flower_python": args.flower_python,
    }
    plan = dataclasses.replace(plan, **{name: value for name, value in overrides.items() if value is not None})
    started = time.perf_counter()
    try:
        results = asyncio.run(run(plan, sections, args.profile, args.accuracy_plot))
    except KeyboardInterrupt:
        print("bench.py: stopped", file=sys.stderr)
        return 130
    load = os.getloadavg()[0]
    print(f"Done in {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs (load average {load:.1f}).")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
