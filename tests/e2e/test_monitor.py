"""Watching a run: the progress display, TensorBoard files, the status table and the centralized baseline."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from units import MS

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator
from syncfed.monitor import Progress, TensorBoardWriter
from syncfed.net.spawn import WorkerProcess

CLIENT = str(REPO / "run_websocket_client.py")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so tqdm draws a bar into it."""

    def isatty(self) -> bool:
        return True


def round_event(number: int, seconds: float = 0.25) -> dict[str, object]:
    return {"event": "round", "round": number, "workers": ["alice"], "failed": {}, "seconds": seconds}


def test_progress_draws_a_bar_with_round_accuracy_and_seconds_on_a_terminal() -> None:
    stream = Terminal()
    progress = Progress(40, stream=stream)
    progress(round_event(1))
    progress({"event": "eval", "round": 1, "model": "federated", "accuracy": 0.1611})
    progress.report("Federated model: Average loss: 2.2803")
    progress(round_event(2, 0.5))
    progress.close()
    output = stream.getvalue()
    assert "2/40" in output
    assert "federated accuracy 16.11%" in output
    assert "0.50 s/round" in output
    assert "Federated model: Average loss: 2.2803" in output
    assert "Round 2/40 done" not in output


def test_progress_names_the_global_model_and_the_updates_of_each_asynchronous_version() -> None:
    stream = io.StringIO()
    progress = Progress(6, stream=stream, unit="version")
    progress({"event": "eval", "round": 1, "model": "centralized", "accuracy": 0.5})
    updates = [{"worker": "bob", "staleness": 1, "weight": 0.71, "loss": 1.2}, {"worker": "alice", "staleness": 0}]
    progress({**round_event(2), "mode": "async", "workers": ["bob", "alice"], "updates": updates, "discarded": 1})
    assert stream.getvalue().splitlines() == [
        "Version 2/6: bob (staleness 1), alice (staleness 0), 1 discarded as too stale;"
        " done in 0.25 s, last centralized accuracy 50.00%"
    ]


def test_progress_falls_back_to_plain_lines_off_a_terminal_or_when_disabled() -> None:
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        progress = Progress(3, enabled=enabled, stream=stream)
        progress(round_event(1))
        progress({"event": "eval", "round": 1, "model": "federated", "accuracy": 0.5})
        progress({**round_event(2), "failed": {"bob": "timeout"}})
        progress.close()
        assert stream.getvalue().splitlines() == [
            "Round 1/3 done in 0.25 s",
            "Round 2/3 done in 0.25 s, last federated accuracy 50.00%, dropped bob",
        ]


def test_tensorboard_files_hold_the_runs_scalars(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path / "tb")
    config = CoordinatorConfig(
        workers={name: digits_workers[name].uri for name in ("alice", "bob", "charlie")},
        evaluator={"testing": digits_workers["testing"].uri},
        training_rounds=2,
        eval_every=1,
    )
    result = asyncio.run(
        asyncio.wait_for(Coordinator(config, report=lambda _: None, listeners=[writer]).run(), 120_000 * MS)
    )
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"accuracy/federated", "loss/federated", "accuracy/alice", "train_loss/bob", "round/seconds"} <= tags
    accuracy = [(event.step, event.value) for event in events.Scalars("accuracy/federated")]
    assert [step for step, _ in accuracy] == [1, 2]
    for step, value in accuracy:
        assert abs(value - result.accuracy(step)) < 1e-6
    moved = [event.value for event in events.Scalars("round/bytes_moved")]
    # Each round sends the digits CNN (601,610 float32 parameters) to three workers and back.
    assert all(value > 6 * 601_610 * 4 for value in moved)


