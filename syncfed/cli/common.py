"""What both command-line tools share: flag spelling, logging, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..exceptions import (
    CheckpointError,
    ConfigError,
    DatasetError,
    IncompatibleWorkers,
    ModelError,
    ProtocolError,
    QuorumNotMet,
    RemoteError,
    SyncfedError,
    WorkerUnavailable,
)

__all__ = ["EXIT_CODES", "exit_code", "normalize_flags", "setup_logging", "size", "fail"]

#: Exit status by error type; the first matching entry wins.
EXIT_CODES: tuple[tuple[type[SyncfedError], int], ...] = (
    (ConfigError, 2),
    (DatasetError, 3),
    (ModelError, 3),
    (IncompatibleWorkers, 4),
    (WorkerUnavailable, 5),
    (RemoteError, 6),
    (ProtocolError, 7),
    (QuorumNotMet, 8),
    (CheckpointError, 9),
    (SyncfedError, 1),
)
INTERRUPTED = 130


def exit_code(error: SyncfedError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def fail(program: str, error: SyncfedError) -> int:
    """Print one clear line for ``error`` and return its exit status."""
    print(f"{program}: error: {error}", file=sys.stderr)
    return exit_code(error)


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """Accept ``--training_rounds`` as ``--training-rounds``: underscores in flag names become dashes."""
    normalized = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        normalized.append(token)
    return normalized


def size(text: str) -> int:
    """Parse a byte count such as ``1048576``, ``512MiB`` or ``1GiB`` for argparse."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number, multiplier = lowered[: -len(unit)], factor
            break
    else:
        number, multiplier = lowered, 1
    try:
        value = int(float(number) * multiplier)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 536870912 or 512MiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def setup_logging(verbose: bool, *, default: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every frame at DEBUG: too much even for --verbose.
    logging.getLogger("websockets").setLevel(logging.INFO if verbose else logging.WARNING)
