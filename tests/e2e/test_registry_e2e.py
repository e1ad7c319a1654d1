"""The model registry fed by real runs: the evaluated rounds and the final model recorded, loaded back bit for bit."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from conftest import REPO, config, run
from units import MS

from syncfed.coordinator import Coordinator
from syncfed.net.spawn import WorkerProcess
from syncfed.registry import ModelRegistry


def test_the_evaluated_rounds_are_recorded_and_load_back_bit_identically(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    registry_dir = tmp_path / "registry"
    base = config(digits_workers, training_rounds=3, eval_every=2, registry=registry_dir, strategy="fedavgm")
    result = run(Coordinator(base, report=lambda _: None).run())
    registry = ModelRegistry(registry_dir, create=False)
    versions = registry.versions()
    assert [version.round for version in versions] == [1, 3]  # round 2 was neither evaluated nor the last
    assert len({version.run_id for version in versions}) == 1
    last = versions[-1]
    assert last.participants == ("alice", "bob", "charlie")
    assert last.strategy["name"] == "fedavgm" and last.model == "digits-cnn"
    assert last.metrics["accuracy"] == result.accuracy(3)
    loaded = registry.load_weights(last)
    assert list(loaded) == list(result.weights)
    for name, array in result.weights.items():
        assert loaded[name].dtype == array.dtype and loaded[name].tobytes() == array.tobytes(), name
    best = registry.best("accuracy")
    assert best.round in (1, 3) and best.metrics["accuracy"] == max(result.accuracy(1), result.accuracy(3))

    listing = subprocess.run(
        [sys.executable, "-m", "syncfed", "models", "--registry", str(registry_dir), "list"],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
        cwd=REPO,
    )
    assert listing.returncode == 0, listing.stderr
    assert sum(last.run_id in line for line in listing.stdout.splitlines()) == 2


def test_a_resumed_run_keeps_its_registry_run_id(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    base = config(
        digits_workers,
        evaluator=False,
        training_rounds=3,
        registry=tmp_path / "registry",
        checkpoint_dir=tmp_path / "checkpoint",
    )
    run(Coordinator(replace(base, training_rounds=2), report=lambda _: None).run())
    resumed = run(Coordinator(replace(base, resume=True), report=lambda _: None).run())
    versions = ModelRegistry(tmp_path / "registry", create=False).versions()
    assert [version.round for version in versions] == [1, 2, 3]
    assert len({version.run_id for version in versions}) == 1
    assert np.array_equal(
        ModelRegistry(tmp_path / "registry").load_weights(versions[-1])["fc1.weight"], resumed.weights["fc1.weight"]
    )
