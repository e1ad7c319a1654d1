"""``python -m syncfed provision``: a private CA and one startup kit per participant.

Usage::

    python -m syncfed provision project.toml -o startup/

The kits themselves are made by :mod:`syncfed.provision`; this module only
reads the flags and prints where each kit went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..exceptions import SyncfedError
from ..provision import load_project, provision
from .common import fail

__all__ = ["PROGRAM", "configure", "run"]

#: Errors are reported under the parent command's name, as they always were.
PROGRAM = "python -m syncfed"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the project file and the output folder to ``parser`` (``python -m syncfed``'s subparser)."""
    parser.add_argument("project", type=Path, help="the project file (TOML): coordinator and workers")
    parser.add_argument("-o", "--output", type=Path, default=Path("startup"), help="where to write (default: startup)")


def run(args: argparse.Namespace) -> int:
    """Write the kits; print each participant's kit and where the CA key lies."""
    try:
        project = load_project(args.project)
        written = provision(project, args.output)
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    for name, kit in written.items():
        print(f"{name}: {kit}")
    print(f"CA key (keep it offline): {args.output / 'ca' / 'ca.key'}")
    top = git_work_tree(args.output)
    if top is not None:
        print(
            f"{PROGRAM}: warning: {args.output} is inside the git work tree {top}: keep it out of version control"
            " (add it to .gitignore): it holds the CA's private key",
            file=sys.stderr,
        )
    return 0


def git_work_tree(path: Path) -> Path | None:
    """The top of the git work tree that ``path`` lies in, if any: a private key there is one commit from leaking."""
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / ".git").exists():
            return folder
    return None
