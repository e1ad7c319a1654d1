"""Section 7: time to accuracy (issue 20), from a cold start to 95% federated accuracy on the digits demo.

Each run is read from its console as it prints: syncfed's coordinator's evaluations, and Flower's
server's ``FLOWER_EVALUATION`` lines.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from syncfed.config import CoordinatorConfig
from syncfed.models import default_model

from .figures import print_table
from .flower import FLOWER_ENV, FLOWER_EVALUATION, flower_clients, flower_version
from .plan import BATCH_SIZE, SEED, Plan
from .processes import BENCH, REPO, SECTION_TIMEOUT, free_port, listening, stop

__all__ = [
    "ACCURACY_TARGET",
    "ACCURACY_MODES",
    "accuracy_curve",
    "evaluations",
    "demo_accuracy",
    "flower_accuracy",
    "curve",
    "flower_accuracy_curve",
    "plot_accuracy",
    "time_to_accuracy",
]

ACCURACY_TARGET = 0.95
ACCURACY_MODES = ("sync", "async")
_EVALUATION = re.compile(r"^Evaluation at (?:round|version) (\d+)/\d+:$")
_FEDERATED = re.compile(r"^Federated model: Average loss: \S+, Accuracy: (\d+)/(\d+) ")


async def accuracy_curve(mode: str, rounds: int) -> dict[str, Any]:
    """The demo from a cold start in ``mode``: (round, seconds, accuracy) at each evaluation, until the target.

    Seconds run from the launch of the coordinator's command, which starts
    the workers, to the moment its federated accuracy line is printed. The
    evaluator scores the global model alone (``--eval-global-only``), as
    Flower's server does, not each worker's update too as the classic demo does.
    """
    arguments = ["run_websocket_client.py", "--spawn-workers", "--mode", mode, "--training-rounds", str(rounds)]
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        "--eval-every",
        "1",
        "--eval-global-only",
        "--no-progress",
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line as printed, so its time is the coordinator's
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        points, tail = await evaluations(process, started, demo_accuracy())
    finally:
        await stop(process)
    if not points:
        raise RuntimeError(f"{' '.join(arguments)} printed no evaluation (status {process.returncode}): {tail}")
    return curve(mode, f"syncfed {mode}", points)


async def evaluations(
    process: asyncio.subprocess.Process, started: float, accuracy: Callable[[str], tuple[int, float] | None]
) -> tuple[list[tuple[int, float, float]], list[str]]:
    """(round, seconds since ``started``, accuracy) of each evaluation ``process`` prints, until one reaches the
    target, and its last lines; ``accuracy`` reads a line's round and accuracy, if it reports them."""
    points: list[tuple[int, float, float]] = []
    tail: collections.deque[str] = collections.deque(maxlen=40)
    assert process.stdout is not None
    async with asyncio.timeout(SECTION_TIMEOUT):
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            found = accuracy(line)
            if found is not None:
                points.append((found[0], time.perf_counter() - started, found[1]))
                if found[1] >= ACCURACY_TARGET:
                    break
    return points, list(tail)


def demo_accuracy() -> Callable[[str], tuple[int, float] | None]:
    """A reader of the coordinator's console: the federated accuracy under each evaluation heading."""
    evaluated = 0

    def read(line: str) -> tuple[int, float] | None:
        nonlocal evaluated
        heading, score = _EVALUATION.match(line), _FEDERATED.match(line)
        if heading:
            evaluated = int(heading.group(1))
        elif score:
            return evaluated, int(score.group(1)) / int(score.group(2))
        return None

    return read


def flower_accuracy(line: str) -> tuple[int, float] | None:
    """The round and accuracy of a Flower server's evaluation line (``flower_evaluation``), if it is one."""
    if not line.startswith(FLOWER_EVALUATION + " "):
        return None
    round_number, correct, total = (int(field) for field in line.split()[1:])
    return round_number, correct / total


def curve(mode: str, label: str, points: Sequence[tuple[int, float, float]]) -> dict[str, Any]:
    """One run's (round, seconds, accuracy) points, with its first evaluation and where it reached the target."""
    reached = next((point for point in points if point[2] >= ACCURACY_TARGET), None)
    return {
        "mode": mode,
        "label": label,
        "points": list(points),
        "first_evaluation_s": points[0][1],
        "reached_round": reached[0] if reached else None,
        "reached_s": reached[1] if reached else None,
    }


