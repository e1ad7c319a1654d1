"""A worker started without --threads takes its share of the cores, and takes it again before each job."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from conftest import run, running_workers
from units import MS

from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.protocol import EvalResult, Evaluate, Hello
from syncfed.worker.cores import available_cores, count_workers, registered


def test_a_worker_without_threads_shares_the_cores_with_the_workers_it_can_see(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the spawned worker's registry: this test's alone
    registry = tmp_path / "syncfed-workers"
    cores = available_cores()
    with contextlib.ExitStack() as others:
        for _ in range(cores):  # as many other workers as cores: the share is one thread
            others.enter_context(registered(registry))
        with running_workers([("frank", ["--digits", "1,2"])]) as workers:
            frank = workers["frank"]
            assert count_workers(registry) == cores + 1
            started = f"frank runs torch with 1 thread, its share of {cores} cores among {cores + 1} syncfed workers"
            assert any(started in line for line in frank.output), list(frank.output)
            others.close()  # they stop: the next job takes more

            async def evaluate() -> object:
                async with WorkerLink("frank", frank.uri, max_message_size=2**26) as link:
                    await link.request(Hello())
                    return await link.request(Evaluate("digits-cnn", get_weights(DigitsCNN()), 64))

            assert isinstance(run(evaluate()), EvalResult)
            alone = f"its share of {cores} cores among 1 syncfed worker on this machine"
            deadline = time.monotonic() + 5_000 * MS
            while not any(alone in line for line in frank.output) and time.monotonic() < deadline:
                time.sleep(50 * MS)
            assert any(alone in line for line in frank.output), list(frank.output)
    assert count_workers(registry) == 0
