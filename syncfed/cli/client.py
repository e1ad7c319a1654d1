"""Kept for one release: the coordinator's command line moved to :mod:`syncfed.cli.coordinator`."""

from __future__ import annotations

import sys

from .coordinator import PROGRAM, build_parser, config_from_args, main

__all__ = ["PROGRAM", "build_parser", "config_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
