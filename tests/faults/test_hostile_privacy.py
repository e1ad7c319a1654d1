"""Issue 14, item 8: under --secure-agg a run's outputs show totals only, and a worker may withhold its histogram.

A real coordinator (the command-line tool, as a subprocess) runs secure
rounds over real workers, one of them started with --withhold-histogram; its
metrics, logs, registry and TensorBoard events are then searched for any
per-worker example count, class histogram or loss.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, THREADS, run, running_workers
from units import MS

from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import Hello, Info, decode, encode
from syncfed.registry import ModelRegistry

TRAINERS = ("pia", "quinn", "ray")
WITHHOLDER = "quinn"
RUN_TIMEOUT = 240_000 * MS


@pytest.fixture(scope="module")
def private_workers() -> Iterator[dict[str, WorkerProcess]]:
    plan = [
        ("pia", [*THREADS, "--digits", "0-3"]),
        ("quinn", [*THREADS, "--digits", "4-6", "--withhold-histogram"]),
        ("ray", [*THREADS, "--digits", "7-9"]),
        ("judge", [*THREADS, "--testing"]),
    ]
    with running_workers(plan) as workers:
        yield workers


def trained_on(worker: WorkerProcess) -> int:
    """The examples a worker trains on, from the line it prints at start."""
    (count,) = (int(match[1]) for line in worker.output if (match := re.search(r"trains on (\d+)$", line)))
    return count


async def hello(worker: WorkerProcess) -> Info:
    client = WorkerLink(
        worker.worker_id, worker.uri, max_message_size=2**20, connect_timeout=10_000 * MS, ping_interval=None
    )
    await client.connect()
    try:
        info = await client.request(Hello(), timeout=10_000 * MS)
    finally:
        await client.close()
    assert isinstance(info, Info)
    return info


def test_a_withholding_worker_says_neither_its_histogram_nor_its_size(
    private_workers: dict[str, WorkerProcess],
) -> None:
    info = run(hello(private_workers[WITHHOLDER]))
    count = trained_on(private_workers[WITHHOLDER])
    assert info.histogram is None and info.validation_size == 1
    assert info.max_examples is not None and info.max_examples >= count > info.max_examples // 2
    assert info.max_examples & (info.max_examples - 1) == 0, "a power of two"
    assert decode(encode(1, info)).message == info
    assert "histogram" not in info.to_body()
    told = run(hello(private_workers["pia"]))
    assert told.histogram is not None and told.num_examples == trained_on(private_workers["pia"])


def test_a_secure_run_writes_and_logs_totals_only(private_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    metrics, board = tmp_path / "metrics.jsonl", tmp_path / "board"
    workers = ",".join(f"{name}={private_workers[name].uri}" for name in TRAINERS)
    done = subprocess.run(
        [
            sys.executable,
            "run_websocket_client.py",
            f"--workers={workers}",
            f"--evaluator=judge={private_workers['judge'].uri}",
            "--secure-agg",
            "--federated-eval",
            "--training-rounds=2",
            "--federate-after-n-batches=2",
            "--eval-every=1",
            f"--metrics-out={metrics}",
            f"--tensorboard={board}",
            "--no-progress",
            "--verbose",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {name: trained_on(private_workers[name]) for name in TRAINERS}
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [event for event in events if event["event"] == "round"]
    assert len(rounds) == 2
    for event in rounds:
        assert event["workers"] == list(TRAINERS), "the withholding worker trained in every round"
        assert "num_examples" not in event and "train_loss" not in event
        assert event["total_examples"] == sum(counts.values())
        assert isinstance(event["train_loss_mean"], float)
    sites = [event for event in events if event["event"] == "federated_eval"]
    assert sites and all(event["sites"] == {} and event["average"]["n"] > 0 for event in sites)
    # No per-worker figure anywhere in the metrics: no map keyed by worker holds a number.
    for event in events:
        for value in event.values():
            if isinstance(value, dict) and set(value) & set(TRAINERS):
                assert not any(isinstance(v, int | float) for v in value.values()), (event["event"], value)
    logs = done.stdout + done.stderr
    assert "examples of" not in logs and "(classes" not in logs and "Percentage numbers" not in logs
    assert not re.search(r"Site (pia|quinn|ray):", logs)
    assert not re.search(r"training loss .*\b(pia|quinn|ray) \d", logs)
    assert "training loss mean" in logs  # --verbose logged the round: the mean only
    registry = ModelRegistry(tmp_path / "registry", create=False)
    for version in registry.versions():
        text = json.dumps([version.metrics, version.settings, version.strategy, version.participants])
        assert "num_examples" not in text and "histogram" not in text
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (folder,) = {path.parent for path in board.rglob("events.out.tfevents.*")}
    accumulator = tensorboard.EventAccumulator(str(folder))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train_loss/mean" in tags
    assert not [tag for tag in tags if any(name in tag for name in TRAINERS)], tags


def test_the_status_table_shows_a_withheld_histogram(private_workers: dict[str, WorkerProcess]) -> None:
    workers = ",".join(f"{name}={private_workers[name].uri}" for name in TRAINERS)
    done = subprocess.run(
        [sys.executable, "run_websocket_client.py", f"--workers={workers}", "--evaluator=", "--status"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith(WITHHOLDER)]
    bound = run(hello(private_workers[WITHHOLDER])).max_examples
    assert f"at most {bound}" in row and "withheld" in row
