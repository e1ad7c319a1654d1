"""keep_freed_memory: a worker's model-sized buffers reuse the last round's pages, unless the user tunes malloc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from syncfed.cli.allocator import tuned_by_user

# Each round of a worker, in small: a thread that allocates, writes and frees 40 MB, as the compute
# thread does with a 10M-parameter model's copies; page faults per round after a first one.
ROUNDS = textwrap.dedent(
    """
    import resource, sys, threading
    import numpy as np
    from syncfed.cli.allocator import keep_freed_memory

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None

    def one_round():
        def work():
            buffer = np.ones(10_000_000, dtype=np.float32)
            del buffer
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        one_round()
    print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
    """
)

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def rounds(mode: str, **environ: str) -> tuple[str, float]:
    """Whether the program set glibc's malloc, and its page faults per round."""
    env = {name: value for name, value in os.environ.items() if not tuned_by_user({name: value})} | environ
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    kept, faults = done.stdout.split()
    return kept, float(faults)


@glibc
def test_a_threads_freed_buffer_is_reused_rather_than_mapped_and_zeroed_afresh() -> None:
    kept, faults = rounds("keep")
    assert kept == "True"
    assert faults < 10  # the pages of the last round's buffer
    _, default = rounds("default")
    assert default >= 20  # glibc's default maps 40 MB afresh each time: this test measures what it should


@glibc
def test_the_users_malloc_settings_win() -> None:
    kept, faults = rounds("keep", MALLOC_ARENA_MAX="4")
    assert kept == "False"
    assert faults >= 20


@pytest.mark.parametrize(
    ("environ", "tuned"),
    [
        ({}, False),
        ({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.trim_threshold=0"}, True),
        ({"MALLOC_ARENA_MAX": "1"}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "4194304"}, True),
    ],
)
def test_tuned_by_user(environ: dict[str, str], tuned: bool) -> None:
    assert tuned_by_user(environ) is tuned
