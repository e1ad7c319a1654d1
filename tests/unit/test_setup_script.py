"""scripts/setup.sh installs what it says: everything for the tests by default, the runtime alone with --runtime."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "scripts" / "setup.sh"


def dry_run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *flags, "--dry-run"],
        env={"PATH": "/usr/bin:/bin", "VENV": str(tmp_path / "venv")},
        capture_output=True,
        text=True,
        timeout=30,
    )


def installs(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What each printed ``pip install`` step would install."""
    return [line.rsplit(" ", 1)[-1] for line in done.stdout.splitlines() if " -m pip install --quiet " in line]


def test_without_flags_it_installs_the_test_extra_as_ci_runs_it(tmp_path: Path) -> None:
    done = dry_run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert installs(done) == ["pip", "torch==2.13.0", ".[test]"]
    assert "every extra the tests use" in done.stdout
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [
        line.strip()
        for line in readme
        if line.strip().startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    ]
    assert len(commands) == 1 and commands[0] in (REPO / ".ci" / "run").read_text().splitlines()  # CI runs the README's


def test_runtime_installs_syncfed_without_extras(tmp_path: Path) -> None:
    done = dry_run(tmp_path, "--runtime")
    assert done.returncode == 0, done.stderr
    assert installs(done) == ["pip", "torch==2.13.0", "."]
    assert "runtime dependencies only" in done.stdout
    assert not (tmp_path / "venv").exists(), "a dry run creates nothing"


def test_help_and_unknown_options() -> None:
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--runtime" in shown.stdout and "--dry-run" in shown.stdout
    refused = subprocess.run(["bash", str(SCRIPT), "--runtim"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert refused.stderr == "setup.sh: unknown option --runtim (use --runtime, --dry-run or --help)\n"
