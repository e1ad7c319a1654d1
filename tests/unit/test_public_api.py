"""The public API: what ``syncfed/__init__.py`` promises, and that importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

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


def test_importing_a_pure_module_loads_neither_the_protocol_nor_the_network() -> None:
    loaded = "sorted({'asyncio', 'websockets', 'syncfed.protocol'} & set(sys.modules))"
    code = f"import sys, syncfed, syncfed.tensors; print({loaded})"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "[]"
