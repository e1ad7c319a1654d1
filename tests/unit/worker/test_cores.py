"""A worker's share of the cores: the rule, the host's registry of live workers, and torch's threads per thread."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from syncfed.worker.compute import CoreShare
from syncfed.worker.cores import count_workers, fair_threads, registered, registry_dir

T = TypeVar("T")


@pytest.mark.parametrize(
    ("cores", "workers", "ceiling", "threads"),
    [
        (2, 4, 2, 1),  # the README's walk-through on two cores: one thread each, never zero
        (8, 2, 8, 4),
        (8, 3, 8, 2),  # rounded down: 3 x 2 <= 8
        (16, 1, 8, 8),  # alone: torch's own default, not more
        (4, 0, 4, 4),  # nobody registered (an embedded worker): counted as one
    ],
)
def test_a_worker_takes_its_share_of_the_cores(cores: int, workers: int, ceiling: int, threads: int) -> None:
    assert fair_threads(cores, workers, ceiling) == threads


def test_registered_workers_are_counted_while_they_run(tmp_path: Path) -> None:
    assert count_workers(tmp_path / "none yet") == 0
    with registered(tmp_path):
        assert count_workers(tmp_path) == 1
        with registered(tmp_path):
            assert count_workers(tmp_path) == 2
        assert count_workers(tmp_path) == 1
    assert count_workers(tmp_path) == 0
    assert not list(tmp_path.iterdir())


def test_a_dead_workers_file_is_not_counted_and_is_removed(tmp_path: Path) -> None:
    """Its lock went with its process (killed, no clean-up): an unlocked file is stale, whatever its pid."""
    stale = tmp_path / "1.worker"
    stale.write_text("")
    with registered(tmp_path):
        assert count_workers(tmp_path) == 1
    assert not stale.exists()


def test_a_registry_that_cannot_be_written_leaves_the_worker_serving_uncounted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = tmp_path / "a file, not a folder"
    taken.write_text("")
    with caplog.at_level(logging.WARNING, logger="syncfed.worker"), registered(taken):
        assert count_workers(taken) == 0
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [f"cannot register in {taken}"]


def test_the_registry_is_under_the_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert registry_dir() == tmp_path / "syncfed-workers"


def in_thread(work: Callable[[], T]) -> T:
    """``work()`` in a fresh thread, with torch's threads as they were afterwards: torch keeps them per thread."""
    results: list[T] = []
    before = torch.get_num_threads()

    def target() -> None:
        try:
            results.append(work())
        finally:
            torch.set_num_threads(before)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return results[0]


def test_the_share_shrinks_when_workers_start_and_applies_to_the_calling_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    share = CoreShare("alice", directory=tmp_path, cores=4)
    share.ceiling = 4  # as on a four-core machine, whatever this one has

    def apply() -> tuple[int, int]:
        return share.apply(), torch.get_num_threads()

    with caplog.at_level(logging.INFO, logger="syncfed.worker"), contextlib.ExitStack() as workers:
        workers.enter_context(registered(tmp_path))
        assert in_thread(apply) == (4, 4)
        for _ in range(3):
            workers.enter_context(registered(tmp_path))
        assert in_thread(apply) == (1, 1)
    assert [record.getMessage() for record in caplog.records] == [
        "alice runs torch with 4 threads, its share of 4 cores among 1 syncfed worker on this machine"
        " (--threads fixes the count)",
        "alice runs torch with 1 thread, its share of 4 cores among 4 syncfed workers on this machine"
        " (--threads fixes the count)",
    ]
