"""Print the evidence tables of docs/privacy.md: the cost of secure aggregation, and accuracy against epsilon.

Usage::

    python scripts/privacy_evidence.py                  # all four tables (about 30 minutes on 2 cores)
    python scripts/privacy_evidence.py --only timing --timing-rounds 4
    python scripts/privacy_evidence.py --only accuracy --rounds 40 --json privacy.json
    python scripts/privacy_evidence.py --only analytics  # about a minute

Every run uses real worker processes on 127.0.0.1 (spawned here, one torch
thread each), the digits data set and the demo's recipe (batch 32, 10 local
batches, lr 0.1 decaying 2% a round):

1. ``timing``: 3 and 10 workers holding IID shards of the training set.
   Runs with and without ``--secure-agg`` alternate on the same processes,
   and the median seconds of their rounds (the first round of each run, which
   warms up, left out) give the ratio. Once with the demo's 10 local batches,
   once with none, which leaves the protocol's own cost.
2. ``accuracy``: the demo's three non-IID workers (alice 0-3, bob 4-6,
   charlie 7-9) and the evaluator; federated accuracy after ``--rounds``
   rounds without DP (epsilon infinity), with the updates clipped but
   next to no noise (``--dp central`` with z = 1e-9: what clipping alone
   costs) and, for each target epsilon at delta 1e-5, with ``--dp central``
   and with ``--dp distributed --secure-agg``. Each noise multiplier is the least whose ``--rounds``
   rounds spend the target (``noise_for_epsilon``, sampling rate 1: every
   worker trains every round); the accountant's epsilon after the last round
   is printed beside it. A run whose training diverges under the noise is
   reported with the round it stopped at.
3. ``sites``: the same runs over ``--sites`` workers (30) holding IID shards
   and a linear model (650 parameters), hosted in this process as real
   websocket servers on 127.0.0.1. User-level DP hides a whole site among
   the others: it needs many sites and a small model to keep accuracy.
4. ``analytics``: the demo's three workers answer each analytics query
   (``python -m syncfed analytics``) in the clear and through secure
   aggregation, alternately, ``--queries`` times each; the median seconds
   per answer give the ratio, and the secure answer's largest gap to the
   plain one is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from syncfed.cli import analytics as analytics_cli  # noqa: E402
from syncfed.config import CoordinatorConfig, WorkerConfig  # noqa: E402
from syncfed.coordinator import FEDERATED, Coordinator  # noqa: E402
from syncfed.exceptions import QuorumNotMet  # noqa: E402
from syncfed.net.spawn import spawn_workers  # noqa: E402
from syncfed.privacy import PrivacyAccountant, noise_for_epsilon  # noqa: E402
from syncfed.worker import load_holdings, run_worker  # noqa: E402

THREADS = ["--threads", "1"]
DEMO = ("alice", "bob", "charlie")
#: The sites table's model, by import path: this script, importable from its folder.
LINEAR = "privacy_evidence:DigitsLinear"
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
#: The noise multiplier of the clipping-only run: no protection to speak of.
NEGLIGIBLE = 1e-9
STARTUP = 300.0  # seconds for ten workers to import torch on a busy machine


def quiet(_: str) -> None:
    """Swallow the coordinator's report lines."""


