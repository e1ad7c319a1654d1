"""End-to-end: a coordinator trains over real worker processes on 127.0.0.1.

The workers are the session's processes from ``conftest.py`` (digits data,
the classic demo's shards: alice 0-3, bob 4-6, charlie 7-9, and the evaluator
testing); the command-line runs spawn their own.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, TRAINERS, assert_same_weights, config, independent_score, run
from safetensors import safe_open
from safetensors.numpy import load_file
from units import MS

from syncfed.coordinator import Coordinator, RunResult, plan_seed
from syncfed.models import DigitsCNN, MnistCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import Fit, FitResult, Hello, TrainingPlan

DIGITS_TEST_SIZE = 360  # 20% of scikit-learn's 1,797 digits
CLI_TIMEOUT = 150_000 * MS  # one command-line run, spawning included
MNIST_TEST = 20  # test images in conftest's tiny MNIST


def assert_scores_as_reported(weights: dict[str, np.ndarray], reported_correct: int) -> None:
    """The model scores what the evaluator reported for it, within one example: a near tie
    may fall the other way with another thread count, a damaged model misses by dozens."""
    correct, total = independent_score(weights)
    assert total == DIGITS_TEST_SIZE
    assert abs(correct - reported_correct) <= 1, (
        f"the model scores {correct}/{total}, the run reported {reported_correct}"
    )


@dataclass
class Run:
    result: RunResult
    metrics: Path
    model: Path
    report: list[str]


@pytest.fixture(scope="module")
def three_rounds(digits_workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Three rounds of FedAvg with evaluation every round, metrics and the saved model."""
    out = tmp_path_factory.mktemp("three-rounds")
    report: list[str] = []
    settings = config(
        digits_workers,
        training_rounds=3,
        eval_every=1,
        metrics_out=out / "metrics.jsonl",
        save_model=out / "model.safetensors",
    )
    result = run(Coordinator(settings, report=report.append).run())
    return Run(result, out / "metrics.jsonl", out / "model.safetensors", report)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_federated_accuracy_improves_over_round_one(three_rounds: Run) -> None:
    result = three_rounds.result
    first, last = result.accuracy(1), result.accuracy(3)
    assert last > first, f"federated accuracy fell from {first:.2%} at round 1 to {last:.2%} at round 3"
    # Each shard holds at most 4 of the 10 classes, so no worker's own model can pass 40%:
    # the federated model must have learned from all of them.
    assert last > 0.4
    assert last > max(result.accuracy(3, name) for name in TRAINERS)
    # The returned model is the one that was evaluated: checked here, independently of the evaluator.
    reported = next(e.result for e in result.evaluations if e.round == 3 and e.model == "federated")
    assert_scores_as_reported(result.weights, reported.correct)
    assert [record.round for record in result.rounds] == [1, 2, 3]
    assert all(record.workers == TRAINERS for record in result.rounds)
    assert result.model == "digits-cnn"


def test_metrics_lines_have_the_documented_fields(three_rounds: Run) -> None:
    events = read_metrics(three_rounds.metrics)
    rounds = [event for event in events if event["event"] == "round"]
    evals = [event for event in events if event["event"] == "eval"]
    assert len(rounds) + len(evals) == len(events), "only round and eval events are written"

    assert [event["round"] for event in rounds] == [1, 2, 3]
    for event in rounds:
        assert {"event", "round", "workers", "seconds"} <= set(event)
        assert event["workers"] == list(TRAINERS)
        assert isinstance(event["seconds"], float) and event["seconds"] > 0

    assert sorted({event["round"] for event in evals}) == [1, 2, 3]
    for round_number in (1, 2, 3):
        models = sorted(event["model"] for event in evals if event["round"] == round_number)
        assert models == sorted(["federated", *TRAINERS])
    for event in evals:
        assert {"event", "round", "model", "accuracy", "loss", "n"} <= set(event)
        assert event["n"] == DIGITS_TEST_SIZE
        assert 0.0 <= event["accuracy"] <= 1.0
        assert math.isfinite(event["loss"]) and event["loss"] > 0
        expected = three_rounds.result.accuracy(event["round"], event["model"])
        assert event["accuracy"] == pytest.approx(expected)

    # Each round's line comes before the evaluations of that round.
    order = [(event["round"], event["event"]) for event in events]
    for round_number in (1, 2, 3):
        assert order.index((round_number, "round")) < order.index((round_number, "eval"))


