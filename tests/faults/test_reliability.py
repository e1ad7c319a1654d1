"""Reliability: slow, frozen, dying and returning workers, a crashed coordinator, floods.

Every scenario runs against real worker processes on 127.0.0.1, started here
on fixed ports (found by binding port 0) so that a killed worker can be
restarted at the same address. The coordinator runs either in-process, in a
thread of its own so that the test can kill, freeze and restart workers
meanwhile, or as the command-line tool in a subprocess that the test kills.
Every wait has a deadline, every process started here is stopped in a
``finally``, and the measured figures are printed (run pytest with ``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
from conftest import REPO, RUN_TIMEOUT, run
from safetensors.numpy import load_file
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from syncfed.checkpoint import CHECKPOINT_FILE, Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult, _Backoff
from syncfed.exceptions import CheckpointError
from syncfed.models import DigitsCNN, get_weights
from syncfed.protocol import Envelope, Error, Hello, Info, Ping, Pong, decode, encode

T = TypeVar("T")

CLIENT = "run_websocket_client.py"

# Durations, in seconds.
STARTUP_TIMEOUT = 90_000 * MS  # a set of workers importing torch on a busy 2-core machine
STOP_TIMEOUT = 10_000 * MS
CLI_TIMEOUT = 120_000 * MS  # one command-line run
POLL = 5 * MS  # how often files and processes are looked at
PING_TIMEOUT = 3.0  # the coordinator's default --ping-timeout
ROUND_TIMEOUT = 60.0  # far above every round here: nothing may be dropped by the deadline

#: Each fast worker sleeps this long per training batch (10 per round), so a
#: round takes a few tenths of a second: long enough to hit it in its middle.
FAST_DELAY = 0.03
#: The slow site: 10 batches of this make a round longer than the ping timeout.
SLOW_DELAY = 0.4

TRAINERS = ("alice", "bob", "charlie")
MiB = 2**20

#: What the tests measured, printed at the end of the module: scenario -> figures.
FIGURES: dict[str, dict[str, Any]] = {}


def record(scenario: str, **figures: Any) -> None:
    FIGURES.setdefault(scenario, {}).update(figures)
    shown = ", ".join(f"{name}={_show(value)}" for name, value in figures.items())
    print(f"\n[figures] {scenario}: {shown}", flush=True)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{item:.2f}" for item in value) + "]"
    return str(value)


@pytest.fixture(scope="module", autouse=True)
def figures_table() -> Iterator[None]:
    yield
    print("\n\n==== reliability figures ====")
    for scenario, figures in FIGURES.items():
        print(f"{scenario}:")
        for name, value in figures.items():
            print(f"    {name}: {_show(value)}")


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- Worker processes on fixed ports --------------------------------------------------------


class Site:
    """One worker process on a fixed port of 127.0.0.1, which can be killed, frozen and restarted.

    Its output goes to a log file (so no pipe can fill up); the ready line
    is looked for there.
    """

    def __init__(self, name: str, arguments: list[str], log_dir: Path) -> None:
        self.name = name
        self.arguments = arguments
        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        """Start the process; :meth:`wait_ready` waits until it serves."""
        assert not self.alive, f"{self.name} is already running"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "syncfed.cli.worker", "--id", self.name, "--host", "127.0.0.1"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), "--threads", "1", *self.arguments],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.starts += 1

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        ready = f"syncfed worker {self.name} listening on {self.uri}"

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            return self.log.read_text(errors="replace").count(ready) >= self.starts

        wait_until(serving, timeout, f"{self.name} to serve on {self.uri}")

    def start(self, timeout: float = STARTUP_TIMEOUT) -> float:
        """Start and wait until it serves; return the seconds that took."""
        started = time.monotonic()
        self.launch()
        self.wait_ready(timeout)
        return time.monotonic() - started

    def tail(self, lines: int = 15) -> str:
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, number: int) -> None:
        assert self.process is not None and self.alive, f"{self.name} is not running"
        self.process.send_signal(number)

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its port is free again)."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop the process whatever its state (even frozen); idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def status(self, key: str) -> str:
        """A field of /proc/<pid>/status, e.g. VmRSS or State."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return value.strip()
        raise KeyError(key)

    def rss_mib(self) -> float:
        value, unit = self.status("VmRSS").split()
        assert unit == "kB"
        return int(value) / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def healthy(self) -> None:
        """Running and not frozen: continue a stopped process, restart a dead one."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGCONT)
        else:
            self.start()


@dataclass
class Cluster:
    sites: dict[str, Site]

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def uris(self, *names: str) -> dict[str, str]:
        return {name: self.sites[name].uri for name in names}

    def workers_flag(self, *names: str) -> str:
        return ",".join(f"{name}={self.sites[name].uri}" for name in names)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """alice (0-3), bob (4-6) and charlie (7-9), a little slow per batch; dan (4-6), slower
    than the ping timeout per round; erin (1, 2), which admits at most 3 connections."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    fast = ["--batch-delay", str(FAST_DELAY)]
    plan = {
        "alice": fast,
        "bob": fast,
        "charlie": fast,
        "dan": ["--digits", "4-6", "--batch-delay", str(SLOW_DELAY)],
        "erin": ["--digits", "1,2", "--max-connections", "3"],
    }
    sites = {name: Site(name, arguments, log_dir) for name, arguments in plan.items()}
    try:
        started = time.monotonic()
        for site in sites.values():  # at once: importing torch dominates
            site.launch()
        for site in sites.values():
            site.wait_ready(STARTUP_TIMEOUT - (time.monotonic() - started))
        record("startup", five_workers_s=time.monotonic() - started)
        # Warm up: a worker's first fit is several times slower than the next ones.
        warm = CoordinatorConfig(workers=Cluster(sites).uris(*TRAINERS), evaluator={}, training_rounds=1, **FAST)
        run(Coordinator(warm, report=lambda line: None).run())
        yield Cluster(sites)
    finally:
        for site in sites.values():
            site.stop()