async def timing(workers: int, rounds: int, blocks: int, batches: int) -> dict[str, Any]:
    """Median seconds per round without and with secure aggregation, alternating runs on the same workers."""
    plan = [(f"site{k + 1}", [*THREADS, "--shard", f"{k + 1}/{workers}"]) for k in range(workers)]
    plain: list[float] = []
    secure: list[float] = []
    async with spawn_workers(plan, startup_timeout=STARTUP) as processes:
        uris = {name: process.uri for name, process in processes.items()}
        for block in range(blocks):
            for secure_agg, seconds in ((False, plain), (True, secure)):
                settings = CoordinatorConfig(
                    workers=uris,
                    evaluator={},
                    training_rounds=rounds,
                    federate_after_n_batches=batches,
                    secure_agg=secure_agg,
                    seed=block + 1,
                    connect_timeout=60.0,
                )
                result = await Coordinator(settings, report=quiet).run()
                seconds.extend(record.seconds for record in result.rounds[1:])
    row = {
        "workers": workers,
        "batches": batches,
        "plain_s": statistics.median(plain),
        "secure_s": statistics.median(secure),
        "rounds_each": len(plain),
    }
    row["ratio"] = row["secure_s"] / row["plain_s"]
    print(
        f"  {workers} workers, {batches} batches: plain {row['plain_s']:.3f} s, secure {row['secure_s']:.3f} s,"
        f" ratio {row['ratio']:.2f} ({len(plain)} rounds each)",
        flush=True,
    )
    return row


async def timing_table(rounds: int, blocks: int) -> list[dict[str, Any]]:
    return [await timing(workers, rounds, blocks, batches) for workers in (3, 10) for batches in (10, 0)]


async def accuracy_runs(base: CoordinatorConfig, clip: float) -> list[dict[str, Any]]:
    """Federated accuracy after ``base``'s rounds: without DP, clipping only, and each target epsilon in both modes."""
    rounds = base.training_rounds
    runs: list[tuple[float, str | None]] = [(math.inf, None), (math.inf, "central")]
    runs += [(epsilon, mode) for epsilon in EPSILONS for mode in ("central", "distributed")]
    multipliers = {epsilon: noise_for_epsilon(epsilon, rounds, 1.0, DELTA) for epsilon in EPSILONS}
    multipliers[math.inf] = NEGLIGIBLE
    rows: list[dict[str, Any]] = []
    for epsilon, mode in runs:
        z = multipliers[epsilon] if mode is not None else None
        settings = (
            base
            if mode is None
            else replace(base, dp=mode, dp_clip=clip, dp_noise_multiplier=z, secure_agg=mode == "distributed")
        )
        label = "none" if mode is None else "clipping only" if z == NEGLIGIBLE else mode
        row: dict[str, Any] = {"target_epsilon": epsilon, "mode": label, "noise_multiplier": z}
        try:
            result = await Coordinator(settings, report=quiet).run()
            row["accuracy"] = result.accuracy(rounds, FEDERATED)
            row["stopped"] = None
        except QuorumNotMet as exc:
            row["accuracy"] = None
            row["stopped"] = str(exc).split(":")[0]
        row["epsilon"] = PrivacyAccountant(z, 1.0, DELTA).epsilon_after(rounds) if z is not None else math.inf
        shown = f"{row['accuracy']:.2%}" if row["accuracy"] is not None else f"diverged ({row['stopped']})"
        print(f"  epsilon {epsilon:g} {row['mode']}: z {z}, accuracy {shown}", flush=True)
        rows.append(row)
    return rows


async def accuracy_table(rounds: int, clip: float) -> list[dict[str, Any]]:
    """The demo: three non-IID worker processes and digits-cnn."""
    plan = [(name, THREADS) for name in DEMO] + [("testing", [*THREADS, "--testing"])]
    async with spawn_workers(plan, startup_timeout=STARTUP) as processes:
        base = CoordinatorConfig(
            workers={name: processes[name].uri for name in DEMO},
            evaluator={"testing": processes["testing"].uri},
            training_rounds=rounds,
            eval_every=rounds,
            max_round_retries=0,
            connect_timeout=60.0,
        )
        return await accuracy_runs(base, clip)


class DigitsLinear(nn.Module):
    """Multinomial logistic regression on the 64 pixels of 8x8 digits: 650 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _announce(uri: asyncio.Future[str], line: str) -> None:
    """Take the address from a worker's ready line, "syncfed worker ID listening on URI"."""
    uri.set_result(line.rsplit(" ", 1)[-1])


