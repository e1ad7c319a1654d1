"""``python -m syncfed models``: list, show, pick, export, prune and measure recorded model versions.

Usage::

    python -m syncfed models --registry runs/registry list [--run RUN]
    python -m syncfed models --registry runs/registry show 2883a75b
    python -m syncfed models --registry runs/registry best accuracy [--json]
    python -m syncfed models --registry runs/registry best loss --lowest --run demo
    python -m syncfed models --registry runs/registry export demo:40 model.onnx
    python -m syncfed models --registry runs/registry export demo:40 model.onnx --model mypkg:Net
    python -m syncfed models --registry runs/registry prune --keep-last 1 --keep-best 1 [--yes]
    python -m syncfed models --registry runs/registry du
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..exceptions import ConfigError, SyncfedError
from ..registry import EXPORT_FORMATS, ModelRegistry, ModelVersion
from ..retention import RunPlan, disk_usage, prune_plan, reclaimable
from .common import INTERRUPTED, Parser, aligned, fail, run_program, stdout_closed

__all__ = ["PROGRAM", "configure", "run", "main"]

PROGRAM = "python -m syncfed models"
_COLUMNS = ("ID", "RUN", "ROUND", "MODEL", "CREATED (UTC)", "METRICS")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the registry flag and the actions to ``parser`` (its own, or ``python -m syncfed``'s subparser)."""
    parser.add_argument("--registry", type=Path, required=True, metavar="DIR", help="the model registry directory")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list versions, oldest first")
    listing.add_argument("--run", help="only the versions of this run")
    show = actions.add_parser("show", help="show one version")
    show.add_argument("version", metavar="ID", help="a version id, a unique prefix of one, or RUN:ROUND")
    best = actions.add_parser("best", help="show the version with the best value of a metric")
    best.add_argument("metric", help="a metric name, such as accuracy or loss")
    best.add_argument("--lowest", action="store_true", help="lowest is best (for a loss)")
    best.add_argument("--run", help="only among the versions of this run")
    best.add_argument("--json", action="store_true", help="print the whole record as JSON, not one line")
    export = actions.add_parser("export", help="write a version's weights to a file")
    export.add_argument("version", metavar="ID", help="a version id, a unique prefix of one, or RUN:ROUND")
    export.add_argument("path", type=Path, metavar="PATH", help="the file to write")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="needed only for a PATH not ending .onnx or .safetensors, and must agree with the one it ends in"
        " (default: from PATH; safetensors for other names)",
    )
    export.add_argument(
        "--input-shape",
        type=_shape,
        help="onnx: one input's shape without the batch, such as 1,8,8 (default: the one the run recorded)",
    )
    export.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="onnx: let the export import this user model, which the version names (repeatable);"
        " built-in models need no flag",
    )
    prune = actions.add_parser(
        "prune", help="remove versions, keeping per run the last N and the best N; lists them unless --yes"
    )
    prune.add_argument("--keep-last", type=int, metavar="N", help="keep each run's last N rounds")
    prune.add_argument(
        "--keep-best",
        type=int,
        metavar="N",
        help="keep each run's best N by its headline metric: auc, mae, accuracy, else loss",
    )
    prune.add_argument("--run", help="only the versions of this run")
    prune.add_argument("--yes", action="store_true", help="remove them (without it, only say what would go)")
    actions.add_parser("du", help="the disk space each run's versions take, and the total")


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed action; errors print one line and map to the usual exit codes."""
    try:
        registry = ModelRegistry(args.registry, create=False)
        if args.action == "list":
            scope = f" of run {args.run!r}" if args.run is not None else ""
            print(_table(registry.versions(args.run)) or f"no versions{scope} in {args.registry}")
        elif args.action == "show":
            print(_describe(registry.get(args.version)))
        elif args.action == "best":
            best = registry.best(args.metric, run_id=args.run, lowest=args.lowest)
            score = _metrics({args.metric: best.metrics[args.metric]})
            print(json.dumps(_record(best)) if args.json else f"{_name(best)}: {score}")
        elif args.action == "export":
            version = registry.get(args.version)
            registry.export(version, args.path, args.format, input_shape=args.input_shape, models=args.model)
            print(f"exported {_name(version)} to {args.path}")
        elif args.action == "prune":
            print(_prune(registry, args))
        else:
            print(_usage(registry))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader left (``... | head -1``): stop quietly, and keep Python from failing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = Parser(prog=PROGRAM, description="list, show, pick, export, prune and measure recorded model versions")
    configure(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except BrokenPipeError:
        return stdout_closed()


def _table(versions: Sequence[ModelVersion]) -> str:
    """The versions in aligned columns; empty when there are none."""
    if not versions:
        return ""
    return aligned([_COLUMNS, *_rows(versions)], right={2})


def _rows(versions: Sequence[ModelVersion]) -> list[tuple[str, ...]]:
    return [
        (
            version.id[:12],
            version.run_id,
            str(version.round),
            version.model,
            version.created[:19].replace("T", " "),
            _metrics(version.metrics),
        )
        for version in versions
    ]


def _name(version: ModelVersion) -> str:
    """A version as one short phrase: its id as the commands take it, its run and round."""
    return f"{version.id[:12]} (run {version.run_id}, round {version.round})"


def _record(version: ModelVersion) -> dict[str, Any]:
    """Every field of a version as JSON values: a NaN metric (a diverged run) is null."""
    return {
        "id": version.id,
        "run": version.run_id,
        "round": version.round,
        "model": version.model,
        "created": version.created,
        "participants": list(version.participants),
        "strategy": version.strategy,
        "settings": version.settings,
        "metrics": {name: None if math.isnan(value) else value for name, value in version.metrics.items()},
        "hash": version.hash,
        "weights": str(version.path),
    }


def _describe(version: ModelVersion) -> str:
    fields = {
        "id": version.id,
        "run": version.run_id,
        "round": str(version.round),
        "model": version.model,
        "created": version.created,
        "participants": ", ".join(version.participants) or "-",
        "strategy": json.dumps(version.strategy, sort_keys=True),
        "settings": json.dumps(version.settings, sort_keys=True),
        "metrics": _metrics(version.metrics) or "-",
        "hash": version.hash,
        "weights": str(version.path),
    }
    width = max(map(len, fields)) + 1
    return "\n".join(f"{(name + ':').ljust(width)} {value}" for name, value in fields.items())


def _prune(registry: ModelRegistry, args: argparse.Namespace) -> str:
    """Remove (with ``--yes``) or list what ``--keep-last`` and ``--keep-best`` leave out, run by run.

    Raises:
        ConfigError: if neither count is given, or one is negative.
    """
    if args.keep_last is None and args.keep_best is None:
        raise ConfigError("prune needs --keep-last N, --keep-best N or both: it keeps only what they name")
    every = registry.versions()
    plans = prune_plan(registry.versions(args.run), keep_last=args.keep_last or 0, keep_best=args.keep_best or 0)
    remove = [version for plan in plans for version in plan.remove]
    lines = [_plan_line(plan, args, done=args.yes) for plan in plans]
    if not remove:
        return "\n".join([*lines, "nothing to remove"])
    if args.yes:
        return "\n".join([*lines, f"freed {_size(registry.delete(remove))}"])
    return "\n".join([*lines, f"would free {_size(reclaimable(remove, every))}; pass --yes to remove them"])


def _plan_line(plan: RunPlan, args: argparse.Namespace, *, done: bool) -> str:
    rules = [f"last {args.keep_last}"] if args.keep_last is not None else []
    if args.keep_best is not None:
        rules.append(
            f"best {args.keep_best} by {plan.metric}" if plan.metric else f"no metric to rank by: last {args.keep_best}"
        )
    rounds = ("round " if len(plan.keep) == 1 else "rounds ") + ", ".join(str(version.round) for version in plan.keep)
    keep, remove = ("kept", "removed") if done else ("keeps", "removes")
    kept = rounds if plan.keep else "nothing"
    total = len(plan.keep) + len(plan.remove)
    return f"run {plan.run_id}: {keep} {kept} ({', '.join(rules)}), {remove} {len(plan.remove)} of {total}"


def _usage(registry: ModelRegistry) -> str:
    """The ``du`` table: each run's versions and bytes, weights no version uses, the database, the total."""
    usage = disk_usage(registry)
    rows = [("RUN", "VERSIONS", "SIZE")]
    rows += [(run_id, str(count), _size(size)) for run_id, (count, size) in usage.runs.items()]
    if usage.unreferenced:
        rows.append(("weights no version uses", "", _size(usage.unreferenced)))
    rows.append(("database", "", _size(usage.database)))
    rows.append(("total", str(sum(count for count, _ in usage.runs.values())), _size(usage.total)))
    return aligned(rows, right={1, 2})


def _size(size: int) -> str:
    """Bytes in binary units, as --max-message-size takes them: 512 B, 2.3 MiB."""
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def _metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 1,8,8")
    return shape