def test_report_names_each_model_per_evaluated_round(three_rounds: Run) -> None:
    report = three_rounds.report
    for round_number in (1, 2, 3):
        assert f"Evaluation at round {round_number}/3:" in report
    federated = [
        line
        for line in report
        if re.fullmatch(r"Federated model: Percentage numbers 0-3: \d+%, 4-6: \d+%, 7-9: \d+%", line)
    ]
    assert len(federated) == 3
    for name in TRAINERS:
        assert sum(line.startswith(f"Model update {name}: Average loss: ") for line in report) == 3


@pytest.mark.parametrize("cross_site", [False, True], ids=["updates-folded", "updates-kept-for-cross-site"])
def test_eval_global_only_scores_the_global_model_alone_and_trains_the_same_model(
    digits_workers: dict[str, WorkerProcess], three_rounds: Run, tmp_path: Path, cross_site: bool
) -> None:
    """--eval-global-only: one score per evaluation, the federated model's, with the same figures and the same
    model as a run that scores every update too (three_rounds: same workers, seeds and rounds). Cross-site
    validation keeps each round's updates for its matrix: the evaluator must still not score them."""
    report: list[str] = []
    settings = config(
        digits_workers,
        training_rounds=3,
        eval_every=1,
        score_updates=False,
        cross_site_validation=cross_site,
        cross_site_out=tmp_path / "cross-site",
    )
    result = run(Coordinator(settings, report=report.append).run())
    assert [(record.round, record.model) for record in result.evaluations] == [(n, "federated") for n in (1, 2, 3)]
    assert not any(line.startswith("Model update") for line in report)
    assert [line for line in report if line.startswith("Federated model: ")] == [
        line for line in three_rounds.report if line.startswith("Federated model: ")
    ]
    assert_same_weights(result.weights, three_rounds.result.weights)


def test_saved_model_matches_the_result(three_rounds: Run) -> None:
    path = three_rounds.model
    assert path.is_file()
    assert not path.with_name(path.name + ".part").exists()
    assert_same_weights(load_file(str(path)), three_rounds.result.weights)
    with safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == {"format": "pt", "model": "digits-cnn"}
    shapes = {name: tuple(array.shape) for name, array in get_weights(DigitsCNN()).items()}
    assert {name: array.shape for name, array in three_rounds.result.weights.items()} == shapes


def test_same_seed_gives_identical_weights(digits_workers: dict[str, WorkerProcess], three_rounds: Run) -> None:
    # No evaluator this time: evaluation must not change what is trained.
    again = run(Coordinator(config(digits_workers, evaluator=False, training_rounds=3), report=lambda _: None).run())
    assert_same_weights(again.weights, three_rounds.result.weights)

    # Bit-identical weights could still be identically damaged: they must score what the first run reported.
    reported = next(e.result for e in three_rounds.result.evaluations if e.round == 3 and e.model == "federated")
    assert_scores_as_reported(again.weights, reported.correct)

    torch.manual_seed(1)
    initial = get_weights(DigitsCNN())
    unchanged = [name for name in initial if np.array_equal(initial[name], again.weights[name])]
    assert not unchanged, f"nothing was trained in {unchanged}"

    # The seed matters: another one gives other weights in every tensor.
    other = run(
        Coordinator(config(digits_workers, evaluator=False, training_rounds=3, seed=2), report=lambda _: None).run()
    )
    same = [name for name in other.weights if np.array_equal(other.weights[name], again.weights[name])]
    assert not same, f"seeds 1 and 2 gave the same {same}"


