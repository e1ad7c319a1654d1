"""Provisioned projects for the security tests: a project file, and the startup kits made from it.

``python -m syncfed provision`` runs for real in a temporary folder, which
stands for the repository root of the README's secured quick start; only the
ports differ, free ones picked here and written into the project file. A test
file takes the ``demo`` fixture by importing it by name (``from security_kit
import demo as demo``), so that pytest finds it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from units import MS

__all__ = [
    "CLI_TIMEOUT",
    "ENV",
    "EVALUATOR",
    "TRAINERS",
    "Kit",
    "demo",
    "free_ports",
    "load_certificate",
    "provision_site",
    "write_project",
]

CLI_TIMEOUT = 120_000 * MS  # one command-line run, in seconds

TRAINERS = ("alice", "bob", "charlie")
EVALUATOR = "testing"

#: Four workers on two cores: one torch thread each, set without adding flags to the README's commands.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

#: The README's secured quick start, run in the folder that holds project.toml.
PROVISION = ("-m", "syncfed", "provision", "project.toml", "-o", "startup")


def free_ports(count: int) -> list[int]:
    """Distinct ports of 127.0.0.1 that are free now (all held open until each is picked)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def write_project(path: Path, name: str, workers: Sequence[tuple[str, Sequence[str], int, str]]) -> None:
    """A project file in provision.py's format: ``workers`` as (id, hosts, port, role)."""
    lines = ["[project]", f'name = "{name}"', "", "[coordinator]", 'id = "coordinator"']
    for worker_id, hosts, port, role in workers:
        lines += ["", "[[workers]]", f'id = "{worker_id}"', f"hosts = {json.dumps(list(hosts))}"]
        lines += [f"port = {port}", f'role = "{role}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Kit:
    """A provisioned project: ``site`` holds project.toml and startup/, as the README's repository root does."""

    site: Path
    ports: dict[str, int]
    output: str  # what the provision command printed

    @property
    def startup(self) -> Path:
        return self.site / "startup"

    @property
    def ca(self) -> Path:
        """The CA certificate the coordinator trusts."""
        return self.startup / "coordinator" / "ca.crt"


def provision_site(site: Path) -> str:
    result = subprocess.run(
        [sys.executable, *PROVISION], cwd=site, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=ENV
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """The quick start's project: three trainers and the evaluator on localhost and 127.0.0.1."""
    site = tmp_path_factory.mktemp("demo")
    names = (*TRAINERS, EVALUATOR)
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    workers = [
        (name, ["localhost", "127.0.0.1"], ports[name], "evaluator" if name == EVALUATOR else "trainer")
        for name in names
    ]
    write_project(site / "project.toml", "demo", workers)
    return Kit(site, ports, provision_site(site))


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())
