"""The repository's programs run to their end in a subprocess, as a user runs them from its root."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from units import MS

#: The repository root, where run_websocket_server.py and run_websocket_client.py live.
REPO = Path(__file__).resolve().parent.parent
#: Seconds one program may take: it imports torch first, on a busy 2-core machine, and may spawn workers.
PROGRAM_TIMEOUT = 240_000 * MS


def run_program(arguments: list[str], pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGUMENTS`` in the repository root, with ``pythonpath`` (a user's module folder) first on its path."""
    env = dict(os.environ)
    paths = [str(pythonpath)] if pythonpath is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, timeout=PROGRAM_TIMEOUT, cwd=REPO, env=env
    )


@contextlib.contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """``scripts/NAME.py`` as a module, registered while in use (its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"syncfed_{name}", REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
