"""scripts/task_tables.py: the diabetes clinics it trains on, and a short real run of its binary and regression tables.

The README's "Your own task" tables come from this script; these tests hold
it to what the README says: the clinics are the training records cut into
thirds by body-mass index with a continuous label, the centralized site holds
every site's records, and a few rounds over real workers already order the
rows as the bars need (federated above the worst site alone, R² positive).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
from conftest import REPO
from programs import script_module
from units import MS

SCRIPT = REPO / "scripts" / "task_tables.py"


@pytest.fixture(scope="module")
def tables() -> Iterator[ModuleType]:
    """The script as a module, registered while in use."""
    with script_module("task_tables") as module:
        yield module


def test_diabetes_clinics_are_thirds_by_bmi_with_a_continuous_label(tables: ModuleType, tmp_path: Path) -> None:
    counts = tables.write_diabetes(tmp_path)
    clinics = [pd.read_csv(tmp_path / f"{name}.csv") for name in tables.CLINICS]
    test = pd.read_csv(tmp_path / "test.csv")
    assert sum(len(part) for part in clinics) + len(test) == 442
    assert counts == {**{name: len(part) for name, part in zip(tables.CLINICS, clinics, strict=True)}, "test": 89}
    for lower, upper in zip(clinics, clinics[1:], strict=False):
        assert lower["bmi"].max() <= upper["bmi"].min()
    # Non-IID in the label too: the clinics' mean progression rises with their body-mass index.
    means = [part[tables.DIABETES_LABEL].mean() for part in clinics]
    assert means == sorted(means) and means[0] < means[-1]
    assert test[tables.DIABETES_LABEL].dtype.kind == "f" and test[tables.DIABETES_LABEL].nunique() > 50


def test_the_centralized_site_holds_every_sites_records(tables: ModuleType, tmp_path: Path) -> None:
    tables.write_diabetes(tmp_path)
    files = tables.table_files(tmp_path, tables.CLINICS)
    assert set(files) == {*tables.CLINICS, tables.CENTRALIZED, tables.EVALUATOR}
    merged = pd.read_csv(files[tables.CENTRALIZED].removeprefix("csv:"))
    parts = pd.concat([pd.read_csv(tmp_path / f"{name}.csv") for name in tables.CLINICS], ignore_index=True)
    pd.testing.assert_frame_equal(merged, parts)


def test_a_short_run_orders_the_rows_as_the_bars_need(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    command = [
        sys.executable,
        str(SCRIPT),
        *("--tables", "binary,regression", "--rounds", "5", "--seed", "1"),
        *("--out", str(tmp_path / "files"), "--json", str(out)),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300_000 * MS, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "| trained on | ROC AUC | PR AUC | sensitivity | specificity |" in completed.stdout
    assert "| trained on | R² | MAE | RMSE |" in completed.stdout
    figures = json.loads(out.read_text())
    binary, regression = figures["binary"], figures["regression"]
    assert list(binary) == ["federated", "centralized", "hospital_a", "hospital_b", "hospital_c"]
    assert all(run["round"] == 5 and "error" not in run for run in [*binary.values(), *regression.values()])
    alone = [binary[name]["auc"] for name in ("hospital_a", "hospital_b", "hospital_c")]
    assert binary["federated"]["auc"] > min(alone)
    assert abs(binary["federated"]["auc"] - binary["centralized"]["auc"]) < 0.03
    clinics = [regression[name]["r2"] for name in ("clinic_a", "clinic_b", "clinic_c")]
    assert regression["federated"]["r2"] > 0 and regression["centralized"]["r2"] > 0
    assert regression["federated"]["r2"] > min(clinics)
    # MAE is in the target's own units (progression spans about 25 to 346), not standardised ones.
    assert 20 < regression["federated"]["mae"] < 100