@pytest.fixture
def trio(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with alice, bob and charlie running and not frozen, before and after the test."""
    for name in TRAINERS:
        cluster[name].healthy()
    try:
        yield cluster
    finally:
        for name in TRAINERS:
            cluster[name].healthy()


#: Coordinator settings every scenario here shares: short connect timeout, a
#: round deadline far above what any round takes, no evaluator.
FAST: dict[str, Any] = {"connect_timeout": 10_000 * MS, "round_timeout": ROUND_TIMEOUT}


# -- Watching a run ------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # time.monotonic() when the test saw it
    data: dict[str, Any]


class Metrics:
    """Follows a metrics file as it grows, stamping each complete line with when it was seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Event] = []
        self._offset = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        now = time.monotonic()
        self.events.extend(Event(now, json.loads(line)) for line in complete.splitlines() if line.strip())

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> Event:
        def found() -> Event | None:
            self.poll()
            return next((event for event in self.events if predicate(event.data)), None)

        event = wait_until(found, timeout, what)
        assert event is not None
        return event

    def wait_round(self, number: int, timeout: float = RUN_TIMEOUT) -> Event:
        return self.wait_for(lambda data: is_round(data, number), timeout, f"round {number} in {self.path}")


def is_round(data: dict[str, Any], number: int | None = None) -> bool:
    return data.get("event") == "round" and (number is None or data.get("round") == number)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def round_lines(path: Path) -> list[dict[str, Any]]:
    return [line for line in read_metrics(path) if is_round(line)]


class Background:
    """A coordinator run in a thread of its own, so the test can meddle with workers meanwhile."""

    def __init__(self, config: CoordinatorConfig, timeout: float = RUN_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        self.report: list[tuple[float, str]] = []
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.started = 0.0
        self._thread = threading.Thread(target=self._main, name="coordinator", daemon=True)

    def _main(self) -> None:
        try:
            coordinator = Coordinator(self.config, report=lambda line: self.report.append((time.monotonic(), line)))
            self.result = run(coordinator.run(), self.timeout)
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def __enter__(self) -> Background:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The run is bounded by its own timeout; wait for it so it never outlives the test.
        self._thread.join(self.timeout + 30_000 * MS)

    def join(self) -> RunResult:
        self._thread.join(self.timeout + 30_000 * MS)
        assert not self._thread.is_alive(), "the coordinator did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def reported(self, pattern: str) -> list[tuple[float, str]]:
        return [(at, line) for at, line in list(self.report) if re.search(pattern, line)]


def round_config(cluster: Cluster, tmp_path: Path, **settings: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers=cluster.uris(*TRAINERS),
        evaluator={},
        metrics_out=tmp_path / "metrics.jsonl",
        **{**FAST, **settings},
    )


# -- Unit level: the reconnection backoff and checkpoints -----------------------------------


def test_backoff_retries_at_once_then_doubles_from_half_a_second_up_to_the_cap() -> None:
    backoff = _Backoff()
    assert backoff.due(0.0)
    delays = []
    now = 100.0
    for _ in range(8):
        backoff.failed(now, cap=5.0)
        delays.append(backoff.retry_at - now)
        assert not backoff.due(now) or delays[-1] == 0
        assert backoff.due(backoff.retry_at)
        assert not backoff.due(backoff.retry_at - 0.01) or delays[-1] == 0
        now += 1.0
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff.failures == 8
    capped = _Backoff()
    for _ in range(40):  # 0.5 * 2 ** 38 would be years without the cap
        capped.failed(0.0, cap=30.0)
    assert capped.retry_at == 30.0


def checkpoint_of(round_number: int, **identity: Any) -> Checkpoint:
    weights = get_weights(DigitsCNN())
    return Checkpoint(
        round=round_number,
        weights=weights,
        identity={"model": "digits-cnn", "dataset": "digits", "workers": ["alice", "bob"], "evaluator": [], **identity},
        seed=7,
        config={"lr": 0.1, "checkpoint_dir": "/somewhere"},
        metrics_size=1234,
    )


def test_checkpoint_round_trip_and_resumability(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none") is None
    saved = checkpoint_of(3)
    path = save_checkpoint(tmp_path / "run", saved)
    assert path == tmp_path / "run" / CHECKPOINT_FILE
    assert sorted(os.listdir(tmp_path / "run")) == [CHECKPOINT_FILE], "a partial file was left behind"
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded is not None
    assert (loaded.round, loaded.seed, loaded.identity, loaded.config, loaded.metrics_size) == (
        3,
        7,
        saved.identity,
        saved.config,
        1234,
    )
    assert list(loaded.weights) == list(saved.weights)  # order kept
    for name, array in saved.weights.items():
        assert loaded.weights[name].dtype == array.dtype and np.array_equal(loaded.weights[name], array), name
    check_resumable(loaded, dict(saved.identity))  # same run: fine
    check_resumable(loaded, {**saved.identity, "unrelated": 1})  # only the identity fields count

    # A later round replaces the file whole.
    save_checkpoint(tmp_path / "run", checkpoint_of(4))
    again = load_checkpoint(tmp_path / "run")
    assert again is not None and again.round == 4

    with pytest.raises(CheckpointError) as changed:
        check_resumable(loaded, {**saved.identity, "workers": ["alice", "bob", "charlie"]})
    assert str(changed.value) == (
        "cannot resume: the run's configuration changed"
        " (workers was ['alice', 'bob'], now ['alice', 'bob', 'charlie']);"
        " use another --checkpoint-dir to start a new run"
    )
    with pytest.raises(CheckpointError) as two:
        check_resumable(loaded, {**saved.identity, "model": "mnist-cnn", "dataset": "mnist"})
    assert "model was 'digits-cnn', now 'mnist-cnn'; dataset was 'digits', now 'mnist'" in str(two.value)
    # Another named data set of the same kind is another run too; a checkpoint without the field
    # (written before it existed) reads as the default, None.
    assert "dataset_key" not in saved.identity
    with pytest.raises(CheckpointError, match=r"\(dataset_key was None, now 'digits-b'\)"):
        check_resumable(loaded, {**saved.identity, "dataset_key": "digits-b"})
    check_resumable(loaded, {**saved.identity, "dataset_key": None})


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"\x00" * 8 + data[8:], id="zeroed-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: os.urandom(len(data)), id="random"),
    ],
)
def test_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    path = save_checkpoint(tmp_path, checkpoint_of(2))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path)
    assert str(raised.value).startswith(f"cannot read checkpoint {path}: ")
    assert "\n" not in str(raised.value)


