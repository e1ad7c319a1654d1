"""Print the evidence tables of docs/strategies.md: strategies, byzantine workers, slow sites.

Usage::

    python scripts/strategies_evidence.py                 # all three tables (about 15 minutes on 2 cores)
    python scripts/strategies_evidence.py --only attacks --rounds 20 --json evidence.json

Every run uses real worker processes on 127.0.0.1 (spawned here), the
digits data set, seed 1 and the demo's recipe (batch 32, 10 local batches,
lr 0.1 decaying 2% a round):

1. ``strategies``: every strategy on the classic non-IID split (alice 0-3,
   bob 4-6, charlie 7-9), federated accuracy after ``--rounds`` rounds.
2. ``attacks``: four workers holding IID quarters of the training set; the
   fourth runs ``--attack sign-flip`` or ``--attack scale``. Final accuracy of
   fedavg, median, trimmed-mean and krum, with and without the attacker.
3. ``slow``: four IID workers whose batches take 20 ms more than their
   compute, one of them four times as long in all; wall-clock seconds until
   the federated model first reaches 90% on the test set, synchronous FedAvg
   against ``--mode async`` (FedBuff, buffer of 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncfed.config import CoordinatorConfig  # noqa: E402
from syncfed.coordinator import FEDERATED, Coordinator  # noqa: E402
from syncfed.exceptions import SyncfedError  # noqa: E402
from syncfed.net.spawn import spawn_workers  # noqa: E402

THREADS = ["--threads", "1"]
STRATEGIES: dict[str, dict[str, float]] = {
    "fedavg": {},
    "mean": {},
    "fedprox": {"mu": 0.01},
    "fedavgm": {},
    "fedadam": {},
    "fedyogi": {},
    "fedadagrad": {},
    "scaffold": {},
    "median": {},
    "trimmed-mean": {"trim_ratio": 0.34},
    "krum": {"byzantine_f": 0},
    "multi-krum": {"byzantine_f": 0},
}
ROBUST: dict[str, dict[str, float]] = {
    "fedavg": {},
    "median": {},
    "trimmed-mean": {"trim_ratio": 0.25},
    "krum": {"byzantine_f": 1},
}
TARGET = 0.90
#: Seconds of sleep per batch: every site's, and the slow site's (four times the fast one's batch time).
BASE_DELAY = 0.02


async def train(
    workers: Mapping[str, str], evaluator: Mapping[str, str], **settings: Any
) -> tuple[float | None, list[tuple[float, int, float]], str]:
    """Run one coordinator; the final federated accuracy, (seconds, round, accuracy) per evaluation, and an error."""
    timeline: list[tuple[float, int, float]] = []
    started = time.perf_counter()

    def listen(event: Mapping[str, Any]) -> None:
        if event.get("event") == "eval" and event.get("model") == FEDERATED:
            timeline.append((time.perf_counter() - started, int(event["round"]), float(event["accuracy"])))

    config = CoordinatorConfig(workers=dict(workers), evaluator=dict(evaluator), connect_timeout=30.0, **settings)
    try:
        result = await Coordinator(config, report=lambda _: None, listeners=[listen]).run()
    except SyncfedError as exc:  # a collapsed run (diverged workers) is a result too
        return (timeline[-1][2] if timeline else None), timeline, str(exc)
    return result.accuracy(config.training_rounds), timeline, ""


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2%}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


async def strategies(rounds: int) -> dict[str, Any]:
    plan = [(name, THREADS) for name in ("alice", "bob", "charlie")] + [("testing", [*THREADS, "--testing"])]
    async with spawn_workers(plan) as processes:
        workers = {name: processes[name].uri for name in ("alice", "bob", "charlie")}
        evaluator = {"testing": processes["testing"].uri}
        results: dict[str, Any] = {}
        for name, settings in STRATEGIES.items():
            accuracy, _, error = await train(
                workers, evaluator, training_rounds=rounds, strategy=name, strategy_settings=settings
            )
            results[name] = {"accuracy": accuracy, "settings": settings, "error": error}
            print(f"  {name}: {percent(accuracy)} {error}", flush=True)
    baseline = results["fedavg"]["accuracy"]
    rows = [
        [
            name,
            ", ".join(f"{k}={v}" for k, v in entry["settings"].items()) or "defaults",
            percent(entry["accuracy"]),
            "" if entry["accuracy"] is None else f"{(entry['accuracy'] - baseline) * 100:+.2f}",
        ]
        for name, entry in results.items()
    ]
    print(f"\nAccuracy at round {rounds}, digits, classic non-IID split (3 workers), seed 1")
    print(table(["strategy", "settings", "accuracy", "points vs fedavg"], rows))
    return results


def iid_plan(sites: Mapping[str, tuple[int, Sequence[str]]]) -> list[tuple[str, list[str]]]:
    """Workers holding IID quarters of the training set (name -> (quarter, extra flags)), and the evaluator."""
    plan = [(name, [*THREADS, "--shard", f"{quarter}/4", *extra]) for name, (quarter, extra) in sites.items()]
    return [*plan, ("testing", [*THREADS, "--testing"])]


async def attacks(rounds: int) -> dict[str, Any]:
    sites: dict[str, tuple[int, Sequence[str]]] = {f"site{k}": (k, []) for k in (1, 2, 3, 4)}
    sites |= {"flipper": (4, ["--attack", "sign-flip"]), "scaler": (4, ["--attack", "scale"])}
    async with spawn_workers(iid_plan(sites)) as processes:
        honest = {f"site{k}": processes[f"site{k}"].uri for k in (1, 2, 3)}
        evaluator = {"testing": processes["testing"].uri}
        results: dict[str, dict[str, Any]] = {}
        for fourth, condition in (("site4", "no attack"), ("flipper", "sign-flip"), ("scaler", "scale")):
            workers = {**honest, fourth: processes[fourth].uri}
            for name, settings in ROBUST.items():
                accuracy, _, error = await train(
                    workers, evaluator, training_rounds=rounds, strategy=name, strategy_settings=settings
                )
                results.setdefault(name, {})[condition] = {"accuracy": accuracy, "error": error}
                print(f"  {condition}, {name}: {percent(accuracy)} {error[:100]}", flush=True)
    conditions = ("no attack", "sign-flip", "scale")
    rows = [
        [name, *(percent(entry[c]["accuracy"]) + (" (stopped)" if entry[c]["error"] else "") for c in conditions)]
        for name, entry in results.items()
    ]
    print(f"\nAccuracy at round {rounds}, digits, 4 IID workers, the fourth byzantine (seed 1)")
    print(table(["strategy", *conditions], rows))
    return results


async def slow(rounds: int) -> dict[str, Any]:
    # A fast batch is about 5 ms of compute plus BASE_DELAY; the slow site's takes four times as long.
    slow_delay = 4 * (BASE_DELAY + 0.005) - 0.005
    sites = {f"site{k}": (k, ["--slowdown", str(BASE_DELAY if k < 4 else slow_delay)]) for k in (1, 2, 3, 4)}
    async with spawn_workers(iid_plan(sites)) as processes:
        workers = {f"site{k}": processes[f"site{k}"].uri for k in (1, 2, 3, 4)}
        evaluator = {"testing": processes["testing"].uri}
        results: dict[str, Any] = {}
        for label, settings in (
            ("sync fedavg", {"training_rounds": rounds}),
            ("async fedbuff (K=2)", {"training_rounds": 2 * rounds, "mode": "async", "buffer_size": 2}),
        ):
            final, timeline, error = await train(workers, evaluator, eval_every=1, **settings)
            reached = next(((seconds, version) for seconds, version, accuracy in timeline if accuracy >= TARGET), None)
            results[label] = {"final": final, "reached": reached, "timeline": timeline, "error": error}
            print(f"  {label}: reached {TARGET:.0%} at {reached} {error}", flush=True)
    rows = [
        [
            label,
            "not reached" if entry["reached"] is None else f"{entry['reached'][0]:.1f}",
            "" if entry["reached"] is None else str(entry["reached"][1]),
            percent(entry["final"]),
        ]
        for label, entry in results.items()
    ]
    print(f"\nSeconds to {TARGET:.0%} federated accuracy, 4 IID workers, one at 4x the others' batch time")
    print(table(["mode", "seconds", "round / version", "final accuracy"], rows))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("strategies", "attacks", "slow"), action="append")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    chosen = args.only or ["strategies", "attacks", "slow"]
    experiments = {"strategies": strategies, "attacks": attacks, "slow": slow}
    figures = {name: asyncio.run(experiments[name](args.rounds)) for name in chosen}
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
