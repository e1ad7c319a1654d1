"""The worker's task flags: the user tasks it may build and where it keeps optimizer state."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncfed.cli import worker
from syncfed.cli.common import parse_arguments
from syncfed.config import WorkerConfig


def config(argv: list[str]) -> WorkerConfig:
    return worker.config_from_args(parse_arguments(worker.build_parser(), ["--id", "alice", *argv]))


def test_the_task_flags_build_the_config(tmp_path: Path) -> None:
    built = config(["--task", "a.tasks:One", "--task", "b:Two", "--state-dir", str(tmp_path)])
    assert (built.tasks, built.state_dir) == (("a.tasks:One", "b:Two"), tmp_path)
    assert (config([]).tasks, config([]).state_dir) == ((), None)


def test_a_task_path_that_cannot_be_imported_stops_the_worker_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = worker.main(["--id", "alice", "--port", "0", "--threads", "1", "--task", "nowhere_at_all:Task"])
    error = capsys.readouterr().err.strip()
    assert code != 0
    assert error == (
        "run_websocket_server.py: error: task nowhere_at_all:Task cannot be imported: No module named 'nowhere_at_all'"
    )
