"""The public API: what ``syncfed/__init__.py`` promises, and that importing it stays cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import syncfed


@pytest.mark.parametrize("name", syncfed.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(syncfed, name) is not None


def test_public_names_are_the_objects_of_their_homes() -> None:
    from syncfed.config import CoordinatorConfig, WorkerConfig
    from syncfed.coordinator import Coordinator
    from syncfed.strategies import FedAvg
    from syncfed.worker import run_worker

    assert syncfed.Coordinator is Coordinator and syncfed.CoordinatorConfig is CoordinatorConfig
    assert syncfed.WorkerConfig is WorkerConfig and syncfed.run_worker is run_worker
    assert syncfed.FedAvg is FedAvg


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = syncfed.Nope  # type: ignore[attr-defined]


@pytest.mark.parametrize("package", ["syncfed.coordinator", "syncfed.worker"])
def test_the_packages_load_each_name_from_its_home_on_first_use(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        module_name, _, attribute = module._HOMES[name].partition(":")
        assert getattr(module, name) is getattr(importlib.import_module(module_name, package), attribute or name)
        assert name in vars(module)  # kept: the next look-up is a plain attribute
    assert sorted(module.__all__) == sorted(module._HOMES) and set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match=f"^module '{package}' has no attribute 'Nope'$"):
        _ = module.Nope


def test_importing_a_pure_module_loads_neither_the_protocol_nor_the_network() -> None:
    loaded = "sorted({'asyncio', 'websockets', 'syncfed.protocol'} & set(sys.modules))"
    code = f"import sys, syncfed, syncfed.tensors; print({loaded})"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "[]"


def test_the_tools_and_a_worker_refusing_its_data_never_load_torch(tmp_path: Path) -> None:
    """torch takes about 2 s to import: ``python -m syncfed`` (analytics, models, provision) never needs it, and a
    worker loads it only once its data has loaded, so a bad file is refused at once."""
    flags = ["--id", "north", "--host", "127.0.0.1", "--port", "0", "--data", f"images:{tmp_path / 'nowhere'}"]
    code = (
        "import sys, syncfed.__main__, syncfed.cli.analytics, syncfed.cli.worker as w;"
        f" status = w.main({flags!r}); print(status, 'torch' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert output.stdout.split() == ["3", "False"], output.stdout + output.stderr
    assert "no such folder" in output.stderr