def test_mean_and_fedavg_aggregate_what_the_workers_return(digits_workers: dict[str, WorkerProcess]) -> None:
    """One round of each agrees with numpy over the very updates the workers give for the same plans."""
    settings = config(digits_workers, evaluator=False, training_rounds=1, seed=7)
    torch.manual_seed(settings.seed)
    initial = get_weights(DigitsCNN())

    async def updates() -> list[FitResult]:
        async def fit(index: int, name: str) -> FitResult:
            plan = TrainingPlan(
                round=1,
                batch_size=settings.batch_size,
                num_batches=settings.federate_after_n_batches,
                lr=settings.learning_rate(1),
                seed=plan_seed(settings.seed, 1, index),
            )
            async with WorkerLink(
                name, settings.workers[name], max_message_size=2**30, connect_timeout=10_000 * MS
            ) as client:
                await client.request(Hello())
                reply = await client.request(Fit("digits-cnn", initial, plan), timeout=60_000 * MS)
            assert isinstance(reply, FitResult)
            return reply

        return list(await asyncio.gather(*(fit(index, name) for index, name in enumerate(TRAINERS))))

    results = run(updates())
    counts = [result.num_examples for result in results]
    assert counts == [518, 391, 383]  # the classic shards of the digits training split, less 10% for validation

    fedavg = run(Coordinator(settings, report=lambda _: None).run()).weights
    mean = run(Coordinator(replace(settings, strategy="mean"), report=lambda _: None).run()).weights

    differs = False
    for name in initial:
        stack = np.stack([result.weights[name].astype(np.float64) for result in results])
        weighted = np.average(stack, axis=0, weights=counts)
        plain = np.mean(stack, axis=0)
        assert fedavg[name].dtype == mean[name].dtype == np.float32
        np.testing.assert_allclose(fedavg[name], weighted, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(mean[name], plain, rtol=1e-5, atol=1e-6, err_msg=name)
        differs |= not np.allclose(mean[name], weighted, rtol=1e-3, atol=1e-5)
    assert differs, "mean and fedavg gave the same model although the shards differ in size"


def run_cli(arguments: list[str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_websocket_client.py", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


EVAL_LINE = re.compile(r"Federated model: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/(\d+) \((\d+\.\d{2})%\)")
SHARES_LINE = re.compile(r"Federated model: Percentage numbers 0-3: (\d+)%, 4-6: (\d+)%, 7-9: (\d+)%")


def test_cli_spawns_workers_and_trains(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    # Flags with underscores and with dashes, as the classic demo's users type them.
    done = run_cli(["--spawn-workers", "--training_rounds", "2", "--eval_every", "1", "--metrics-out", str(metrics)])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()

    shares = [match for line in lines if (match := SHARES_LINE.fullmatch(line))]
    assert len(shares) == 2
    for match in shares:
        assert 97 <= sum(int(group) for group in match.groups()) <= 103  # rounded shares of all predictions

    evals = [match for line in lines if (match := EVAL_LINE.fullmatch(line))]
    assert len(evals) == 2
    for match in evals:
        loss, correct, total, percent = float(match[1]), int(match[2]), int(match[3]), float(match[4])
        assert total == DIGITS_TEST_SIZE and 0 <= correct <= total and loss > 0
        assert percent == pytest.approx(100 * correct / total, abs=0.005)
    assert lines[-1].startswith("Final federated accuracy at round 2: ")

    events = read_metrics(metrics)
    assert [event["round"] for event in events if event["event"] == "round"] == [1, 2]
    assert sorted({event["round"] for event in events if event["event"] == "eval"}) == [1, 2]


def test_cli_trains_mnist_cnn_on_mnist_files(mnist_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "mnist.safetensors"
    # With --spawn-workers only the ids of --workers and --evaluator count; the uris are replaced.
    done = run_cli(
        [
            "--spawn-workers",
            "--dataset",
            "mnist",
            "--data_dir",
            str(mnist_dir),
            "--workers",
            "alice=ws://localhost:1,bob=ws://localhost:2",
            "--evaluator",
            "testing=ws://localhost:3",
            "--training-rounds",
            "2",
            "--eval-every",
            "1",
            "--federate-after-n-batches",
            "2",
            "--batch-size",
            "8",
            "--save-model",
            str(model),
        ]
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Evaluation at round 2/2:" in lines
    assert any(re.fullmatch(r"Federated model: Percentage numbers 0-3: \d+%, 4-6: \d+%", line) for line in lines)
    evals = [match for line in lines if (match := EVAL_LINE.fullmatch(line))]
    assert len(evals) == 2 and all(int(match[3]) == MNIST_TEST for match in evals)

    saved = load_file(str(model))
    expected = get_weights(MnistCNN())
    assert {name: array.shape for name, array in saved.items()} == {
        name: array.shape for name, array in expected.items()
    }
    with safe_open(str(model), framework="np") as handle:
        assert handle.metadata()["model"] == "mnist-cnn"
