"""scripts/normalization_table.py: the splits it writes, each site's own standardisation, and one short real run.

The table in docs/data.md comes from this script; these tests hold it to what
the page says it does: the ``shift`` hospitals are the demo's training
records cut into thirds by ``mean radius``, ``own`` standardises each file
with its own statistics and nothing else, and a run over real workers prints
the table with federated statistics beating raw values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from programs import script_module
from units import MS

SCRIPT = REPO / "scripts" / "normalization_table.py"


@pytest.fixture(scope="module")
def table() -> Iterator[ModuleType]:
    """The script as a module, registered while in use."""
    with script_module("normalization_table") as module:
        yield module


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_shift_split_cuts_the_demo_records_into_thirds_by_radius(table: ModuleType, tmp_path: Path) -> None:
    files = table.write_splits(tmp_path)
    hospitals = [name for name in files["demo"] if name != table.EVALUATOR]
    demo = pd.concat([read(files["demo"][name]) for name in hospitals], ignore_index=True)
    shift = [read(files["shift"][name]) for name in hospitals]
    # The same records, each once.
    pooled = pd.concat(shift, ignore_index=True)
    key = list(demo.columns)
    assert len(pooled) == len(demo)
    pd.testing.assert_frame_equal(
        pooled.sort_values(key).reset_index(drop=True), demo.sort_values(key).reset_index(drop=True)
    )
    # Thirds in order of the feature: no hospital's radius overlaps the next one's.
    assert max(len(part) for part in shift) - min(len(part) for part in shift) <= 1
    for lower, upper in zip(shift, shift[1:], strict=False):
        assert lower[table.SHIFT_FEATURE].max() <= upper[table.SHIFT_FEATURE].min()
    assert files["shift"][table.EVALUATOR] == files["demo"][table.EVALUATOR]


def test_own_standardisation_uses_each_sites_own_statistics(table: ModuleType, tmp_path: Path) -> None:
    files = table.write_splits(tmp_path)["shift"]
    own = table.standardise_own(files, tmp_path / "own")
    for name, path in files.items():
        raw, scaled = read(path), read(own[name])
        features = [column for column in raw.columns if column != table.LABEL]
        assert list(scaled.columns) == list(raw.columns)
        assert (scaled[table.LABEL] == raw[table.LABEL]).all()
        np.testing.assert_allclose(scaled[features].mean(), 0.0, atol=1e-9)
        np.testing.assert_allclose(scaled[features].std(ddof=0), 1.0, rtol=1e-9)
        # Each value is its own site's z-score: the mapping is the site's, not a shared one.
        column = table.SHIFT_FEATURE
        expected = (raw[column] - raw[column].mean()) / raw[column].std(ddof=0)
        np.testing.assert_allclose(scaled[column], expected, rtol=1e-9)


def test_a_short_run_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    command = [
        sys.executable,
        str(SCRIPT),
        *("--splits", "demo", "--methods", "federated,raw", "--seeds", "1", "--rounds", "3"),
        *("--out", str(tmp_path / "files"), "--json", str(out)),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300_000 * MS, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "| split | normalisation | accuracy, mean (min-max) | recall benign | recall malignant | loss |" in (
        completed.stdout
    )
    figures = json.loads(out.read_text())
    assert figures["classes"] == ["benign", "malignant"]
    federated, raw = figures["demo"]["federated"][0], figures["demo"]["raw"][0]
    assert federated["round"] == raw["round"] == 3
    assert federated["accuracy"] > raw["accuracy"]
    for run in (federated, raw):
        assert 0.0 <= run["accuracy"] <= 1.0 and len(run["recall"]) == 2