@asynccontextmanager
async def hosted_sites(count: int) -> AsyncIterator[dict[str, str]]:
    """``count`` training workers holding IID shards, and the evaluator testing, served by this process.

    Real websocket servers on 127.0.0.1 speaking the real protocol, in one
    event loop: thirty torch processes would not fit two cores.
    """
    loop = asyncio.get_running_loop()
    configs = [
        WorkerConfig(f"site{k + 1}", host="127.0.0.1", port=0, shard=(k, count), val_fraction=0.0, models=(LINEAR,))
        for k in range(count)
    ]
    # The evaluator scores every site's update on evaluation rounds without DP: room for all those requests.
    evaluator = WorkerConfig("testing", host="127.0.0.1", port=0, testing=True, models=(LINEAR,), max_in_flight=64)
    configs.append(evaluator)
    uris: dict[str, asyncio.Future[str]] = {}
    tasks = []
    for config in configs:
        uri = uris[config.worker_id] = loop.create_future()
        ready = functools.partial(_announce, uri)
        tasks.append(asyncio.create_task(run_worker(config, load_holdings(config), ready=ready)))
    try:
        async with asyncio.timeout(STARTUP):
            yield {name: await uri for name, uri in uris.items()}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sites_table(rounds: int, clip: float, count: int) -> list[dict[str, Any]]:
    """Many sites: ``count`` IID shards hosted here and a linear model, where user-level DP can keep accuracy."""
    torch.set_num_threads(1)
    async with hosted_sites(count) as uris:
        base = CoordinatorConfig(
            workers={name: uri for name, uri in uris.items() if name != "testing"},
            evaluator={"testing": uris["testing"]},
            model=LINEAR,
            training_rounds=rounds,
            eval_every=rounds,
            max_round_retries=0,
            connect_timeout=60.0,
        )
        return await accuracy_runs(base, clip)


#: The analytics table's queries, as ``python -m syncfed analytics`` arguments (secure runs add --secure-agg).
QUERIES = {
    "label-histogram": ["label-histogram"],
    "quantiles (256 bins)": ["quantiles", "--range", "-0.82", "1.85", "--bins", "256"],
    "feature-stats (64 features)": ["feature-stats", "--clip-range", "-0.82", "1.85"],
}


async def analytics_table(repeats: int) -> list[dict[str, Any]]:
    """Median seconds per answer of each query, in the clear and through secure aggregation, and their largest gap."""
    rows = []
    async with spawn_workers([(name, THREADS) for name in DEMO], startup_timeout=STARTUP) as processes:
        workers = ",".join(f"{name}={process.uri}" for name, process in processes.items())
        for name, arguments in QUERIES.items():
            seconds: dict[bool, list[float]] = {False: [], True: []}
            answers: dict[bool, Any] = {}
            for _ in range(repeats):
                for secure in (False, True):
                    parser = argparse.ArgumentParser()
                    analytics_cli.configure(parser)
                    args = parser.parse_args(["--workers", workers, *(["--secure-agg"] if secure else []), *arguments])
                    started = time.perf_counter()
                    asked = await analytics_cli._ask(args)
                    seconds[secure].append(time.perf_counter() - started)
                    if asked.failures or asked.error is not None or asked.query is None:
                        raise RuntimeError(f"{name}: {asked.failures or asked.error}")
                    answers[secure] = analytics_cli._tabulate(
                        asked.query, asked.results, (0.1, 0.5, 0.9), per_worker=not secure
                    )[1]
            plain_s, secure_s = statistics.median(seconds[False]), statistics.median(seconds[True])
            row = {
                "query": name,
                "plain_ms": 1000 * plain_s,
                "secure_ms": 1000 * secure_s,
                "ratio": secure_s / plain_s,
                "gap": _gap(answers[False], answers[True]),
            }
            print(
                f"  {name}: plain {row['plain_ms']:.1f} ms, secure {row['secure_ms']:.1f} ms, ratio"
                f" {row['ratio']:.2f}, largest gap {row['gap']:.3g}",
                flush=True,
            )
            rows.append(row)
    return rows


