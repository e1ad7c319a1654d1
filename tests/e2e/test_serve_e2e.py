"""``python -m syncfed serve`` over real processes on 127.0.0.1: a 40-round job survives a SIGKILL of the service.

Three dial-out trainers and a dial-out evaluator, each with its own token,
join a service started with two queued jobs: the demo's 40-round digits job
and a 3-round one on the same workers, which waits. The service is killed
mid-job and started again with the same config: the workers dial back by
themselves, the job resumes from its checkpoint, every round is once in its
metrics file, and its final accuracy is the classic demo's (a resumed run
recomputes the round cut off as the uninterrupted run did); then the second
job runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, STARTUP_TIMEOUT
from test_dial_out_e2e import dialing
from units import MS

from syncfed.coordinator.job_store import JobStore
from syncfed.service_api import JobRecord

IDS = ("alice", "bob", "charlie", "testing")
JOB_TIMEOUT = 300_000 * MS
POLL = 100 * MS


def demo_accuracy() -> str:
    """The classic demo's final accuracy at round 40, as the README shows it."""
    found = re.search(r"Final federated accuracy at round 40: (\d+\.\d+)%", (REPO / "README.md").read_text())
    assert found is not None
    return found.group(1)


def start_service(folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = (folder / "serve.out").open("ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "syncfed", "serve", "--config", "server.toml", *extra]
    return subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


def rounds_done(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    return [json.loads(line)["round"] for line in lines if '"event": "round"' in line]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, JobRecord]]]:
    folder = tmp_path_factory.mktemp("serve")
    for name in IDS:
        (folder / f"{name}.token").write_text(name[0] * 32)
    (folder / "tokens.txt").write_text("".join(f"{name} {name}.token\n" for name in IDS))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (folder / "server.toml").write_text(
        f'listen = "127.0.0.1:{port}"\nstate = "state"\nworkers = {list(IDS)!r}\nworker-tokens = "tokens.txt"\n'
    )
    (folder / "demo.toml").write_text('name = "demo"\nworkers = ["alice", "bob", "charlie"]\nevaluator = "testing"\n')
    (folder / "short.toml").write_text(
        'name = "short"\nworkers = ["alice", "bob", "charlie"]\nevaluator = "testing"\ntraining-rounds = 3\n'
    )
    metrics = folder / "state" / "jobs" / "1" / "metrics.jsonl"
    plan = {name: ["--id", name, "--auth-token-file", f"{name}.token"] for name in IDS}
    service = start_service(folder, "--queue", "demo.toml", "--queue", "short.toml")
    try:
        with dialing(folder, f"ws://127.0.0.1:{port}", plan) as dialers:
            wait_for(lambda: len(rounds_done(metrics)) >= 12, JOB_TIMEOUT, "round 12 of the first job")
            service.send_signal(signal.SIGKILL)
            service.wait(10_000 * MS)
            for name, dialer in dialers.items():  # each notices, and dials again by itself
                dialer.wait_for(f"{name}: connection lost", 10_000 * MS)
            service = start_service(folder)
            store = JobStore(folder / "state")

            def both_finished() -> bool:
                return all(record["state"] in ("done", "failed", "aborted") for record in store.all())

            wait_for(both_finished, JOB_TIMEOUT, "both jobs to finish")
            outputs = {name: dialer.stdout() for name, dialer in dialers.items()}
        (folder / "dialers.json").write_text(json.dumps(outputs))
        yield folder, {record["name"]: record for record in store.all()}
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(STARTUP_TIMEOUT)


def test_a_killed_service_resumes_the_demo_job_to_the_demo_accuracy(served: tuple[Path, dict[str, JobRecord]]) -> None:
    folder, jobs = served
    demo = jobs["demo"]
    assert demo["state"] == "done", (demo, (folder / "serve.out").read_text()[-3000:])
    assert (demo["round"], demo["rounds"], demo["submitted_by"]) == (40, 40, "serve --queue")
    assert rounds_done(folder / "state" / "jobs" / "1" / "metrics.jsonl") == list(range(1, 41))
    assert demo["result"] is not None and f"{demo['result']['accuracy']:.2%}" == f"{demo_accuracy()}%"
    log = (folder / "state" / "jobs" / "1" / "log.txt").read_text()
    assert "The service restarted: the job resumes from its checkpoint" in log
    assert re.search(r"Resuming after round (1[2-9]|[2-3]\d) from ", log), log


def test_the_workers_dial_back_by_themselves_and_the_second_job_runs_after(
    served: tuple[Path, dict[str, JobRecord]],
) -> None:
    folder, jobs = served
    outputs = json.loads((folder / "dialers.json").read_text())
    for name in IDS:
        connected = [line for line in outputs[name].splitlines() if line.startswith(f"{name}: connected to ")]
        assert len(connected) == 2, outputs[name]  # once per start of the service: kept across both jobs
    short = jobs["short"]
    assert short["state"] == "done" and short["round"] == 3, short
    assert short["started_at"] is not None and jobs["demo"]["finished_at"] is not None
    assert short["started_at"] >= jobs["demo"]["finished_at"]
    assert "Job 1 (demo) resumes on alice, bob, charlie, testing" in (folder / "serve.out").read_text()
