"""scripts/setup.sh installs what it says: everything for the tests by default, the runtime alone with --runtime."""

from __future__ import annotations

import shutil
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


def test_for_the_tests_it_installs_chromium_when_missing_and_not_for_the_runtime(tmp_path: Path) -> None:
    shims = tmp_path / "bin"  # the tools the script needs, without chromium
    shims.mkdir()
    for tool in ("bash", "python3", "apt-get", "id", "dirname", "sed"):
        found = shutil.which(tool)
        assert found is not None, tool
        (shims / tool).symlink_to(found)

    def steps(*flags: str) -> list[str]:
        done = subprocess.run(
            [str(shims / "bash"), str(SCRIPT), *flags, "--dry-run"],
            env={"PATH": str(shims), "VENV": str(tmp_path / "venv")},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return [line.removeprefix("sudo ") for line in done.stdout.splitlines() if "apt-get" in line]

    assert steps() == ["apt-get update -qq", "apt-get install -y -qq chromium chromium-driver"]
    assert steps("--runtime") == []
