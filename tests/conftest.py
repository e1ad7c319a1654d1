"""Shared fixtures: real worker processes on 127.0.0.1, and a tiny MNIST on disk.

Worker processes are started once per session with :func:`syncfed.net.spawn.spawn_workers`
inside an event loop that runs in a background thread: the loop keeps reading
the workers' output (so their pipes never fill) while each test runs its own
``asyncio.run``. Every wait is bounded, and the processes are stopped at the
end of the session whatever happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import struct
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from units import MS

from syncfed.config import CoordinatorConfig
from syncfed.datasets import load_dataset
from syncfed.models import DigitsCNN
from syncfed.net.spawn import WorkerProcess, spawn_workers

T = TypeVar("T")

#: The tests folder, where user_models.py lives, and the repository root above it.
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: Seconds a set of workers may take to start (importing torch on a busy 2-core machine).
STARTUP_TIMEOUT = 60_000 * MS
#: Seconds the workers may take to stop.
SHUTDOWN_TIMEOUT = 30_000 * MS

#: The message size limit of the fault-test worker: above one digits-cnn fit
#: request (about 2.4 MB), so it can train, and small enough to exceed cheaply.
FAULT_LIMIT = 3 * 2**20

#: Every spawned worker trains with one thread: two cores, five processes.
THREADS = ["--threads", "1"]

DIGITS_PLAN: list[tuple[str, list[str]]] = [
    ("alice", THREADS),
    ("bob", THREADS),
    ("charlie", THREADS),
    ("testing", [*THREADS, "--testing"]),
    # The fault tests' worker: its own classes, a small size limit.
    ("dave", [*THREADS, "--digits", "0,5,9", "--max-message-size", str(FAULT_LIMIT)]),
]

#: The session's training workers, and the seconds one coordinator run may take.
TRAINERS = ("alice", "bob", "charlie")
RUN_TIMEOUT = 120_000 * MS

#: Sizes of the tiny MNIST written for the tests.
MNIST_TRAIN, MNIST_TEST = 60, 20


class _LoopThread:
    """An event loop running in a daemon thread; coroutines are submitted with a deadline."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worker-pool", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10_000 * MS)
        if not self.thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def running_workers(plan: Sequence[tuple[str, Sequence[str]]]) -> Iterator[dict[str, WorkerProcess]]:
    """Start the planned workers and stop them on exit, all within bounded waits."""
    pool = _LoopThread()
    spawner = spawn_workers(plan, startup_timeout=STARTUP_TIMEOUT)
    try:
        workers = pool.run(spawner.__aenter__(), STARTUP_TIMEOUT + 30_000 * MS)
        try:
            yield workers
        finally:
            try:
                pool.run(spawner.__aexit__(None, None, None), SHUTDOWN_TIMEOUT)
            finally:
                for worker in workers.values():  # last resort when the orderly stop failed
                    if worker.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            worker.process.kill()
    finally:
        pool.close()


@pytest.fixture(scope="session")
def digits_workers() -> Iterator[dict[str, WorkerProcess]]:
    """alice (0-3), bob (4-6), charlie (7-9), the evaluator testing, and dave for fault tests."""
    with running_workers(DIGITS_PLAN) as workers:
        yield workers


def independent_score(weights: dict[str, np.ndarray], batch_size: int = 128) -> tuple[int, int]:
    """Correct predictions of ``weights`` on the digits test split and its size, computed here with plain
    torch (not by a worker, nor by syncfed's evaluation code), as the reference for what was reported."""
    data = load_dataset("digits", "test", ".")
    model = DigitsCNN()
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in weights.items()})
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.labels), batch_size):
            images = torch.from_numpy(data.images[start : start + batch_size])
            predicted = model(images).argmax(dim=1).numpy()
            correct += int(np.sum(predicted == data.labels[start : start + batch_size]))
    return correct, len(data.labels)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_tiny_mnist(data_dir: Path, *, seed: int = 0) -> Path:
    """A tiny MNIST in torchvision's layout: training files plain, test files gzipped."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count, suffix in (("train", MNIST_TRAIN, ""), ("t10k", MNIST_TEST, ".gz")):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, 28, 28))
        for index, label in enumerate(labels):  # a bright bar whose row says the label
            images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return data_dir


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding a tiny MNIST (60 training and 20 test images of 28x28)."""
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def mnist_worker(mnist_dir: Path) -> Iterator[WorkerProcess]:
    """A training worker alice that holds the tiny MNIST instead of digits."""
    arguments = [*THREADS, "--dataset", "mnist", "--data-dir", str(mnist_dir), "--no-download"]
    with running_workers([("alice", arguments)]) as workers:
        yield workers["alice"]


@pytest.fixture
def disposable_worker() -> Iterator[WorkerProcess]:
    """A training worker erin of this test's own, for tests that kill it."""
    with running_workers([("erin", [*THREADS, "--digits", "1,2"])]) as workers:
        yield workers["erin"]


# Helpers of coordinator runs over the session's workers ------------------------------


def run(coroutine: Coroutine[Any, Any, T], timeout: float = RUN_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


def uris(workers: dict[str, WorkerProcess], *names: str) -> dict[str, str]:
    return {name: workers[name].uri for name in names}


def config(workers: dict[str, WorkerProcess], *, evaluator: bool = True, **settings: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers=uris(workers, *TRAINERS),
        evaluator=uris(workers, "testing") if evaluator else {},
        connect_timeout=10_000 * MS,
        request_timeout=60_000 * MS,
        **settings,
    )


def assert_same_weights(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
