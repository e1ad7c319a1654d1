"""Workers that dial out, over real processes on 127.0.0.1 (docs/protocol.md, "Dial-out workers").

One scenario, run once for the module: alice and bob dial out with their own
tokens, and an impostor dials out as alice with bob's token, all started
before the coordinator listens; the coordinator (in this process) trains
three rounds over the two dial-in workers and the session's connect-in
evaluator. Each test reads one side of what happened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, RUN_TIMEOUT, STARTUP_TIMEOUT, run, uris
from units import MS

from syncfed.config import DIAL_IN, CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult
from syncfed.net.spawn import WorkerProcess

TOKENS = {"alice": "a" * 32, "bob": "b" * 32}
#: Each attempt's wait is at most this: the workers knock several times before the coordinator listens.
REDIAL = "0.5"
POLL = 50 * MS


@dataclass
class Dialer:
    """``run_websocket_server.py --connect ...`` with its output in files."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from {self.process.args}: {self.err.read_text()[-2000:]}")
            time.sleep(POLL)


@dataclass
class Scenario:
    result: RunResult
    reports: list[str]
    dialers: dict[str, Dialer]
    uri: str


@contextlib.contextmanager
def dialing(folder: Path, uri: str, plan: dict[str, list[str]]) -> Iterator[dict[str, Dialer]]:
    """Start one dial-out worker per ``label: flags``; stop the ones still running on exit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    dialers: dict[str, Dialer] = {}
    try:
        for label, flags in plan.items():
            out, err = folder / f"{label}.out", folder / f"{label}.err"
            with out.open("wb") as stdout, err.open("wb") as stderr:
                command = [sys.executable, str(REPO / "run_websocket_server.py"), "--connect", uri, *flags]
                command += ["--threads", "1", "--redial-max-delay", REDIAL]
                process = subprocess.Popen(command, cwd=folder, stdout=stdout, stderr=stderr, env=env)
            dialers[label] = Dialer(process, out, err)
        yield dialers
    finally:
        for dialer in dialers.values():
            if dialer.process.poll() is None:
                dialer.process.terminate()
                dialer.process.wait(10_000 * MS)


@pytest.fixture(scope="module")
def scenario(digits_workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    folder = tmp_path_factory.mktemp("dial-out")
    for name, token in TOKENS.items():
        (folder / f"{name}.token").write_text(token)
    (folder / "tokens.txt").write_text("".join(f"{name} {name}.token\n" for name in TOKENS))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"ws://127.0.0.1:{port}"
    plan = {
        "alice": ["--id", "alice", "--auth-token-file", "alice.token"],
        "bob": ["--id", "bob", "--auth-token-file", "bob.token"],
        "impostor": ["--id", "alice", "--auth-token-file", "bob.token"],
    }
    with dialing(folder, uri, plan) as dialers:
        for dialer in dialers.values():  # loaded and knocking at a closed door
            dialer.wait_for("retrying with backoff", STARTUP_TIMEOUT)
        time.sleep(1_500 * MS)  # a few more refused attempts each, which must print nothing
        reports: list[str] = []
        config = CoordinatorConfig(
            workers={"alice": DIAL_IN, "bob": DIAL_IN},
            evaluator=uris(digits_workers, "testing"),
            listen=f"127.0.0.1:{port}",
            worker_tokens=folder / "tokens.txt",
            training_rounds=3,
            connect_timeout=30_000 * MS,
            request_timeout=60_000 * MS,
        )
        result = run(Coordinator(config, report=reports.append).run(), RUN_TIMEOUT)
        dialers["impostor"].process.wait(10_000 * MS)
        for name in TOKENS:  # the run's end is a lost connection to them: they dial again
            dialers[name].wait_for(f"{name}: connection lost", 10_000 * MS)
        yield Scenario(result, reports, dialers, uri)


def test_two_dial_out_workers_and_a_connect_in_evaluator_train_three_rounds(scenario: Scenario) -> None:
    assert [(record.round, record.workers) for record in scenario.result.rounds] == [
        (number, ("alice", "bob")) for number in (1, 2, 3)
    ]
    assert scenario.result.accuracy(3) > 0.4  # two of three sites' digits, three rounds
    assert f"Listening for dial-in workers on {scenario.uri}" in scenario.reports


def test_a_worker_claiming_another_id_is_refused_with_one_line_on_each_side(scenario: Scenario) -> None:
    impostor = scenario.dialers["impostor"]
    assert impostor.process.returncode == 10  # AuthenticationFailed: dialing again would not help
    errors = impostor.err.read_text().strip().splitlines()
    # It came in before alice (its token is bob's) or after her (alice is taken): refused either way.
    reasons = ("authentication failed: wrong token", "worker alice is already connected")
    assert len(errors) == 1 and any(
        errors[0] == f"run_websocket_server.py: error: alice: refused by the coordinator at {scenario.uri}: {why}"
        for why in reasons
    ), errors
    refusals = [line for line in scenario.reports if line.startswith("Refused")]
    assert len(refusals) == 1 and refusals[0].startswith("Refused a dial-in from 127.0.0.1:"), refusals
    assert refusals[0].endswith(reasons)


def test_a_worker_started_before_the_coordinator_says_each_change_of_state_once(scenario: Scenario) -> None:
    for name in TOKENS:
        states = [line for line in scenario.dialers[name].stdout().splitlines() if line.startswith(f"{name}: ")]
        assert [line.split(" (")[0].split(" to ")[0] for line in states[:3]] == [
            f"{name}: cannot reach {scenario.uri}",
            f"{name}: connected",
            f"{name}: connection lost",
        ], states
        assert states[1] == f"{name}: connected to {scenario.uri}"
        assert "retrying in" in states[2]