def test_status_table_lists_every_worker_and_exit_status(digits_workers: dict[str, WorkerProcess]) -> None:
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in ("alice", "bob"))
    completed = subprocess.run(
        [
            sys.executable,
            CLIENT,
            "--status",
            "--workers",
            workers,
            "--evaluator",
            f"testing={digits_workers['testing'].uri}",
        ],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].split() == ["id", "address", "status", "protocol", "dataset", "examples", "classes", "rtt", "ms"]
    alice = lines[1].split()
    assert alice[:7] == ["alice", digits_workers["alice"].uri, "reachable", "(trainer)", "1", "digits", "518"]
    assert alice[7:11] == ["0:127", "1:134", "2:128", "3:129"]
    assert float(alice[-1]) >= 0
    assert lines[3].split()[:4] == ["testing", digits_workers["testing"].uri, "reachable", "(evaluator)"]

    dead = subprocess.run(
        [
            sys.executable,
            CLIENT,
            "--status",
            "--workers",
            f"{workers},zed=ws://127.0.0.1:9",
            "--evaluator",
            "",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert dead.returncode == 5
    assert any(
        line.startswith("zed") and "unreachable: worker zed is unavailable" in line for line in dead.stdout.splitlines()
    )


def test_centralized_baseline_trains_one_worker_holding_all_training_data(tmp_path: Path) -> None:
    metrics = tmp_path / "central.jsonl"
    completed = subprocess.run(
        [
            sys.executable,
            CLIENT,
            "--spawn-workers",
            "--centralized",
            "--training-rounds",
            "3",
            "--eval-every",
            "1",
            "--metrics-out",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=180_000 * MS,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [event for event in events if event["event"] == "round"]
    assert [event["workers"] for event in rounds] == [["central"]] * 3
    assert all(event["num_examples"] == {"central": 1293} for event in rounds)
    # The one worker's model is the global one, named for what it is, and scored once.
    evaluated = [(event["round"], event["model"]) for event in events if event["event"] == "eval"]
    assert evaluated == [(r, "centralized") for r in (1, 2, 3)]
    final = next(event for event in events if event["event"] == "eval" and event["round"] == 3)
    lines = completed.stdout.splitlines()
    assert lines[-1] == f"Final centralized accuracy at round 3: {final['accuracy']:.2%}"
    assert "Round 3/3 done in " in completed.stdout and "last centralized accuracy" in completed.stdout
    assert sum(line.startswith("Centralized model: Average loss: ") for line in lines) == 3
    assert "ederated" not in completed.stdout and "Model update" not in completed.stdout


def test_centralized_needs_spawned_workers() -> None:
    completed = subprocess.run(
        [sys.executable, CLIENT, "--centralized"], capture_output=True, text=True, timeout=60_000 * MS
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "run_websocket_client.py: error: --centralized trains one spawned worker that holds all the training data:"
        " add --spawn-workers"
    )


def test_worker_args_reach_every_spawned_training_worker_and_name_one() -> None:
    workers = "alice=ws://localhost:1,bob=ws://localhost:2,charlie=ws://localhost:3,dave=ws://localhost:4"
    completed = subprocess.run(
        [
            *(sys.executable, CLIENT, "--spawn-workers", "--status", "--workers", workers),
            "--worker-args=--val-fraction 0.5 --min-group-size 3",
            *("--worker-args", "bob=--val-fraction 0", "--worker-args", "dave=--digits 0,5,9"),
        ],
        capture_output=True,
        text=True,
        timeout=180_000 * MS,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line.split() for line in completed.stdout.splitlines()[1:]]
    examples = {row[0]: int(row[row.index("digits") + 1]) for row in rows}  # id ... dataset examples ...
    # Half of each shard held out (576, 435 and 426 digits), the evaluator's test set untouched; bob's own
    # --val-fraction 0 wins over everyone's, and dave holds the digits named for him (0, 5 and 9), half held out.
    assert examples == {"alice": 288, "bob": 435, "charlie": 213, "dave": 215, "testing": 360}


def test_worker_args_are_checked_before_anything_starts() -> None:
    cases = (
        (["--worker-args", "--val-fraction 0.5"], "--worker-args only applies with --spawn-workers"),
        (["--spawn-workers", "--worker-args=--port 9000"], "--worker-args cannot set --port: --spawn-workers sets it"),
        (["--spawn-workers", "--worker-args=--data_dir=/x"], "--worker-args cannot set --data-dir: --spawn-workers"),
        (["--spawn-workers", "--worker-args=--slowdown '0.1"], '--worker-args "--slowdown \'0.1": No closing'),
        (
            ["--spawn-workers", "--workers", "alice=ws://localhost:1,dave=ws://localhost:2"],
            "worker id 'dave' has no default digits (only alice, bob, charlie do): give them with"
            " --worker-args dave='--digits 0,5,9' (or --shard K/N)",
        ),
    )
    # All at once: each spends its seconds importing torch before it refuses.
    processes = [
        subprocess.Popen(
            [sys.executable, CLIENT, "--status", *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arguments, _ in cases
    ]
    try:
        for process, (_, message) in zip(processes, cases, strict=True):
            _, stderr = process.communicate(timeout=60_000 * MS)
            assert process.returncode == 2
            assert stderr.startswith(f"run_websocket_client.py: error: {message}"), stderr
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