async def flower_accuracy_curve(plan: Plan, version: str) -> dict[str, Any]:
    """Flower from a cold start on the demo's recipe: (round, seconds, accuracy) after every round, until the target.

    The same shards, initial model, plan seeds, batch size and learning
    rates as the demo's trainers, and FedAvg weighted by their examples;
    Flower's server evaluates on the demo evaluator's test set. Seconds run
    from the launch of Flower's server; its clients start once it listens,
    as in the flower section.
    """
    demo = CoordinatorConfig()
    assert (demo.batch_size, demo.seed) == (BATCH_SIZE, SEED), "the Flower side trains with the bench's recipe"
    port = free_port()
    spec = {
        "model": default_model("digits"),
        "batches": demo.federate_after_n_batches,
        "rounds": plan.accuracy_rounds,
        "port": port,
        "threads": plan.threads,
        "lr": demo.lr,
        "evaluate": True,
    }
    started = time.perf_counter()
    server = await asyncio.create_subprocess_exec(
        plan.flower_python or sys.executable,
        BENCH,
        "flower-server",
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **FLOWER_ENV, "PYTHONUNBUFFERED": "1"},
    )
    clients: list[asyncio.Task[dict[str, Any]]] = []

    async def start_clients() -> None:
        await listening(port, lambda: server.returncode is not None)
        clients.extend(flower_clients(spec, plan.flower_python))

    launcher = asyncio.create_task(start_clients())
    try:
        points, tail = await evaluations(server, started, flower_accuracy)
    finally:
        launcher.cancel()
        for task in clients:
            task.cancel()
        await asyncio.gather(launcher, *clients, return_exceptions=True)
        await stop(server)
    if not points:
        raise RuntimeError(f"Flower's demo run printed no evaluation (status {server.returncode}): {tail}")
    return curve("flower", f"Flower {version}", points)


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Federated accuracy against seconds from a cold start, one line per mode, the target dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=110)
    axes = figure.add_subplot()
    for row in rows:
        seconds = [point[1] for point in row["points"]]
        accuracies = [point[2] for point in row["points"]]
        reached = row["reached_s"] is not None
        label = f"{row['label']}: " + (
            f"{row['reached_s']:.1f} s, round {row['reached_round']}" if reached else "not reached"
        )
        (line,) = axes.plot(seconds, accuracies, marker=".", label=label)
        if reached:
            axes.plot([seconds[-1]], [accuracies[-1]], marker="o", markersize=9, color=line.get_color())
    axes.axhline(ACCURACY_TARGET, color="grey", linestyle="--", linewidth=1, label=f"{ACCURACY_TARGET:.0%}")
    axes.set_xlabel("seconds from a cold start (the run's first process launched)")
    axes.set_ylabel("federated test accuracy")
    axes.set_xlim(left=0)  # from the launch: the start-up is part of the time
    axes.set_ylim(0, 1)
    axes.set_title(f"Digits demo: time to {ACCURACY_TARGET:.0%} accuracy, evaluated every round")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


async def time_to_accuracy(plan: Plan, plot: Path | None) -> dict[str, Any]:
    rows = [await accuracy_curve(mode, plan.accuracy_rounds) for mode in ACCURACY_MODES]
    version = flower_version(plan.flower_python)
    if version is not None:
        rows.append(await flower_accuracy_curve(plan, version))
    print_table(
        f"7. Time to {ACCURACY_TARGET:.0%} federated accuracy on the digits demo from a cold start"
        f" (at most {plan.accuracy_rounds} rounds, evaluated every round)",
        ["run", "first evaluation s", "rounds", "seconds", "last accuracy"],
        [
            [
                r["label"],
                f"{r['first_evaluation_s']:.1f}",
                r["reached_round"] if r["reached_round"] is not None else "not reached",
                f"{r['reached_s']:.1f}" if r["reached_s"] is not None else "-",
                f"{r['points'][-1][2]:.2%}",
            ]
            for r in rows
        ],
    )
    if version is None:
        print("  Flower: not run (install flwr in another venv and pass --flower-python to compare)")
    if plot is not None:
        plot_accuracy(rows, plot)
        print(f"  Wrote {plot}")
    return {"target": ACCURACY_TARGET, "rows": rows}
