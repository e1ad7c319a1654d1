"""Reliability: slow, frozen, dying and returning workers, and a crashed coordinator.

Every scenario runs against real worker processes on 127.0.0.1 (see
reliability_kit.py). The coordinator runs either in-process, in a thread of
its own so that the test can kill, freeze and restart workers meanwhile, or as
the command-line tool in a subprocess that the test kills. Every wait has a
deadline, every process started here is stopped in a ``finally``, and the
measured figures are printed (run pytest with ``-s``).

The fixtures come from reliability_kit.py, imported by name so that pytest
finds them here.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, run
from reliability_kit import (
    FAST,
    PING_TIMEOUT,
    ROUND_TIMEOUT,
    STOP_TIMEOUT,
    TRAINERS,
    Background,
    Cluster,
    Metrics,
    is_round,
    read_metrics,
    record,
    round_config,
    round_lines,
    wait_until,
)
from reliability_kit import cluster as cluster
from reliability_kit import figures_table as figures_table
from reliability_kit import trio as trio
from safetensors.numpy import load_file
from units import MS

from syncfed.checkpoint import load_checkpoint
from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult
from syncfed.exceptions import CheckpointError

CLIENT = "run_websocket_client.py"
CLI_TIMEOUT = 120_000 * MS  # one command-line run, in seconds


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