def test_a_checkpoint_without_syncfed_metadata_or_of_another_format_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / CHECKPOINT_FILE
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(tmp_path)
    assert str(missing.value) == f"{path} is a safetensors file but not a syncfed checkpoint"
    state = {"format": 99, "round": 1, "identity": {}, "seed": 1, "order": ["w"]}
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path), metadata={"syncfed": json.dumps(state)})
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path)
    assert str(raised.value) == f"{path} has checkpoint format 99, expected 1"


# -- A slow worker is waited for ------------------------------------------------------------


def test_a_slow_worker_that_answers_pings_is_waited_for_not_dropped(cluster: Cluster, tmp_path: Path) -> None:
    """dan needs longer per round than the ping timeout; it is neither frozen nor late for the deadline."""
    config = CoordinatorConfig(
        workers=cluster.uris("alice", "dan"),
        evaluator={},
        training_rounds=2,
        metrics_out=tmp_path / "metrics.jsonl",
        ping_timeout=PING_TIMEOUT,
        **FAST,
    )
    report: list[str] = []
    result = run(Coordinator(config, report=report.append).run())
    rounds = round_lines(tmp_path / "metrics.jsonl")
    assert [line["round"] for line in rounds] == [1, 2]
    for line in rounds:
        assert line["workers"] == ["alice", "dan"], line
        assert line["failed"] == {}, line
        assert PING_TIMEOUT < line["seconds"] < ROUND_TIMEOUT, line
    assert [record.workers for record in result.rounds] == [("alice", "dan")] * 2
    assert not [line for line in report if "dropped" in line or "rejoined" in line], report
    record(
        "slow worker (batch delay 0.4 s, ping timeout 3 s)",
        outcome="waited for, never dropped",
        rounds_completed=len(rounds),
        round_seconds=[line["seconds"] for line in rounds],
    )


# -- A worker killed mid-round, then restarted on its port ----------------------------------

KILL_ROUND = 4


@dataclass
class KillRun:
    rounds: list[dict[str, Any]]
    result: RunResult
    report: list[tuple[float, str]]
    killed_at: float
    kill_round_seen_at: float
    restarted_in: float
    restarted_at: float
    training_rounds: int
    round_timeout: float


