"""``python -m syncfed models``: list, show, pick and export recorded model versions.

Usage::

    python -m syncfed models --registry runs/registry list [--run RUN]
    python -m syncfed models --registry runs/registry show 2883a75b
    python -m syncfed models --registry runs/registry best accuracy
    python -m syncfed models --registry runs/registry best loss --lowest --run demo
    python -m syncfed models --registry runs/registry export demo:40 model.onnx --format onnx
    python -m syncfed models --registry runs/registry export demo:40 model.onnx --format onnx --model mypkg:Net
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ..exceptions import SyncfedError
from ..registry import EXPORT_FORMATS, ModelRegistry, ModelVersion
from .common import INTERRUPTED, Parser, fail, run_program, stdout_closed

__all__ = ["PROGRAM", "configure", "run", "main"]

PROGRAM = "python -m syncfed models"
_COLUMNS = ("ID", "RUN", "ROUND", "MODEL", "CREATED (UTC)", "METRICS")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the registry flag and the four actions to ``parser`` (its own, or ``python -m syncfed``'s subparser)."""
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
    export = actions.add_parser("export", help="write a version's weights to a file")
    export.add_argument("version", metavar="ID", help="a version id, a unique prefix of one, or RUN:ROUND")
    export.add_argument("path", type=Path, metavar="PATH", help="the file to write")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors", help="(default: %(default)s)")
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
            print(_describe(registry.best(args.metric, run_id=args.run, lowest=args.lowest)))
        else:
            version = registry.get(args.version)
            with _quiet_exporter():
                registry.export(version, args.path, args.format, input_shape=args.input_shape, models=args.model)
            print(f"exported {version.id[:12]} (run {version.run_id}, round {version.round}) to {args.path}")
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
    parser = Parser(prog=PROGRAM, description="list, show, pick and export recorded model versions")
    configure(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except BrokenPipeError:
        return stdout_closed()


def _table(versions: Sequence[ModelVersion]) -> str:
    """Aligned columns, numbers right-aligned; empty when there are no versions."""
    if not versions:
        return ""
    rows = [
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
    widths = [max(len(row[column]) for row in [_COLUMNS, *rows]) for column in range(len(_COLUMNS))]
    lines = []
    for row in [_COLUMNS, *rows]:
        cells = [
            cell.rjust(width) if column == 2 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide torch's ONNX exporter chatter (deprecations, optional torchvision ops): the user asked for a file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield
