"""Print the normalisation table of docs/data.md: federated standardisation against each site's own, and raw values.

Usage::

    python scripts/normalization_table.py                      # both splits, seeds 1-5 (a few minutes on 2 cores)
    python scripts/normalization_table.py --seeds 1 --splits demo --rounds 20 --json table.json

Every run is a real federation: one worker process per site on 127.0.0.1,
spawned over CSV files as ``run_websocket_client.py --site`` spawns them
(``--data csv:PATH --label-column diagnosis``), the demo's recipe (batch 32,
10 local batches, lr 0.1 decaying 2% a round, the ``mlp`` model) and
FedAvg, one seeded run per seed. The data are scikit-learn's breast-cancer
records as ``scripts/own_data_demo.py`` writes them, on two non-IID splits
of its 455 training records:

- ``demo``: the demo's three hospitals, whose shares of malignant cases differ (label shift);
- ``shift``: the same records cut into three hospitals by ``mean radius``
  (smallest third, middle, largest), so their feature distributions differ
  as well as their labels (feature shift).

The evaluator holds the demo's 114 test records in both. Each split is trained three ways:

- ``federated``: the raw files, ``--normalize federated`` (the statistics
  every site applies are the pooled ones, agreed before round 1);
- ``own``: each site's file (the evaluator's too) standardised with that
  site's own mean and standard deviation per column, then ``--normalize none``:
  what a site that standardises its own data before joining would do;
- ``raw``: the raw files, ``--normalize none``.

The table gives the federated model's accuracy, per-class recall and loss
on the test records at the last round, as the mean over the seeds (and the
lowest and highest accuracy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from own_data_demo import HOSPITALS, write_breast_cancer  # noqa: E402

from syncfed.config import CoordinatorConfig  # noqa: E402
from syncfed.coordinator import FEDERATED, Coordinator, EvalRecord  # noqa: E402
from syncfed.exceptions import SyncfedError  # noqa: E402
from syncfed.net.spawn import spawn_workers  # noqa: E402

LABEL = "diagnosis"
#: The feature whose thirds make the ``shift`` split's hospitals.
SHIFT_FEATURE = "mean radius"
EVALUATOR = "testing"
METHODS = ("federated", "own", "raw")
SPLITS = ("demo", "shift")


def write_splits(out: Path) -> dict[str, dict[str, Path]]:
    """Each split's CSV files (site name to path, the evaluator's included), raw."""
    demo = out / "demo"
    write_breast_cancer(demo)
    sites = {name: demo / f"{name}.csv" for name in HOSPITALS} | {EVALUATOR: demo / "test.csv"}
    pooled = pd.concat([pd.read_csv(sites[name]) for name in HOSPITALS], ignore_index=True)
    ordered = pooled.sort_values(SHIFT_FEATURE, kind="stable").reset_index(drop=True)
    shift = out / "shift"
    shift.mkdir(parents=True, exist_ok=True)
    shifted = {}
    size = math.ceil(len(ordered) / len(HOSPITALS))
    for number, name in enumerate(HOSPITALS):
        shifted[name] = shift / f"{name}.csv"
        ordered.iloc[number * size : (number + 1) * size].to_csv(shifted[name], index=False)
    shifted[EVALUATOR] = sites[EVALUATOR]
    return {"demo": sites, "shift": shifted}


def standardise_own(sites: Mapping[str, Path], out: Path) -> dict[str, Path]:
    """Each site's file standardised with its own mean and population std per feature column (std 0 left as 1)."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, path in sites.items():
        frame = pd.read_csv(path)
        features = [column for column in frame.columns if column != LABEL]
        std = frame[features].std(ddof=0).replace(0.0, 1.0)
        frame[features] = (frame[features] - frame[features].mean()) / std
        written[name] = out / f"{name}.csv"
        frame.to_csv(written[name], index=False)
    return written


def describe_split(sites: Mapping[str, Path]) -> str:
    """Each site's records, malignant share and mean radius, for the table's caption."""
    parts = []
    for name, path in sites.items():
        frame = pd.read_csv(path)
        malignant = (frame[LABEL] == "malignant").mean()
        parts.append(
            f"{name} {len(frame)} ({malignant:.0%} malignant, {SHIFT_FEATURE} {frame[SHIFT_FEATURE].mean():.1f})"
        )
    return ", ".join(parts)


