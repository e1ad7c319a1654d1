"""Kept for one release: the worker's command line moved to :mod:`syncfed.cli.worker`.

``python -m syncfed.cli.server`` still starts a worker.
"""

from __future__ import annotations

import sys

from .worker import PROGRAM, build_parser, config_from_args, main

__all__ = ["PROGRAM", "build_parser", "config_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
