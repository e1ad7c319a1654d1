"""Worker processes on fixed ports for the reliability tests, and what watches their runs.

A :class:`Site` is one worker process on 127.0.0.1, on a fixed port (found by
binding port 0) so that a killed worker can be restarted at the same address;
the module-scoped ``cluster`` fixture starts five of them. :class:`Metrics`
follows a run's metrics file as it grows, and :class:`Background` runs a
coordinator in a thread of its own, so that a test can kill, freeze and
restart workers meanwhile. Every wait has a deadline, every process started
here is stopped in a ``finally``, and :func:`record` prints what a test
measured (run pytest with ``-s``).

A test file takes the fixtures by importing them by name (``from
reliability_kit import cluster as cluster``), so that pytest finds them there;
each file that does starts workers of its own, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import REPO, RUN_TIMEOUT, run
from units import MS

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult

__all__ = [
    "FAST",
    "PING_TIMEOUT",
    "POLL",
    "ROUND_TIMEOUT",
    "STOP_TIMEOUT",
    "TRAINERS",
    "Background",
    "Cluster",
    "Metrics",
    "cluster",
    "figures_table",
    "is_round",
    "read_metrics",
    "record",
    "round_config",
    "round_lines",
    "trio",
    "wait_until",
]

T = TypeVar("T")

# Durations, in seconds.
STARTUP_TIMEOUT = 90_000 * MS  # a set of workers importing torch on a busy 2-core machine
STOP_TIMEOUT = 10_000 * MS
POLL = 5 * MS  # how often files and processes are looked at
PING_TIMEOUT = 3.0  # the coordinator's default --ping-timeout
ROUND_TIMEOUT = 60.0  # far above every round here: nothing may be dropped by the deadline

#: Each fast worker sleeps this long per training batch (10 per round), so a
#: round takes a few tenths of a second: long enough to hit it in its middle.
FAST_DELAY = 0.03
#: The slow site: 10 batches of this make a round longer than the ping timeout.
SLOW_DELAY = 0.4

TRAINERS = ("alice", "bob", "charlie")

#: What the tests measured, printed at the end of each module: scenario -> figures.
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
    FIGURES.clear()  # the next module's table holds its own figures only


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