def _gap(plain: Any, secure: Any) -> float:
    """The largest absolute difference between the numbers of two JSON answers of the same query."""
    if isinstance(plain, dict):
        return max((_gap(plain[key], secure[key]) for key in plain if key in secure), default=0.0)
    if isinstance(plain, list):
        return max((_gap(a, b) for a, b in zip(plain, secure, strict=True)), default=0.0)
    if isinstance(plain, (int, float)) and not isinstance(plain, bool):
        return abs(float(plain) - float(secure))
    return 0.0


def print_analytics(rows: Sequence[dict[str, Any]], repeats: int) -> None:
    print("\n| query | plain ms | secure ms | ratio | largest gap to plain |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['query']} | {row['plain_ms']:.1f} | {row['secure_ms']:.1f} | {row['ratio']:.2f}"
            f" | {row['gap']:.3g} |"
        )
    print(f"\n(3 workers on digits, medians of {repeats} answers each, connecting included)")


def print_timing(rows: Sequence[dict[str, Any]]) -> None:
    print("\n| workers | local batches | plain s/round | secure s/round | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['batches']} | {row['plain_s']:.3f} | {row['secure_s']:.3f}"
            f" | {row['ratio']:.2f} |"
        )


def print_accuracy(rows: Sequence[dict[str, Any]], rounds: int, clip: float, setting: str) -> None:
    print(f"\n| target epsilon | mode | noise multiplier z | epsilon after {rounds} rounds | accuracy |")
    print("|---|---|---|---|---|")
    for row in rows:
        z = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3g}"
        spent = "inf" if row["epsilon"] > 1e6 else f"{row['epsilon']:.4f}"
        accuracy = f"{row['accuracy']:.2%}" if row["accuracy"] is not None else f"diverged ({row['stopped']})"
        print(f"| {row['target_epsilon']:g} | {row['mode']} | {z} | {spent} | {accuracy} |")
    print(f"\n({setting}; clip C = {clip:g}, delta {DELTA:g}, sampling rate 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", choices=("timing", "accuracy", "sites", "analytics"), help="one table only")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of each accuracy run (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=0.01, help="--dp-clip of the demo's runs (default: %(default)s)")
    parser.add_argument("--sites", type=int, default=30, help="workers of the sites table (default: %(default)s)")
    parser.add_argument(
        "--sites-clip", type=float, default=0.1, help="--dp-clip of the sites table's runs (default: %(default)s)"
    )
    parser.add_argument("--timing-rounds", type=int, default=4, help="rounds per timing run (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=3, help="timing runs of each kind (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=9, help="answers per analytics query (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    figures: dict[str, Any] = {}
    if args.only in (None, "timing"):
        print("Per-round time with and without secure aggregation:", flush=True)
        figures["timing"] = asyncio.run(timing_table(args.timing_rounds, args.blocks))
        print_timing(figures["timing"])
    if args.only in (None, "accuracy"):
        print(f"\nAccuracy after {args.rounds} rounds against epsilon:", flush=True)
        figures["accuracy"] = asyncio.run(accuracy_table(args.rounds, args.clip))
        print_accuracy(figures["accuracy"], args.rounds, args.clip, "3 non-IID workers, digits-cnn")
    if args.only in (None, "sites"):
        print(f"\nAccuracy after {args.rounds} rounds against epsilon, {args.sites} sites:", flush=True)
        figures["sites"] = asyncio.run(sites_table(args.rounds, args.sites_clip, args.sites))
        print_accuracy(figures["sites"], args.rounds, args.sites_clip, f"{args.sites} IID sites, a linear model")
    if args.only in (None, "analytics"):
        print("\nAnalytics answers in the clear and through secure aggregation:", flush=True)
        figures["analytics"] = asyncio.run(analytics_table(args.queries))
        print_analytics(figures["analytics"], args.queries)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
