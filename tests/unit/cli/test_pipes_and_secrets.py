"""A closed pipe ends a program quietly, and provisioning warns before a CA key lands in a git work tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO
from units import MS

from syncfed.cli.common import BROKEN_PIPE
from syncfed.cli.provision import git_work_tree

PROJECT = """[project]
name = "pipes"

[coordinator]
id = "coordinator"

[[workers]]
id = "alice"
hosts = ["127.0.0.1"]
port = 8777
role = "trainer"
"""
TIMEOUT = 60_000 * MS


def provision(site: Path, *, stdout: int | None) -> subprocess.Popen[bytes]:
    (site / "project.toml").write_text(PROJECT, encoding="utf-8")
    command = [sys.executable, "-m", "syncfed", "provision", "project.toml", "-o", "kits"]
    return subprocess.Popen(command, cwd=site, stdout=stdout, stderr=subprocess.PIPE, env={"PYTHONPATH": str(REPO)})


def test_a_reader_that_goes_away_ends_the_program_quietly(tmp_path: Path) -> None:
    process = provision(tmp_path, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head -0` does, before the program prints anything
    assert process.wait(TIMEOUT) == BROKEN_PIPE
    assert process.stderr.read() == b""


def test_provisioning_into_a_git_work_tree_warns_about_the_ca_key(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    process = provision(tmp_path, stdout=subprocess.DEVNULL)
    assert process.wait(TIMEOUT) == 0 and process.stderr is not None
    warning = process.stderr.read().decode()
    assert warning == (
        f"python -m syncfed: warning: kits is inside the git work tree {tmp_path.resolve()}: keep it out of"
        " version control (add it to .gitignore): it holds the CA's private key\n"
    )


def test_the_work_tree_is_found_from_any_folder_below_it(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    assert git_work_tree(tmp_path / "a" / "b") == tmp_path.resolve()
    assert git_work_tree(Path("/")) is None or (Path("/") / ".git").exists()


def test_the_repository_ignores_startup_kits() -> None:
    assert "startup/" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
