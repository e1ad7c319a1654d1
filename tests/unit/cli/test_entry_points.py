"""The command-line entry points under their new names, and the old ones kept for one release."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from syncfed.cli import client, coordinator, server, worker

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("old", "new"), [(client, coordinator), (server, worker)], ids=["cli.client", "cli.server"])
def test_the_old_modules_give_the_new_functions(old: object, new: object) -> None:
    for name in ("PROGRAM", "build_parser", "config_from_args", "main"):
        assert getattr(old, name) is getattr(new, name)


def test_console_scripts_name_the_new_modules() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in parser["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts == {
        "syncfed-worker": "syncfed.cli.worker:main",
        "syncfed-coordinator": "syncfed.cli.coordinator:main",
    }


def test_python_m_the_old_worker_module_still_starts_the_worker_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "syncfed.cli.server", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: run_websocket_server.py")
