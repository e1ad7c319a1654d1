"""Everything that works for digits works for a user's own table, end to end over real worker processes.

Three "hospitals" hold scikit-learn's breast-cancer records as CSV files,
non-IID (hospital_c has no malignant case at all), and the evaluator holds a
test file. The workers are started once for the module; each test drives the
real coordinator command line against them and checks what a user sees (the
console, the exit status) and what it writes (metrics, the saved model's data
plan, checkpoints), against figures computed here with pandas.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, THREADS, running_workers
from safetensors import safe_open
from units import MS

from syncfed.evaluation import holdout, validation_seed
from syncfed.net.spawn import WorkerProcess

CLI_TIMEOUT = 180_000 * MS

LABEL = "diagnosis"
CLASSES = ("benign", "malignant")
TRAINERS = ("hospital_a", "hospital_b", "hospital_c")
#: Rows per hospital and the share of them that are malignant: non-IID, and hospital_c never saw a malignant case.
HOSPITALS = {"hospital_a": (110, 0.6), "hospital_b": (110, 0.4), "hospital_c": (110, 0.0)}
TEST_ROWS = 100
#: The workers' default --val-fraction: the share of a trainer's rows held out for validation.
VAL_FRACTION = 0.1

NORMALISATION = "Federated normalisation: per-feature mean and standard deviation over 3 sites"
RECALL = re.compile(r"^Federated model: Recall per class: benign (\d+\.\d)%, malignant (\d+\.\d)%$", re.MULTILINE)
FINAL = re.compile(r"^Final federated accuracy at round (\d+): (\d+\.\d\d)%$", re.MULTILINE)


def breast_cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame[LABEL] = [bunch.target_names[t] for t in bunch.target]
    return frame


def write_tables(folder: Path) -> dict[str, Path]:
    """The hospitals' files and the evaluator's ``testing.csv``, split with a seeded generator."""
    frame = breast_cancer()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frame))
    test = frame.iloc[order[:TEST_ROWS]]
    rest = frame.iloc[order[TEST_ROWS:]]
    malignant = list(rest.index[rest[LABEL] == "malignant"])
    benign = list(rest.index[rest[LABEL] == "benign"])
    files = {}
    for name, (rows, share) in HOSPITALS.items():
        sick = round(rows * share)
        chosen = malignant[:sick] + benign[: rows - sick]
        del malignant[:sick], benign[: rows - sick]
        files[name] = folder / f"{name}.csv"
        rest.loc[chosen].sample(frac=1.0, random_state=0).to_csv(files[name], index=False)
    files["testing"] = folder / "testing.csv"
    test.to_csv(files["testing"], index=False)
    return files


def worker_args(name: str, path: Path, *extra: str) -> tuple[str, list[str]]:
    role = ["--testing"] if name == "testing" else []
    return name, [*THREADS, "--data", f"csv:{path}", "--label-column", LABEL, *role, *extra]


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tables(tmp_path_factory.mktemp("hospitals"))


@pytest.fixture(scope="module")
def hospitals(tables: dict[str, Path]) -> Iterator[dict[str, WorkerProcess]]:
    """The three hospitals (each holding out its default 10% for validation) and the evaluator."""
    with running_workers([worker_args(name, path) for name, path in tables.items()]) as workers:
        yield workers


def endpoints(workers: dict[str, WorkerProcess], trainers: dict[str, WorkerProcess] | None = None) -> list[str]:
    """``--workers`` and ``--evaluator`` for the hospitals (some replaced by ``trainers``) and the evaluator."""
    listed = {name: workers[name].uri for name in TRAINERS} | {n: w.uri for n, w in (trainers or {}).items()}
    line = ",".join(f"{name}={uri}" for name, uri in listed.items())
    return ["--workers", line, "--evaluator", f"testing={workers['testing'].uri}"]


def run_cli(*arguments: str, program: str = "run_websocket_client.py") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, program, *arguments], cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def train(workers: dict[str, WorkerProcess], *arguments: str, rounds: int = 4) -> subprocess.CompletedProcess[str]:
    """A run of ``rounds`` rounds, evaluated at the first and the last; it must succeed."""
    done = run_cli(
        *endpoints(workers), "--training-rounds", str(rounds), "--eval-every", str(rounds), "--no-progress", *arguments
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def saved_plan(path: Path) -> dict[str, Any]:
    """The data plan a saved model records in its safetensors metadata."""
    with safe_open(str(path), framework="np") as handle:
        return json.loads(handle.metadata()["data_plan"])


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_accuracy(stdout: str) -> float:
    match = FINAL.search(stdout)
    assert match, stdout
    return float(match[2]) / 100


def trained_rows(tables: dict[str, Path]) -> pd.DataFrame:
    """The rows the trainers train on, pooled: each hospital's file less its validation hold-out, which the
    worker draws with the seed of its id (syncfed.evaluation.validation_seed) and never trains on."""
    parts = []
    for name in TRAINERS:
        frame = pd.read_csv(tables[name])
        train, _ = holdout(len(frame), VAL_FRACTION, np.random.default_rng(validation_seed(name)))
        parts.append(frame.iloc[train])
    return pd.concat(parts)


def plan_statistics(plan: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({"mean": plan["mean"], "std": plan["std"]}, index=plan["features"])


# -- 1. A plain run ------------------------------------------------------------------------------------


def test_a_plain_run_prints_recall_by_class_name_and_standardises_with_the_pooled_statistics(
    hospitals: dict[str, WorkerProcess], tables: dict[str, Path], tmp_path: Path
) -> None:
    metrics, model = tmp_path / "metrics.jsonl", tmp_path / "model.safetensors"
    done = train(hospitals, "--metrics-out", str(metrics), "--save-model", str(model), rounds=5)
    lines = done.stdout.splitlines()
    assert lines[0] == NORMALISATION
    assert len(RECALL.findall(done.stdout)) == 2  # rounds 1 and 5
    assert not [line for line in lines if "Percentage numbers" in line]

    test = pd.read_csv(tables["testing"])
    counts = [int((test[LABEL] == name).sum()) for name in CLASSES]
    evals = [event for event in read_events(metrics) if event["event"] == "eval" and event["model"] == "federated"]
    assert [event["round"] for event in evals] == [1, 5]
    for event in evals:
        assert event["class_counts"] == counts and sum(event["class_correct"]) == event["correct"]
    last_recall = RECALL.findall(done.stdout)[-1]
    shown = [float(percent) for percent in last_recall]
    assert shown == [round(100 * c / n, 1) for c, n in zip(evals[-1]["class_correct"], counts, strict=True)]
    chance = max(counts) / sum(counts)  # always answering the majority class
    assert final_accuracy(done.stdout) == pytest.approx(evals[-1]["accuracy"], abs=5e-5)
    assert evals[-1]["accuracy"] >= min(0.85, chance + 0.2), (evals[-1], chance)

    plan = saved_plan(model)
    assert plan["kind"] == "table" and plan["classes"] == list(CLASSES)
    assert plan["input_shape"] == [30] and sorted(plan["features"]) == plan["features"]
    # The workers hold a table's values as float32, the model's input type; the moments are then taken in float64.
    pooled = trained_rows(tables)[plan["features"]].astype(np.float32).astype(np.float64)
    agreed = plan_statistics(plan)
    np.testing.assert_allclose(agreed["mean"], pooled.mean(), rtol=1e-9)
    np.testing.assert_allclose(agreed["std"], pooled.std(ddof=0), rtol=1e-9)
    # Not over the validation rows too: those are held out of every use in training.
    everything = pd.concat([pd.read_csv(tables[name]) for name in TRAINERS])[plan["features"]]
    assert not np.allclose(agreed["mean"], everything.mean(), rtol=1e-6)


# -- 2. Evaluation at the sites ---------------------------------------------------------------------------


def validation_counts(tables: dict[str, Path], name: str) -> list[int]:
    """Examples of each class among the rows ``name`` holds out for validation."""
    frame = pd.read_csv(tables[name])
    _, held = holdout(len(frame), VAL_FRACTION, np.random.default_rng(validation_seed(name)))
    return [int((frame.iloc[held][LABEL] == label).sum()) for label in CLASSES]


def test_federated_evaluation_and_cross_site_validation_score_each_sites_validation_rows(
    hospitals: dict[str, WorkerProcess], tables: dict[str, Path], tmp_path: Path
) -> None:
    metrics, cross = tmp_path / "metrics.jsonl", tmp_path / "cross-site"
    arguments = ["--federated-eval", "--cross-site-validation", "--cross-site-out", str(cross)]
    done = train(hospitals, *arguments, "--metrics-out", str(metrics), rounds=3)
    lines = done.stdout.splitlines()
    counts = {name: validation_counts(tables, name) for name in TRAINERS}
    assert counts["hospital_c"][1] == 0  # its validation rows, like all its rows, are benign
    assert "Federated evaluation at round 3/3 (validation splits):" in lines
    for name in TRAINERS:
        site = rf"Site {name}: Average loss: \d+\.\d{{4}}, Accuracy: \d+/{sum(counts[name])} \(\d+\.\d\d%\)"
        assert len([line for line in lines if re.fullmatch(site, line)]) == 2, site
    recall = r"Weighted average over 3 sites: Recall per class: benign \d+\.\d%, malignant \d+\.\d%"
    assert len([line for line in lines if re.fullmatch(recall, line)]) == 2

    events = read_events(metrics)
    sites = [event["sites"] for event in events if event["event"] == "federated_eval"]
    assert len(sites) == 2
    for scores in sites:
        assert {name: scores[name]["class_counts"] for name in TRAINERS} == counts

    (matrix,) = [event for event in events if event["event"] == "cross_site"]
    assert json.loads((cross / "cross_site.json").read_text()) == {k: v for k, v in matrix.items() if k != "event"}
    assert matrix["models"] == [*TRAINERS, "federated"] and matrix["sites"] == [*TRAINERS, "testing"]
    assert matrix["splits"] == ["validation"] * 3 + ["test"]
    test = pd.read_csv(tables["testing"])
    expected = [*counts.values(), [int((test[LABEL] == label).sum()) for label in CLASSES]]
    for row in matrix["cells"]:
        assert [cell["class_counts"] for cell in row] == expected
    assert (cross / "cross_site.png").stat().st_size > 0


# -- 3. Secure aggregation and differential privacy ---------------------------------------------------------

#: Two roundings of each value in float32 (syncfed/data/normalization.py, "Error bounds").
U = 2.0**-22


def secure_error(largest: int, value_range: tuple[float, float]) -> float:
    """``e``: a secure feature-stats round's bound on each decoded sum, for the three hospitals' 30 values."""
    from syncfed.analytics import secure_clip
    from syncfed.masking import Quantizer
    from syncfed.protocol import Query

    clip = secure_clip(Query("feature-stats", tuple(range(30)), value_range=value_range), largest, 30, 3)
    return Quantizer(3, clip, bits=64, max_count=1).error_bound


def test_secure_aggregation_agrees_on_the_statistics_within_the_documented_bound_and_trains(
    hospitals: dict[str, WorkerProcess], tables: dict[str, Path], tmp_path: Path
) -> None:
    from syncfed.data.normalization import REFINE_RANGE, coarse_range

    metrics, model = tmp_path / "metrics.jsonl", tmp_path / "model.safetensors"
    done = train(hospitals, "--secure-agg", "--metrics-out", str(metrics), "--save-model", str(model))
    first, second = done.stdout.splitlines()[:2]
    assert first.startswith("Secure aggregation: the coordinator learns only the sum") and "from 3 workers" in first
    assert second == f"{NORMALISATION} (secure sums)"
    rounds = [event for event in read_events(metrics) if event["event"] == "round"]
    assert [event["privacy"]["secure_agg"]["summed"] for event in rounds] == [3] * 4
    assert "train_loss" not in rounds[0]  # only the sum of the updates was learnt
    assert final_accuracy(done.stdout) >= 0.85

    # The bound of normalization.py's docstring, with the coarse statistics (unknown here) bounded as it
    # allows: s1 at most the true std plus the square root of pass 1's variance error, |m2| <= 1, s2 <= 2.
    plan = plan_statistics(saved_plan(model))
    pooled = trained_rows(tables)[list(plan.index)].astype(np.float32).astype(np.float64)
    mean, std, n = pooled.mean(), pooled.std(ddof=0), len(pooled)
    largest = max(len(pd.read_csv(tables[name])) - round(VAL_FRACTION * 110) for name in TRAINERS)
    eps1 = secure_error(largest, coarse_range(largest, 30, 3)) / n
    eps2 = secure_error(largest, REFINE_RANGE) / n
    s1 = std + np.sqrt(eps1 * (1 + 2 * mean.abs() + eps1))
    e2 = eps2 * (1 + 2 + eps2) + 2 * U * (1 + 4)
    np.testing.assert_array_less((plan["mean"] - mean).abs(), s1 * (eps2 + U * 3))
    np.testing.assert_array_less((plan["std"] - std).abs(), s1 * np.sqrt(e2))
    assert ((plan["mean"] - mean).abs() > 0).any()  # secure sums are not exact: this is not the plain path


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_differential_privacy_trains_over_own_data_and_accounts_for_each_round(
    hospitals: dict[str, WorkerProcess], mode: str, tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    done = train(hospitals, "--dp", mode, "--dp-noise-multiplier", "0.3", "--metrics-out", str(metrics), rounds=3)
    spent = re.findall(r"^Round (\d): privacy spent epsilon (\d+\.\d+) at delta 1e-05$", done.stdout, re.MULTILINE)
    assert [int(round_) for round_, _ in spent] == [1, 2, 3]
    epsilons = [float(epsilon) for _, epsilon in spent]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert len(RECALL.findall(done.stdout)) == 2
    rounds = [event for event in read_events(metrics) if event["event"] == "round"]
    assert [event["privacy"]["dp"] for event in rounds] == [mode] * 3
    assert [event["privacy"]["epsilon"] for event in rounds] == pytest.approx(epsilons, abs=5e-4)


# -- 4. Checkpoints and resume -------------------------------------------------------------------------------

CANNOT_RESUME = (
    "run_websocket_client.py: error: cannot resume: the workers' data no longer agree with the checkpointed run's"
    " (classes, features, categories or input shape changed); use another --checkpoint-dir to start a new run\n"
)


def test_a_resumed_run_keeps_the_checkpointed_plan_and_refuses_data_with_other_classes(
    hospitals: dict[str, WorkerProcess], tables: dict[str, Path], tmp_path: Path
) -> None:
    checkpoints, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    first, resumed = tmp_path / "first.safetensors", tmp_path / "resumed.safetensors"
    common = ["--checkpoint-dir", str(checkpoints), "--metrics-out", str(metrics)]
    train(hospitals, *common, "--save-model", str(first), rounds=2)

    # hospital_a comes back with other values (same classes and columns), hospital_c with a third class.
    frame = pd.read_csv(tables["hospital_a"])
    numeric = frame.columns.drop(LABEL)
    frame[numeric] = frame[numeric] * 3.0 + 1.0
    rescaled = tmp_path / "hospital_a.csv"
    frame.to_csv(rescaled, index=False)
    frame = pd.read_csv(tables["hospital_c"])
    frame.loc[frame.index[:12], LABEL] = "borderline"
    relabelled = tmp_path / "hospital_c.csv"
    frame.to_csv(relabelled, index=False)
    plan = [worker_args("hospital_a", rescaled), worker_args("hospital_c", relabelled)]
    with running_workers(plan) as changed:
        rounds = ["--training-rounds", "4", "--eval-every", "4", "--no-progress"]
        again = run_cli(
            *endpoints(hospitals, {"hospital_a": changed["hospital_a"]}),
            *rounds,
            *common,
            "--resume",
            "--save-model",
            str(resumed),
        )
        assert again.returncode == 0, again.stdout + again.stderr
        lines = again.stdout.splitlines()
        assert lines[0] == f"Resuming after round 2 from {checkpoints}"
        assert NORMALISATION not in again.stdout  # the statistics are the checkpoint's, not agreed again
        assert [line.split(" done")[0] for line in lines if " done in " in line] == ["Round 3/4", "Round 4/4"]
        assert saved_plan(resumed) == saved_plan(first)
        events = read_events(metrics)
        assert [event["round"] for event in events if event["event"] == "round"] == [1, 2, 3, 4]

        refused = run_cli(*endpoints(hospitals, {"hospital_c": changed["hospital_c"]}), *rounds, *common, "--resume")
        assert (refused.returncode, refused.stderr) == (9, CANNOT_RESUME)  # CheckpointError's status

    # Statistics agreed again over the rescaled hospital_a would have differed from the checkpoint's.
    agreed = plan_statistics(saved_plan(first))
    again_pooled = trained_rows({**tables, "hospital_a": rescaled})[list(agreed.index)]
    assert not np.allclose(agreed["mean"], again_pooled.mean(), rtol=1e-3)


# -- 6. Status and analytics ---------------------------------------------------------------------------------


def test_status_names_each_sites_classes(hospitals: dict[str, WorkerProcess], tables: dict[str, Path]) -> None:
    done = run_cli(*endpoints(hospitals), "--status")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert sorted(rows) == sorted([*TRAINERS, "testing"])
    for name in TRAINERS:
        frame = pd.read_csv(tables[name])
        train_rows, _ = holdout(len(frame), VAL_FRACTION, np.random.default_rng(validation_seed(name)))
        labels = frame.iloc[train_rows][LABEL]
        held = " ".join(f"{label}:{(labels == label).sum()}" for label in CLASSES if (labels == label).any())
        assert f"  table    {len(train_rows)} " in rows[name] and f" {held} " in rows[name], rows[name]
    assert "malignant" not in rows["hospital_c"]
    test = pd.read_csv(tables["testing"])[LABEL]
    assert f" benign:{(test == 'benign').sum()} malignant:{(test == 'malignant').sum()} " in rows["testing"]


def analytics(workers: dict[str, WorkerProcess], *arguments: str) -> subprocess.CompletedProcess[str]:
    listed = ",".join(f"{name}={workers[name].uri}" for name in TRAINERS)
    done = run_cli("syncfed", "analytics", "--workers", listed, *arguments, program="-m")
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-agg"])
def test_analytics_count_the_union_of_classes_and_describe_the_encoded_unstandardised_features(
    hospitals: dict[str, WorkerProcess], tables: dict[str, Path], tmp_path: Path, secure: bool
) -> None:
    flags = ["--secure-agg"] if secure else []
    pooled = trained_rows(tables)
    histogram = analytics(hospitals, *flags, "--json", str(tmp_path / "labels.json"), "label-histogram")
    rows = {line.split()[0]: line.split()[1:] for line in histogram.stdout.splitlines() if line.split()}
    totals = [int((pooled[LABEL] == label).sum()) for label in CLASSES]
    for label, total in zip(CLASSES, totals, strict=True):
        assert rows[label][-1] == str(total)
    if not secure:
        assert rows["label"] == [*TRAINERS, "total"] and rows["malignant"][2] == "0"  # hospital_c: none
    assert json.loads((tmp_path / "labels.json").read_text())["total"] == totals

    clip = ["--clip-range", "-4096", "4096"] if secure else []
    stats = analytics(hospitals, *flags, "--json", str(tmp_path / "stats.json"), "feature-stats", *clip)
    assert stats.stdout.startswith(f"feature-stats over {len(pooled)} examples of 3 workers")
    features = sorted(pooled.columns.drop(LABEL))  # the plan's order: by name
    values = pooled[features].astype(np.float32).astype(np.float64)
    saved = json.loads((tmp_path / "stats.json").read_text())
    answer = saved["features"]
    assert [entry["feature"] for entry in answer] == [*map(str, range(30)), "all"]
    mean = np.array([entry["mean"] for entry in answer[:30]])
    variance = np.array([entry["variance"] for entry in answer[:30]])
    if not secure:
        np.testing.assert_allclose(mean, values.mean(), rtol=1e-9)
        np.testing.assert_allclose(variance, values.var(ddof=0), rtol=1e-9)
        return
    # The workers clip to the range (worst area passes 4096), and each decoded sum is within the round's bound.
    clipped = values.clip(-4096, 4096)
    assert (clipped != values).any().any()
    eps = saved["secure_agg"]["sum_error_bound"] / len(pooled)
    assert 0 < eps < 1e-3
    np.testing.assert_array_less(np.abs(mean - clipped.mean()), eps * (1 + 1e-9))
    np.testing.assert_array_less(np.abs(variance - clipped.var(ddof=0)), eps * (1 + 2 * clipped.abs().mean() + eps))
