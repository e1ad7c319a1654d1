"""The coordinator runs the task the data call for, end to end over real worker processes.

Three sites hold scikit-learn's breast-cancer records (binary) or its
diabetes records (regression) as CSV files, and the evaluator a test file;
each test drives the real coordinator command line (spawning the sites with
``--site``) and checks what a user sees and what it writes. The refusals need
no training; the runs need workers that train with a recipe and return
metric sums (the worker side of issue 17).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from safetensors import safe_open
from units import MS

from syncfed.evaluation import holdout, validation_seed

CLI_TIMEOUT = 240_000 * MS
SITES = ("north", "south", "east")
VAL_FRACTION = 0.1  # the workers' default hold-out, never trained on
AUC = re.compile(
    r"^Federated model: AUC (\d\.\d+), PR AUC (\d\.\d+), sensitivity ([\d.]+)%, specificity ([\d.]+)%$", re.M
)
REGRESSION = re.compile(
    r"^Federated model: MAE ([\d.]+)( points| \(progression\)), RMSE ([\d.]+)( points)?, R² (-?[\d.e-]+)$", re.M
)
TARGET = re.compile(r"^Regression target: mean ([-\d.e+]+), standard deviation ([\d.e+]+) over 3 sites", re.M)


def write_sites(folder: Path, frame: pd.DataFrame) -> dict[str, Path]:
    """Three sites and the evaluator's ``testing.csv`` from ``frame``, split with a seeded generator."""
    order = np.random.default_rng(0).permutation(len(frame))
    parts = np.array_split(order, len(SITES) + 1)
    files = {}
    for name, rows in zip(("testing", *SITES), parts, strict=True):
        files[name] = folder / f"{name}.csv"
        frame.iloc[rows].to_csv(files[name], index=False)
    return files


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["diagnosis"] = [bunch.target_names[t] for t in bunch.target]
    return write_sites(tmp_path_factory.mktemp("cancer"), frame)


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    return write_sites(tmp_path_factory.mktemp("diabetes"), frame)


def sites(files: dict[str, Path], label: str, *flags: str) -> list[str]:
    return [
        arg
        for name, path in files.items()
        for arg in ("--site", f"{name}=csv:{path} --label-column {label} {' '.join(flags)}")
    ]


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "run_websocket_client.py", "--no-progress", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    return [event for line in path.read_text().splitlines() if (event := json.loads(line))["event"] == kind]


# -- Refused before training -------------------------------------------------------------------------


def test_a_loss_of_another_task_is_refused_before_any_worker_is_contacted() -> None:
    done = run("--task", "binary", "--loss", "mse", "--workers", "a=ws://localhost:9", "--evaluator", "")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "run_websocket_client.py: error: --loss mse goes with --task regression, not --task binary"
    )


def test_a_regression_over_classes_is_refused_at_the_handshake(cancer: dict[str, Path]) -> None:
    done = run(*sites(cancer, "diagnosis"), "--task", "regression", "--training-rounds", "1")
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stderr.strip().endswith(
        "--task regression cannot train on the workers' data: a regression task needs a continuous label, not 2 classes"
    )


def test_initial_weights_of_the_wrong_shapes_are_refused_in_one_line(cancer: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    weights = tmp_path / "other.safetensors"
    save_file({"layers.0.weight": np.zeros((3, 3), dtype=np.float32)}, str(weights))
    done = run(*sites(cancer, "diagnosis"), "--initial-weights", str(weights), "--training-rounds", "1")
    assert done.returncode == 3, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"initial weights {weights}: " in done.stderr


# -- Runs (they need the worker side of issue 17) -------------------------------------------------------


def test_auto_trains_a_binary_task_and_reports_its_auc(cancer: dict[str, Path], tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    done = run(
        *sites(cancer, "diagnosis"),
        "--training-rounds",
        "5",
        "--eval-every",
        "5",
        "--lr",
        "0.05",
        "--federated-eval",
        "--metrics-out",
        str(metrics),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    headline = AUC.findall(done.stdout)
    assert headline, done.stdout
    last = [event for event in events(metrics, "eval") if event["model"] == "federated"][-1]
    assert f"{last['auc']:.3g}" == headline[-1][0] and last["auc_bound"] == 0.0  # the evaluator's exact AUC
    assert last["auc"] > 0.9 and 0 <= last["sensitivity"] <= 1 and 0 <= last["specificity"] <= 1
    average = events(metrics, "federated_eval")[-1]["average"]
    assert average["auc_bound"] >= 0 and abs(average["auc"] - last["auc"]) < 0.2  # pooled histograms of 3 sites
    assert "Federated model: Recall per class: benign" in done.stdout
    best = run_models(tmp_path / "registry", "best", "auc")
    assert best.returncode == 0 and "auc" in best.stdout


def run_models(registry: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncfed", "models", "--registry", str(registry), *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def trained_targets(files: dict[str, Path], label: str) -> np.ndarray:
    """The targets the sites train on: each file less the validation rows its worker holds out."""
    parts = []
    for name in SITES:
        frame = pd.read_csv(files[name])
        rows, _ = holdout(len(frame), VAL_FRACTION, np.random.default_rng(validation_seed(name)))
        parts.append(frame[label].to_numpy()[rows])
    return np.concatenate(parts).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-agg"])
def test_auto_trains_a_regression_on_the_federated_target_scale(
    diabetes: dict[str, Path], tmp_path: Path, secure: bool
) -> None:
    model = tmp_path / "model.safetensors"
    metrics = tmp_path / "metrics.jsonl"
    # Under --secure-agg no site's own model is known; plain, the cross-site table shows MAE in the target's units.
    privacy = ["--secure-agg"] if secure else ["--target-units", "points", "--cross-site-validation"]
    done = run(
        *sites(diabetes, "progression", "--label-type", "continuous"),
        "--training-rounds",
        "5",
        "--eval-every",
        "5",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--metrics-out",
        str(metrics),
        "--save-model",
        str(model),
        *privacy,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    targets = trained_targets(diabetes, "progression")
    scale = TARGET.search(done.stdout)
    assert scale, done.stdout
    assert float(scale[1]) == pytest.approx(targets.mean(), rel=1e-5)
    assert float(scale[2]) == pytest.approx(targets.std(), rel=1e-5)
    with safe_open(str(model), framework="np") as handle:
        recipe = json.loads(handle.metadata()["recipe"])
    assert recipe["task"] == "regression" and recipe["target_mean"] == pytest.approx(targets.mean(), rel=1e-6)
    last = events(metrics, "eval")[-1]
    assert "accuracy" not in last and last["rmse"] == pytest.approx(np.sqrt(last["mse"]))
    shown = [*REGRESSION.finditer(done.stdout)][-1]  # the last evaluation's
    assert "Final federated model at round 5: MAE" in done.stdout, done.stdout
    if secure:  # no units given: the agreed label column names the error
        assert (shown[2], shown[4], "target_units" in last) == (" (progression)", None, False)
        return
    assert (shown[2], shown[4], last["target_units"]) == (" points", " points", "points")
    assert "Cross-site validation after round 5 (MAE in points; rows: models, columns: data):" in done.stdout
    table = json.loads((tmp_path / "cross-site" / "cross_site.json").read_text())
    federated = table["cells"][table["models"].index("federated")][table["sites"].index("testing")]
    assert f"{federated['mae']:.4g}" == shown[1] and federated["target_units"] == "points"
    row = next(line for line in done.stdout.splitlines() if line.startswith("federated "))
    assert row.split()[-1] == shown[1]  # the evaluator's column: the federated model's MAE, as in its headline
