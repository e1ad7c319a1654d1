"""A worker's share of this machine's cores: torch threads divided among the syncfed workers running here.

torch gives every process as many threads as the machine has cores, so
four workers on two cores run eight threads that wait on each other (issue
18: 10-18 s a round instead of 0.4 s). A worker started without
``--threads`` registers itself in a per-user folder of this host
(``$XDG_RUNTIME_DIR/syncfed-workers``, else one in the temp dir) and,
before each job, sets torch's threads to ``max(1, cores // live workers)``,
never more than torch's own default (``syncfed.worker.compute.CoreShare``;
this module counts without torch, so the worker's program loads it only
once its data has loaded).

A worker holds an exclusive ``flock`` on its file for as long as it lives:
the system drops the lock when the process ends, however it ends, so a file
whose lock can be taken is stale (and removed), and a reused pid is never
mistaken for a worker. Without ``flock`` (Windows) nothing is counted and
torch keeps its default.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if sys.platform != "win32":
    import fcntl

__all__ = ["available_cores", "count_workers", "counted", "fair_threads", "registered", "registry_dir"]

logger = logging.getLogger("syncfed.worker")

#: The suffix of a live (or stale) worker's file in the registry folder.
SUFFIX = ".worker"


def fair_threads(cores: int, workers: int, ceiling: int) -> int:
    """One worker's threads when ``workers`` share ``cores``: at least 1, at most ``ceiling`` (torch's default)."""
    return max(1, min(ceiling, cores // max(1, workers)))


def available_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def registry_dir() -> Path:
    """The per-user folder where this host's workers register: under ``$XDG_RUNTIME_DIR``, else the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "syncfed-workers"
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(tempfile.gettempdir()) / f"syncfed-workers-{user}"


@contextmanager
def registered(directory: Path | None = None) -> Iterator[None]:
    """Count this process among the host's live workers while the block runs.

    The file is locked before it takes its counted name, so a counter never
    finds it unlocked and takes it for stale. A folder that cannot be
    written is said in one line, and the worker serves uncounted.
    """
    if sys.platform == "win32":
        yield
        return
    folder = registry_dir() if directory is None else directory
    with contextlib.ExitStack() as held:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = folder / f".{os.getpid()}-{uuid.uuid4().hex}"
            final = staging.with_name(staging.name[1:] + SUFFIX)
            handle = held.enter_context(staging.open("w"))
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            staging.rename(final)
            held.callback(final.unlink, missing_ok=True)
        except OSError as exc:
            logger.warning("cannot register in %s (%s): other workers here will not count this one", folder, exc)
        yield


def count_workers(directory: Path | None = None) -> int:
    """The live workers registered on this host; stale files (their process died) are removed."""
    if sys.platform == "win32":
        return 0
    folder = registry_dir() if directory is None else directory
    try:
        entries = [path for path in folder.iterdir() if path.name.endswith(SUFFIX)]
    except OSError:  # none registered yet, or not ours to read
        return 0
    live = 0
    for path in entries:
        try:
            with path.open("r") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live += 1
                    continue
                path.unlink(missing_ok=True)  # nobody holds it: its worker is gone
        except FileNotFoundError:  # removed by its worker or another counter meanwhile
            continue
        except OSError:  # cannot be opened, so cannot be told stale: counted
            live += 1
    return live


def counted(count: int, noun: str) -> str:
    """``1 syncfed worker``, ``2 syncfed workers``: for the lines a worker prints."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
