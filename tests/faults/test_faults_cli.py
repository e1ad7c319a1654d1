"""Fault tests, the command line: one line of error, and a clean stop on Ctrl-C, SIGTERM or SIGKILL.

The coordinator's command gives up on a worker that is not there and on
workers that disagree with one line and its exit status; Ctrl-C and SIGTERM
stop it and the workers it spawned, and Ctrl-C stops a worker, each with one
line and no traceback. Spawned workers stop on their own when the coordinator
is killed (``--exit-with-stdin``).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from faults_kit import free_port
from units import MS

from syncfed.net.spawn import WorkerProcess

CLI_TIMEOUT = 60_000 * MS


# -- The command line ---------------------------------------------------------------------


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_websocket_client.py", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def test_cli_waits_for_an_unreachable_worker_then_exits_with_one_line() -> None:
    """It may still be starting: the coordinator says whom it waits for, then gives up at --connect-timeout."""
    port = free_port()
    done = run_cli(["--workers", f"alice=ws://127.0.0.1:{port}", "--evaluator", "", "--connect-timeout", "2"])
    assert done.returncode == 5  # WorkerUnavailable
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].endswith(f"WARNING waiting for alice at 127.0.0.1:{port} (connection refused), up to 2 s")
    assert lines[1] == (
        f"run_websocket_client.py: error: worker alice is unavailable: no connection to ws://127.0.0.1:{port}"
        " within 2 s (connection refused)"
    )


def test_cli_exits_with_one_line_when_workers_disagree(digits_workers: dict[str, WorkerProcess]) -> None:
    workers = f"alice={digits_workers['alice'].uri},testing={digits_workers['testing'].uri}"
    done = run_cli(["--workers", workers, "--evaluator", "", "--connect_timeout", "10"])
    assert done.returncode == 4  # IncompatibleWorkers
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "run_websocket_client.py: error: testing is an evaluator (started with --testing) but is listed as the trainer"
    ]


def children_of(pid: int) -> list[int]:
    """Ids of the processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interruptible() -> None:
    """Default Ctrl-C handling in the child, even when this test run was started with SIGINT ignored (``cmd &``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sent", "status", "line"),
    [
        pytest.param(signal.SIGINT, 130, "run_websocket_client.py: interrupted", id="ctrl-c"),
        pytest.param(signal.SIGTERM, 143, "run_websocket_client.py: terminated", id="sigterm"),
        # Nothing runs in the coordinator: the pipes it held as its workers' input close, and each worker stops.
        pytest.param(signal.SIGKILL, -signal.SIGKILL, None, id="sigkill"),
    ],
)
def test_ctrl_c_sigterm_or_sigkill_stops_the_cli_and_its_spawned_workers(
    tmp_path: Path, sent: signal.Signals, status: int, line: str | None
) -> None:
    """SIGTERM (kill, a service manager, a benchmark's timeout) stops the spawned workers too, as Ctrl-C does,
    and so does SIGKILL (the out-of-memory killer, a notebook's kernel restarted), which the coordinator never sees."""
    metrics = tmp_path / "metrics.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "run_websocket_client.py",
            "--spawn-workers",
            "--workers",
            "alice=ws://localhost:1",
            "--evaluator",
            "",
            "--training-rounds",
            "100000",
            "--metrics-out",
            str(metrics),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while not (metrics.exists() and metrics.read_text().strip()):  # training has begun
            assert process.poll() is None, process.communicate(timeout=5000 * MS)
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(100 * MS)
        workers = children_of(process.pid)
        assert len(workers) == 1
        process.send_signal(sent)
        out, err = process.communicate(timeout=30_000 * MS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10_000 * MS)
    assert process.returncode == status
    assert "Traceback" not in err
    assert err.splitlines() == ([] if line is None else [line])
    deadline = time.monotonic() + 30_000 * MS  # after SIGKILL, each worker's own stop
    try:
        while any(is_running(pid) for pid in workers):
            assert time.monotonic() < deadline, "a spawned worker outlived the coordinator"
            time.sleep(100 * MS)
    finally:
        for pid in filter(is_running, workers):  # an orphan left by a failure here must not outlive the test
            os.kill(pid, signal.SIGKILL)


def start_worker(*flags: str) -> subprocess.Popen[bytes]:
    """Worker alice on a free port, with its input a pipe of this process."""
    return subprocess.Popen(
        [sys.executable, "run_websocket_server.py", "--id", "alice", "--host", "127.0.0.1", "--port", "0", *flags],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        preexec_fn=interruptible,
    )


def await_ready(process: subprocess.Popen[bytes]) -> str:
    """The worker's output up to its ready line."""
    ready = re.compile(r"syncfed worker alice listening on ws://127\.0\.0\.1:\d+")
    assert process.stdout is not None
    output = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + CLI_TIMEOUT
        while not any(ready.fullmatch(line) for line in output.decode().splitlines()):
            left = deadline - time.monotonic()
            assert left > 0 and selector.select(left), f"no ready line in time: {output!r}"
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the worker exited: {output!r}"
            output += chunk
    return output.decode()


def test_ctrl_c_stops_a_worker_with_one_line() -> None:
    process = start_worker("--threads", "1")
    try:
        first = await_ready(process).splitlines()[0]
        assert first == "alice holds 576 training examples of digits, digits 0-3 (0: 142, 1: 146, 2: 142, 3: 146)"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30_000 * MS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10_000 * MS)
    assert process.returncode == 130
    assert b"Traceback" not in err
    assert err.decode().splitlines() == ["run_websocket_server.py: stopped"]


def test_a_worker_with_exit_with_stdin_stops_when_its_input_ends() -> None:
    """Its parent's end of the pipe closes when the parent exits, however it exits."""
    process = start_worker("--threads", "1", "--exit-with-stdin")
    try:
        await_ready(process)
        assert process.stdin is not None
        process.stdin.write(b"anything written is ignored\n")
        time.sleep(200 * MS)
        assert process.poll() is None, "the worker stopped before its input ended"
        _, err = process.communicate(timeout=30_000 * MS)  # which closes its input first
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10_000 * MS)
    assert process.returncode == 0
    assert err.decode().splitlines() == ["run_websocket_server.py: standard input ended (--exit-with-stdin): stopped"]


def test_exit_with_stdin_refuses_a_file_as_input(tmp_path: Path) -> None:
    """A file's end is there from the start: one line, rather than a worker that stops at once."""
    given = tmp_path / "input.txt"
    given.write_text("")
    with given.open("rb") as stdin:
        done = subprocess.run(
            [sys.executable, "run_websocket_server.py", "--id", "alice", "--port", "0", "--exit-with-stdin"],
            cwd=REPO,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "run_websocket_server.py: error: standard input is a file, not a pipe: its end cannot stop the program"
    ]