async def last_federated(workers: Mapping[str, str], evaluator: Mapping[str, str], **settings: Any) -> EvalRecord | str:
    """One seeded, silent run; the federated model's last evaluation, or why the run stopped."""
    config = CoordinatorConfig(workers=dict(workers), evaluator=dict(evaluator), connect_timeout=60.0, **settings)
    try:
        result = await Coordinator(config, report=lambda _: None).run()
    except SyncfedError as exc:
        return str(exc)
    return [record for record in result.evaluations if record.model == FEDERATED][-1]


async def train(workers: Mapping[str, str], evaluator: Mapping[str, str], **settings: Any) -> dict[str, Any]:
    """One seeded run; the federated model's last accuracy, loss and recall, or why the run stopped."""
    last = await last_federated(workers, evaluator, **settings)
    if isinstance(last, str):
        return {"error": last}
    reply = last.result
    return {"round": last.round, "accuracy": reply.accuracy, "loss": reply.loss, "recall": list(reply.recall or ())}


async def run_split(
    files: Mapping[str, Path], methods: Sequence[str], seeds: Sequence[int], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Every method on one split, each seed a run; workers are spawned once per set of files."""
    results: dict[str, list[dict[str, Any]]] = {}
    groups = [
        (("federated", "raw"), files),
        (("own",), standardise_own(files, next(iter(files.values())).parent / "own")),
    ]
    for group, paths in groups:
        chosen = [method for method in group if method in methods]
        if not chosen:
            continue
        plan = [
            (
                name,
                ["--data", f"csv:{path}", "--label-column", LABEL, "--threads", "1"]
                + (["--testing"] if name == EVALUATOR else []),
            )
            for name, path in paths.items()
        ]
        async with spawn_workers(plan) as processes:
            workers = {name: processes[name].uri for name in paths if name != EVALUATOR}
            evaluator = {EVALUATOR: processes[EVALUATOR].uri}
            for method in chosen:
                normalize = "federated" if method == "federated" else "none"
                for seed in seeds:
                    outcome = await train(
                        workers, evaluator, training_rounds=rounds, eval_every=rounds, seed=seed, normalize=normalize
                    )
                    results.setdefault(method, []).append({"seed": seed, **outcome})
                    print(f"  {method}, seed {seed}: {outcome}", file=sys.stderr, flush=True)
    return results


def summary(runs: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    """One table row's cells: mean accuracy (lowest-highest), mean recall per class, mean loss."""
    done = [run for run in runs if "error" not in run]
    stopped = len(runs) - len(done)
    note = f" ({stopped} of {len(runs)} runs stopped)" if stopped else ""
    if not done:
        return ["stopped" + note, *("" for _ in classes), ""]
    accuracies = [run["accuracy"] for run in done]
    cells = [f"{statistics.mean(accuracies):.2%} ({min(accuracies):.2%}-{max(accuracies):.2%}){note}"]
    for index in range(len(classes)):
        shares = [run["recall"][index] for run in done if run["recall"][index] is not None]
        cells.append(f"{statistics.mean(shares):.1%}" if shares else "-")
    cells.append(f"{statistics.mean(run['loss'] for run in done):.3f}")
    return cells


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated, of demo, shift (default: both)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of federated, own, raw")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds, one run each (default: 1-5)")
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds per run (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="where the CSV files go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    splits = [name for name in args.splits.split(",") if name]
    methods = [name for name in args.methods.split(",") if name]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    unknown = [name for name in splits if name not in SPLITS] + [name for name in methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown split or method {unknown[0]!r}")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        files = write_splits(out)
        classes = sorted(pd.read_csv(files["demo"][EVALUATOR])[LABEL].unique())
        figures = {}
        for split in splits:
            print(f"{split}: {describe_split(files[split])}", file=sys.stderr, flush=True)
            figures[split] = asyncio.run(run_split(files[split], methods, seeds, args.rounds))
    header = ["split", "normalisation", "accuracy, mean (min-max)", *(f"recall {name}" for name in classes), "loss"]
    rows = [[split, method, *summary(figures[split][method], classes)] for split in splits for method in methods]
    print(f"Federated model on the {EVALUATOR} records at round {args.rounds}, FedAvg, seeds {args.seeds}")
    print(table(header, rows))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"rounds": args.rounds, "seeds": seeds, "classes": classes, **figures}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