@pytest.fixture(scope="module")
def killed_and_restarted(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> KillRun:
    """bob gets SIGKILL in the middle of round 4 and is started again on the same port at once."""
    for name in TRAINERS:
        cluster[name].healthy()
    tmp_path = tmp_path_factory.mktemp("kill")
    rounds = 40
    config = round_config(cluster, tmp_path, training_rounds=rounds, min_workers=2, reconnect_max_delay=1.0)
    metrics = Metrics(tmp_path / "metrics.jsonl")
    bob = cluster["bob"]
    try:
        with Background(config) as background:
            metrics.wait_round(KILL_ROUND - 1)
            time.sleep(100 * MS)  # into round 4's training (each round takes a few tenths of a second)
            killed_at = time.monotonic()
            bob.kill()
            seen = metrics.wait_for(lambda data: is_round(data) and "bob" in data["failed"], 30_000 * MS, "bob dropped")
            restarted_at = time.monotonic()
            restarted_in = bob.start()
            result = background.join()
    finally:
        bob.healthy()
    return KillRun(
        round_lines(tmp_path / "metrics.jsonl"),
        result,
        background.report,
        killed_at,
        seen.at,
        restarted_in,
        restarted_at,
        rounds,
        config.round_timeout,
    )


def test_a_worker_killed_mid_round_is_dropped_and_the_round_completes(killed_and_restarted: KillRun) -> None:
    run_ = killed_and_restarted
    by_round = {line["round"]: line for line in run_.rounds}
    assert sorted(by_round) == list(range(1, run_.training_rounds + 1)), "each round exactly once, to the last"
    assert len(run_.rounds) == run_.training_rounds
    for number in range(1, KILL_ROUND):
        assert by_round[number]["workers"] == list(TRAINERS) and by_round[number]["failed"] == {}
    killed = by_round[KILL_ROUND]
    assert killed["workers"] == ["alice", "charlie"], killed
    assert list(killed["failed"]) == ["bob"]
    assert re.fullmatch(r"connection lost \(.+\)", killed["failed"]["bob"]), killed["failed"]
    detection = run_.kill_round_seen_at - run_.killed_at
    assert detection < 5.0, "a dead worker's connection closes at once: the round must not wait for it"
    assert killed["seconds"] < run_.round_timeout / 10
    # Every round aggregated at least the quorum of 2.
    assert all(len(line["workers"]) >= 2 for line in run_.rounds)
    assert [record.round for record in run_.result.rounds] == list(range(1, run_.training_rounds + 1))
    dropped = [line for _, line in run_.report if line.startswith(f"Round {KILL_ROUND}: aggregated")]
    assert dropped and dropped[0].startswith(
        f"Round {KILL_ROUND}: aggregated 2 of 3 workers; dropped bob (connection lost"
    )
    record(
        "SIGKILL of bob mid-round (min_workers=2)",
        outcome=f"round {KILL_ROUND} aggregated alice+charlie, bob in failed: {killed['failed']['bob']}",
        kill_round_done_after_kill_s=detection,
        kill_round_seconds=killed["seconds"],
        rounds_completed=len(run_.rounds),
    )


def test_a_restarted_worker_rejoins_and_contributes_again(killed_and_restarted: KillRun) -> None:
    run_ = killed_and_restarted
    rejoined = [(at, line) for at, line in run_.report if line == "Worker bob rejoined"]
    assert len(rejoined) == 1, run_.report
    back = [line["round"] for line in run_.rounds if line["round"] > KILL_ROUND and "bob" in line["workers"]]
    assert back, "bob never contributed after its restart"
    first_back = back[0]
    # Once back, bob contributes to every later round; before, it is listed as failed, never silently missing.
    assert back == list(range(first_back, run_.training_rounds + 1))
    for line in run_.rounds:
        if KILL_ROUND < line["round"] < first_back:
            assert line["workers"] == ["alice", "charlie"]
            assert line["failed"]["bob"].startswith("not connected (connection lost"), line
        assert sorted([*line["workers"], *line["failed"]]) == sorted(TRAINERS), line
    rejoin_delay = rejoined[0][0] - (run_.restarted_at + run_.restarted_in)
    # Backoff capped at 1 s, plus at most a round in progress.
    assert rejoin_delay < 5.0
    record(
        "bob restarted on the same port",
        outcome=f"rejoined, contributes from round {first_back} of {run_.training_rounds}",
        restart_to_serving_s=run_.restarted_in,
        serving_to_rejoined_s=rejoin_delay,
        rounds_without_bob=first_back - KILL_ROUND,
    )


# -- A frozen worker -----------------------------------------------------------------------


def test_a_frozen_worker_is_dropped_by_liveness_and_rejoins_after_sigcont(trio: Cluster, tmp_path: Path) -> None:
    freeze_round, total = 3, 12
    config = round_config(trio, tmp_path, training_rounds=total, min_workers=2, reconnect_max_delay=1.0)
    assert config.round_timeout == ROUND_TIMEOUT and config.ping_timeout == PING_TIMEOUT
    join_grace = min(config.connect_timeout, PING_TIMEOUT)  # what a round start waits for a reconnecting worker
    metrics = Metrics(tmp_path / "metrics.jsonl")
    bob = trio["bob"]
    try:
        with Background(config) as background:
            metrics.wait_round(freeze_round - 1)
            time.sleep(100 * MS)  # into round 3's training
            frozen_at = time.monotonic()
            bob.signal(signal.SIGSTOP)
            wait_until(lambda: bob.status("State").startswith("T"), 5000 * MS, "bob to stop")
            dropped = metrics.wait_for(
                lambda data: is_round(data) and "bob" in data["failed"], 30_000 * MS, "bob dropped"
            )
            detection = dropped.at - frozen_at
            # Still frozen past the next round's wait for reconnecting workers.
            time.sleep(join_grace + 1000 * MS)
            continued_at = time.monotonic()
            bob.signal(signal.SIGCONT)
            result = background.join()
    finally:
        bob.healthy()
    rounds = round_lines(tmp_path / "metrics.jsonl")
    by_round = {line["round"]: line for line in rounds}
    assert sorted(by_round) == list(range(1, total + 1)) and len(rounds) == total
    line = by_round[freeze_round]
    assert dropped.data == line
    assert line["workers"] == ["alice", "charlie"]
    assert line["failed"] == {"bob": "no answer to pings for 3 s (frozen or gone)"}
    # Liveness, not the 60 s deadline, dropped it: a ping every 1 s, the pong 3 s late.
    assert PING_TIMEOUT < detection < 10.0, detection
    assert line["seconds"] < 10.0
    back = [line["round"] for line in rounds if line["round"] > freeze_round and "bob" in line["workers"]]
    assert back and back == list(range(back[0], total + 1)), "bob did not contribute again after SIGCONT"
    rejoined = background.reported(r"^Worker bob rejoined$")
    assert len(rejoined) == 1
    assert rejoined[0][0] > continued_at
    # While frozen, bob is listed as failed in each round, and holds a round up by at most the join grace.
    frozen = [line for line in rounds if freeze_round < line["round"] < back[0]]
    assert frozen, "the round after the drop started while bob was frozen"
    for later in frozen:
        assert later["workers"] == ["alice", "charlie"]
        assert later["failed"] == {"bob": "not connected (no answer to pings for 3 s (frozen or gone))"}
        assert later["seconds"] < join_grace + 5.0
    assert [record.round for record in result.rounds] == list(range(1, total + 1))
    record(
        "SIGSTOP of bob mid-round (round_timeout 60 s, ping 1 s / 3 s)",
        outcome=f"dropped from round {freeze_round}: {line['failed']['bob']}; back from round {back[0]} after SIGCONT",
        drop_after_sigstop_s=detection,
        freeze_round_seconds=line["seconds"],
        frozen_later_round_seconds=[later["seconds"] for later in frozen],
        sigcont_to_rejoined_s=rejoined[0][0] - continued_at,
        rounds_completed=len(rounds),
    )


# -- The coordinator killed and resumed -----------------------------------------------------


def run_cli(arguments: list[str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CLIENT, *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def cli_process(arguments: list[str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, CLIENT, *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=STOP_TIMEOUT)


def one_error_line(done: subprocess.CompletedProcess[str] | tuple[int, str]) -> str:
    stderr = done.stderr if isinstance(done, subprocess.CompletedProcess) else done[1]
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_killed_coordinator_resumes_from_its_checkpoint(trio: Cluster, tmp_path: Path) -> None:
    total, crash_after = 6, 3
    common = [
        "--workers",
        trio.workers_flag(*TRAINERS),
        "--evaluator",
        "",
        "--training-rounds",
        str(total),
        "--seed",
        "7",
        "--connect-timeout",
        "10",
        "--round-timeout",
        str(ROUND_TIMEOUT),
    ]
    checkpoints, metrics_path = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    crashing = [*common, "--checkpoint-dir", str(checkpoints), "--metrics-out", str(metrics_path)]

    # An uninterrupted run with the same seed, for reference.
    reference = run_cli(
        [*common, "--metrics-out", str(tmp_path / "ref.jsonl"), "--save-model", str(tmp_path / "ref.st")]
    )
    assert reference.returncode == 0, reference.stderr

    # The run to crash: SIGKILL once round 3's checkpoint is on disk.
    metrics = Metrics(metrics_path)
    with cli_process([*crashing, "--save-model", str(tmp_path / "crashed.st")]) as process:
        round_seen = metrics.wait_round(crash_after, CLI_TIMEOUT)

        def checkpointed() -> bool:
            assert process.poll() is None, "the run ended before it could be killed"
            saved = load_checkpoint(checkpoints)  # never half written: the file is replaced whole
            return saved is not None and saved.round >= crash_after

        wait_until(checkpointed, 30_000 * MS, f"the checkpoint of round {crash_after}")
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(checkpoints)
    assert saved is not None
    resumed_from = saved.round
    assert crash_after <= resumed_from < total
    assert not (tmp_path / "crashed.st").exists()
    assert saved.identity["workers"] == list(TRAINERS)
    lines_at_crash = len(round_lines(metrics_path))
    assert saved.metrics_size is not None and 0 < saved.metrics_size <= metrics_path.stat().st_size
    completed = metrics_path.read_bytes()[: saved.metrics_size]
    # What a crash after the checkpoint can leave behind: a whole line of the round in progress, and a torn one.
    with metrics_path.open("ab") as metrics_file:
        metrics_file.write(json.dumps({"event": "round", "round": resumed_from + 1, "workers": []}).encode() + b"\n")
        metrics_file.write(b'{"event": "round", "rou')
    before = metrics_path.read_bytes()

    # Refused: the directory holds a checkpoint and --resume is missing.
    again = run_cli([*crashing, "--save-model", str(tmp_path / "again.st")])
    assert again.returncode == 9
    assert one_error_line(again) == (
        f"{CLIENT}: error: {checkpoints} holds a checkpoint of round {resumed_from};"
        " pass --resume to continue it, or choose another --checkpoint-dir"
    )
    # Refused: resuming with other workers.
    others = [*crashing, "--resume"]
    others[others.index("--workers") + 1] = trio.workers_flag("alice", "bob")
    different = run_cli(others)
    assert different.returncode == 9
    assert one_error_line(different) == (
        f"{CLIENT}: error: cannot resume: the run's configuration changed"
        " (workers was ['alice', 'bob', 'charlie'], now ['alice', 'bob']);"
        " use another --checkpoint-dir to start a new run"
    )
    assert metrics_path.read_bytes() == before, "a refused run touched the metrics file"
    after_refusals = load_checkpoint(checkpoints)
    assert after_refusals is not None and after_refusals.round == resumed_from

    # Resumed: the remaining rounds, each line once, the same weights as the uninterrupted run.
    started = time.monotonic()
    resumed = run_cli([*crashing, "--resume", "--save-model", str(tmp_path / "resumed.st")])
    resume_seconds = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming after round {resumed_from} from {checkpoints}" in resumed.stdout.splitlines()
    assert metrics_path.read_bytes().startswith(completed), "the completed rounds' lines were rewritten"
    rounds = round_lines(metrics_path)  # every line parses: the torn one is gone
    assert [line["round"] for line in rounds] == list(range(1, total + 1)), "each round exactly once"
    assert all(line["workers"] == list(TRAINERS) and line["failed"] == {} for line in rounds)
    reference_rounds = round_lines(tmp_path / "ref.jsonl")
    assert [line["train_loss"] for line in rounds] == [line["train_loss"] for line in reference_rounds]
    assert [line["lr"] for line in rounds] == [line["lr"] for line in reference_rounds]
    final = load_checkpoint(checkpoints)
    assert final is not None and final.round == total
    expected, actual = load_file(str(tmp_path / "ref.st")), load_file(str(tmp_path / "resumed.st"))
    assert sorted(actual) == sorted(expected)
    differing = [name for name in expected if not np.array_equal(actual[name], expected[name])]
    assert not differing, f"resumed weights differ from the uninterrupted run's in {differing}"
    record(
        "coordinator SIGKILL after round 3, then --resume",
        outcome=f"checkpoint of round {resumed_from}; resumed rounds {resumed_from + 1}..{total}, exit 0,"
        " weights bit-identical to the uninterrupted run",
        round_lines_at_kill=lines_at_crash,
        kill_after_round_line_s=killed_at - round_seen.at,
        resumed_run_s=resume_seconds,
        rounds_completed=len(rounds),
        refusals="no --resume: exit 9; other --workers: exit 9",
    )


@pytest.mark.parametrize("damage", ["shorter", "another-file"])
def test_resume_never_leaves_a_padded_or_torn_metrics_file(trio: Cluster, tmp_path: Path, damage: str) -> None:
    """The checkpoint is fsynced, the metrics file only flushed: after a machine crash it can be shorter
    than the checkpoint says; and --metrics-out may name another file on resume. Either way the resume is
    refused with a message that says why and what to do, and the file is left as it was (never padded or torn)."""
    metrics_path = tmp_path / "metrics.jsonl"
    config = CoordinatorConfig(
        workers=trio.uris("alice"),
        evaluator={},
        training_rounds=2,
        checkpoint_dir=tmp_path / "checkpoints",
        metrics_out=metrics_path,
        **FAST,
    )
    run(Coordinator(config, report=lambda line: None).run())
    if damage == "shorter":
        target = metrics_path
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = tmp_path / "another.jsonl"
        target.write_text(json.dumps({"event": "note", "text": "x" * 10_000}) + "\n")
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.metrics_size is not None
    recorded, size = checkpoint.metrics_path, checkpoint.metrics_size
    before = target.read_bytes()
    resumed = CoordinatorConfig(**{**config.__dict__, "training_rounds": 3, "resume": True, "metrics_out": target})
    with pytest.raises(CheckpointError) as raised:
        run(Coordinator(resumed, report=lambda line: None).run())
    if damage == "shorter":
        assert len(before) < size
        expected = (
            f"metrics file {target} has {len(before)} bytes and does not end a line at byte {size} as the checkpoint"
            " of its run says; it was changed or lost data since, so resuming would damage it"
        )
    else:
        assert recorded == str(metrics_path.resolve())
        expected = (
            f"the checkpointed run wrote its metrics to {recorded}, not {target}; resume with --metrics-out {recorded}"
        )
    assert str(raised.value) == expected
    assert target.read_bytes() == before, "a refused resume changed the metrics file"


# -- A quorum that cannot be met ------------------------------------------------------------


def test_a_quorum_that_cannot_be_met_stops_the_cli_with_one_line(trio: Cluster, tmp_path: Path) -> None:
    metrics_path = tmp_path / "metrics.jsonl"
    arguments = [
        "--workers",
        trio.workers_flag(*TRAINERS),
        "--evaluator",
        "",
        "--training-rounds",
        "50",
        "--min-workers",
        "3",
        "--max-round-retries",
        "1",
        "--reconnect-max-delay",
        "0.5",
        "--connect-timeout",
        "10",
        "--round-timeout",
        str(ROUND_TIMEOUT),
        "--metrics-out",
        str(metrics_path),
    ]
    metrics = Metrics(metrics_path)
    with cli_process(arguments) as process:
        metrics.wait_round(1, CLI_TIMEOUT)
        killed_at = time.monotonic()
        trio["bob"].kill()
        _, stderr = process.communicate(timeout=30_000 * MS)
        exit_seconds = time.monotonic() - killed_at
    assert process.returncode == 8, stderr
    line = one_error_line((process.returncode, stderr))
    match = re.fullmatch(
        rf"{CLIENT}: error: round (\d+): 2 of 3 workers contributed, quorum is 3, after 2 attempts \(bob: (.+)\)",
        line,
    )
    assert match, line
    failed_round = int(match.group(1))
    assert match.group(2).startswith("not connected (connection lost"), line
    retries = [event for event in read_metrics(metrics_path) if event["event"] == "round_retry"]
    assert [(event["round"], event["attempt"]) for event in retries] == [(failed_round, 1), (failed_round, 2)]
    assert all(list(event["failed"]) == ["bob"] for event in retries)
    assert [line["round"] for line in round_lines(metrics_path)] == list(range(1, failed_round))
    assert exit_seconds < 10.0
    record(
        "quorum 3 of 3 with bob killed (1 retry, backoff cap 0.5 s)",
        outcome=f"exit 8 at round {failed_round}: {line}",
        exit_after_kill_s=exit_seconds,
        rounds_completed=failed_round - 1,
    )


# -- A flood of bad input -------------------------------------------------------------------


def pack(request_id: Any, kind: Any, body: Any, *, v: Any = 1) -> bytes:
    """An envelope built by hand, so that it can break the rules :func:`encode` enforces."""
    data: bytes = msgpack.packb({"v": v, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)
    return data


def nested(depth: int) -> bytes:
    """msgpack for ``[[[...]]]`` ``depth`` deep, written by hand (msgpack refuses to pack it)."""
    return b"\x91" * depth + b"\xc0"


BAD_ENVELOPES: list[bytes | str] = [
    b"",
    b"\xc1",  # never used in msgpack
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1}),
    msgpack.packb({1: 2}),  # non-string key
    pack(5, "ping", {}, v=99),
    pack(-5, "ping", {}),
    pack("x", "ping", {}),
    pack(2**63, "ping", {}),
    pack(0, "ping", {}),
    pack(7, "boom", {}),
    pack(8, "pong", {}),  # not a request
    pack(9, "fit", {"model": 1}),
    pack(10, "fit", {"model": "digits-cnn", "weights": {"w": {"dtype": "f4", "shape": [3], "data": b"x"}}}),
    pack(11, "ping", {}),  # before hello
    pack(12, "evaluate", []),
    pack(13, "hello", {"protocol_version": "one"}),
    msgpack.packb({"v": 1, "id": 14, "kind": "ping", "body": msgpack.ExtType(5, b"ext")}),
    nested(100_000),
    msgpack.packb({"v": 1, "id": 15, "kind": "ping", "body": {}})[:-2],  # truncated
    "not msgpack at all, and in a text frame",
]


def garbage(rng: random.Random) -> bytes | str:
    if rng.random() < 0.5:
        return rng.choice(BAD_ENVELOPES)
    return rng.randbytes(rng.choice([1, 7, 64, 512, 4096]))


async def flood_connection(uri: str, count: int, seed: int) -> int:
    """Send ``count`` bad messages while reading the replies; return how many error replies came."""
    rng = random.Random(seed)
    async with connect(
        uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
    ) as connection:

        async def read() -> int:
            replies = 0
            while replies < count:
                envelope = decode(await connection.recv(decode=False))
                assert isinstance(envelope.message, Error), envelope
                replies += 1
            return replies

        reader = asyncio.create_task(read())
        for _ in range(count):
            await connection.send(garbage(rng))
        async with asyncio.timeout(60_000 * MS):
            return await reader


async def flood_without_reading(uri: str, seconds: float, seed: int) -> int:
    """Send bad messages for ``seconds`` and never read a reply; then drop the TCP connection."""
    rng = random.Random(seed)
    sent = 0
    connection = await connect(uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=1000 * MS)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    await connection.send(rng.randbytes(1024))
                    sent += 1
    finally:
        connection.transport.abort()
    return sent


async def short_connection(uri: str, port: int, kind: int) -> str:
    """One of several ways to open a connection and go away quickly."""
    if kind == 0:  # a polite session: hello, close
        async with connect(
            uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
        ) as connection:
            await connection.send(encode(1, Hello()))
            async with asyncio.timeout(10_000 * MS):
                reply = decode(await connection.recv(decode=False))
            assert isinstance(reply.message, Info)
        return "hello"
    if kind == 1:  # a websocket handshake, then gone without a closing handshake
        connection = await connect(uri, compression=None, open_timeout=10_000 * MS)
        await connection.send(b"\x00garbage")
        connection.transport.abort()
        return "abort"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == 2:  # not HTTP at all
            writer.write(os.urandom(300) + b"\r\n\r\n")
        elif kind == 3:  # HTTP, but no websocket upgrade
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        else:  # half a request, then a reset
            writer.write(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return "reset"
        await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10_000 * MS):
                answer = await reader.read(200)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        return "bad-http"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def short_connections(uri: str, port: int, total: int, concurrency: int) -> dict[str, int]:
    limit = asyncio.Semaphore(concurrency)
    counts: dict[str, int] = {}

    async def one(index: int) -> None:
        async with limit:
            kind = await short_connection(uri, port, index % 5)
            counts[kind] = counts.get(kind, 0) + 1

    await asyncio.gather(*(one(index) for index in range(total)))
    return counts


def assert_same_weights(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert np.array_equal(actual[name], expected[name]), name


def test_a_flood_of_bad_input_leaves_a_worker_serving_with_flat_memory(trio: Cluster, tmp_path: Path) -> None:
    alice = trio["alice"]
    config = CoordinatorConfig(workers=trio.uris(*TRAINERS), evaluator={}, training_rounds=2, seed=11, **FAST)
    reference = run(Coordinator(config, report=lambda line: None).run())
    rss_before, fds_before = alice.rss_mib(), alice.open_fds()
    connections, per_connection, short_total = 4, 1000, 300

    async def flood_and_train() -> tuple[list[int], int, dict[str, int], RunResult]:
        flood = asyncio.gather(
            asyncio.gather(*(flood_connection(alice.uri, per_connection, seed) for seed in range(connections))),
            flood_without_reading(alice.uri, 2.0, 99),
            short_connections(alice.uri, alice.port, short_total, concurrency=16),
        )
        during = await Coordinator(config, report=lambda line: None).run()
        replies, unread, short = await flood
        return replies, unread, short, during

    started = time.monotonic()
    replies, unread, short, during = run(flood_and_train())
    flood_seconds = time.monotonic() - started
    assert replies == [per_connection] * connections, "every bad message gets exactly one error reply"
    assert sum(short.values()) == short_total
    rss_peak = alice.rss_mib()
    after = run(Coordinator(config, report=lambda line: None).run())
    assert_same_weights(during.weights, reference.weights)
    assert_same_weights(after.weights, reference.weights)
    assert all(record.workers == TRAINERS for record in [*during.rounds, *after.rounds])
    rss_after = alice.rss_mib()
    assert rss_after - rss_before < 100, (rss_before, rss_after)
    # Every connection of the flood was let go: the descriptors are back to where they were.
    fds = wait_until(
        lambda: alice.open_fds() <= fds_before + 1 and alice.open_fds(), 10_000 * MS, "alice's sockets to close"
    )

    async def still_serves() -> None:
        async with connect(alice.uri, compression=None, max_size=None, open_timeout=10_000 * MS) as connection:
            await connection.send(encode(1, Hello()))
            await connection.send(encode(2, Ping()))
            async with asyncio.timeout(10_000 * MS):
                replies = [decode(await connection.recv(decode=False)) for _ in range(2)]
            assert isinstance(replies[0].message, Info) and replies[1] == Envelope(2, Pong())

    run(still_serves(), 30_000 * MS)
    assert alice.alive
    record(
        "flood of alice (4x1000 bad messages, 1 unread sender, 300 short connections, during a 2-round run)",
        outcome="every bad message answered with an error; both runs bit-identical to the reference",
        flood_s=flood_seconds,
        unread_messages_sent=unread,
        short_connections=short,
        rss_before_mib=rss_before,
        rss_after_flood_mib=rss_peak,
        rss_after_run_mib=rss_after,
        fds_before_after=f"{fds_before} -> {fds}",
    )


def refused_code(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, or the close code of a refused hello."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code
    return None


def test_connections_beyond_the_limit_are_refused_with_503(cluster: Cluster) -> None:
    erin = cluster["erin"]  # --max-connections 3
    limit = 3

    async def hello(connection: ClientConnection, request_id: int = 1) -> None:
        await connection.send(encode(request_id, Hello()))
        async with asyncio.timeout(10_000 * MS):
            reply = decode(await connection.recv(decode=False))
        assert isinstance(reply.message, Info) and reply.message.worker_id == "erin"

    async def open_one() -> ClientConnection:
        return await connect(
            erin.uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
        )

    async def admitted(timeout: float = 5000 * MS) -> tuple[ClientConnection, float]:
        """A connection, once the worker has counted out the ones closed just before (a moment after the close).

        A connection counts from its hello on (erin has no token): until the slots free, the handshake gets
        HTTP 503 or the hello a close with 1013.
        """
        started = time.monotonic()
        while True:
            try:
                connection = await open_one()
                await hello(connection)  # its session runs: it counts
            except (InvalidStatus, ConnectionClosed) as exc:
                assert refused_code(exc) in (503, 1013)
                assert time.monotonic() - started < timeout, "the worker still counts closed connections"
                await asyncio.sleep(POLL)
                continue
            return connection, time.monotonic() - started

    async def one_past_the_limit() -> float:
        held: list[ClientConnection] = []
        try:
            for _ in range(limit):
                held.append((await admitted())[0])
            with pytest.raises(InvalidStatus) as refused:
                await open_one()
            assert refused.value.response.status_code == 503
            assert refused.value.response.body == b"too many connections\n"
            for index, connection in enumerate(held):  # the admitted ones are unharmed
                await hello(connection, 10 + index)
        finally:
            for connection in held:
                await connection.close()
        connection, waited = await admitted()
        await connection.close()
        return waited

    async def at_once(count: int) -> tuple[int, int]:
        """``count`` handshakes and hellos at the same time: the limit holds however they interleave.

        Unauthenticated connections do not count, so all handshakes pass; the hellos beyond the limit
        are answered with a close (1013 too many connections).
        """
        (await admitted())[0].transport.abort()  # wait until the slots are free, then free ours at once
        await asyncio.sleep(200 * MS)
        outcomes = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
        opened = [outcome for outcome in outcomes if isinstance(outcome, ClientConnection)]
        try:
            assert len(opened) == count, outcomes
            greeted = await asyncio.gather(
                *(hello(connection, index + 1) for index, connection in enumerate(opened)), return_exceptions=True
            )
            refused = [outcome for outcome in greeted if isinstance(outcome, ConnectionClosed)]
            assert all(refused_code(exc) == 1013 for exc in refused), greeted
            assert all(outcome is None or isinstance(outcome, ConnectionClosed) for outcome in greeted), greeted
        finally:
            for connection in opened:
                await connection.close()
        return count - len(refused), len(refused)

    reopened = run(one_past_the_limit(), 60_000 * MS)
    accepted, refused = run(at_once(20), 60_000 * MS)
    assert (accepted, refused) == (limit, 20 - limit)
    assert erin.alive
    record(
        "max connections 3",
        outcome="4th handshake refused with HTTP 503 (body 'too many connections'); accepted again after closing;"
        " 20 hellos at once: 3 answered, 17 closed with 1013",
        reopen_after_close_s=reopened,
        twenty_at_once=f"{accepted} accepted, {refused} refused",
    )
