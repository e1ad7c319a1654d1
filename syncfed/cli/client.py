"""Kept for one release: the coordinator's command line moved to :mod:`syncfed.cli.coordinator`."""

from __future__ import annotations

import sys

from .coordinator import CENTRAL, PROGRAM, SPAWNER_FLAGS, STRATEGY_FLAGS, build_parser, config_from_args, main

__all__ = ["CENTRAL", "PROGRAM", "SPAWNER_FLAGS", "STRATEGY_FLAGS", "build_parser", "config_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
