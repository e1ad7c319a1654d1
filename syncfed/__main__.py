"""``python -m syncfed``: project tools.

Usage::

    python -m syncfed provision project.toml -o startup/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
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
