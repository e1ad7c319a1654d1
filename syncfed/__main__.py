"""``python -m syncfed``: project tools.

Usage::

    python -m syncfed provision project.toml -o startup/
    python -m syncfed models --registry runs/registry list|show ID|best METRIC|export ID PATH
    python -m syncfed analytics --workers alice=ws://localhost:8777,... label-histogram|feature-stats|quantiles
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import analytics, models
from .cli.common import fail
from .exceptions import SyncfedError
from .provision import load_project, provision

PROGRAM = "python -m syncfed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="syncfed project tools")
    commands = parser.add_subparsers(dest="command", required=True)
    kits = commands.add_parser(
        "provision", help="make a private CA and a startup kit (key, certificate, config) per participant"
    )
    kits.add_argument("project", type=Path, help="the project file (TOML): coordinator and workers")
    kits.add_argument("-o", "--output", type=Path, default=Path("startup"), help="where to write (default: startup)")
    models.configure(
        commands.add_parser(
            "models",
            help="list, show, pick and export recorded model versions",
            description="list, show, pick and export recorded model versions",
        )
    )
    analytics.configure(
        commands.add_parser(
            "analytics",
            help="label histogram, feature statistics and quantiles over all workers' data, without moving it",
            description="statistics over all workers' data, without moving it",
        )
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "models":
        return models.run(args)
    if args.command == "analytics":
        return analytics.run(args)
    try:
        project = load_project(args.project)
        written = provision(project, args.output)
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    for name, kit in written.items():
        print(f"{name}: {kit}")
    print(f"CA key (keep it offline): {args.output / 'ca' / 'ca.key'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
