"""How syncfed's programs ask their C library to keep the memory a round frees for the next round."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Freed memory below this is kept, and blocks below it come from the heap rather than fresh mappings.
KEEP = 1 << 30


def tuned_by_user(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` already sets glibc's malloc (``MALLOC_*_`` variables, or ``glibc.malloc`` tunables)."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(name.startswith("MALLOC_") for name in environ)


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a round frees for the next round; returns whether it was set.

    Each round allocates and frees model-sized buffers: in a worker the
    received weights, the gradients and the trained copy it sends; in the
    coordinator the messages and the new global model. By default glibc hands
    them back to the system, and the next round's pages are mapped and zeroed
    afresh: a sixth of the workers' CPU in rounds of mlp-10m, a quarter of the
    coordinator's with mlp-100m (docs/performance.md). A worker's training
    thread allocates from an arena of its own, which the thresholds alone do
    not reach; so one arena for every thread, and trim and mmap thresholds of
    :data:`KEEP`. The peak is what it was: the memory kept is reused.

    Call it before the process starts threads (an arena, once made, stays).
    Nothing happens on other C libraries than glibc, or where the environment
    already tunes glibc's malloc: the user's settings win.
    """
    if not sys.platform.startswith("linux") or tuned_by_user(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, KEEP), (_M_MMAP_THRESHOLD, KEEP))
    )
