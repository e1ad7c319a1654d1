"""Strategies, client sampling, test hooks and asynchronous mode over real worker processes.

The pure rules are tested in ``test_strategies.py`` and ``test_staleness.py``;
here the workers really train (FedProx's proximal term, SCAFFOLD's control
variates, the byzantine hooks) and the coordinator really drives them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import THREADS, TRAINERS, assert_same_weights, config, run, running_workers
from units import MS

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator
from syncfed.coordinator.buffered_rounds import async_settings_line
from syncfed.models import DigitsCNN, get_weights
from syncfed.monitor import Progress
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import Fit, FitResult, Hello, TrainingPlan

BATCHES, LR = 5, 0.05


@pytest.fixture(scope="module")
def hooked_workers() -> Iterator[dict[str, WorkerProcess]]:
    """abel and mallory: the same digits, mallory with --attack sign-flip; sloth: all digits, slow batches."""
    same = [*THREADS, "--digits", "0-3", "--val-fraction", "0"]
    plan = [
        ("abel", same),
        ("mallory", [*same, "--attack", "sign-flip"]),
        ("sloth", [*THREADS, "--digits", "0-9", "--slowdown", "0.1"]),
    ]
    with running_workers(plan) as workers:
        yield workers


def initial_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(3)
    return get_weights(DigitsCNN())


def plan(**changes: Any) -> TrainingPlan:
    return TrainingPlan(**{"round": 1, "batch_size": 16, "num_batches": BATCHES, "lr": LR, "seed": 11, **changes})


async def fit(worker: WorkerProcess, name: str, request: Fit) -> FitResult:
    async with WorkerLink(
        name,
        worker.uri,
        max_message_size=2**26,
        connect_timeout=10_000 * MS,
        request_timeout=60_000 * MS,
        ping_interval=None,
    ) as client:
        await client.request(Hello())
        reply = await client.request(request)
    assert isinstance(reply, FitResult)
    return reply


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_fedprox_keeps_the_update_near_the_global_model(digits_workers: dict[str, WorkerProcess]) -> None:
    start = initial_weights()
    free = run(fit(digits_workers["alice"], "alice", Fit("digits-cnn", start, plan())))
    anchored = run(fit(digits_workers["alice"], "alice", Fit("digits-cnn", start, plan(mu=5.0))))
    moved, held = distance(free.weights, start), distance(anchored.weights, start)
    print(f"\ndistance from the global model: mu=0 {moved:.4f}, mu=5 {held:.4f}")
    assert 0 < held < 0.8 * moved


def test_delta_plan_returns_the_update_not_the_weights(digits_workers: dict[str, WorkerProcess]) -> None:
    start = initial_weights()
    full = run(fit(digits_workers["alice"], "alice", Fit("digits-cnn", start, plan())))
    delta = run(fit(digits_workers["alice"], "alice", Fit("digits-cnn", start, plan(delta=True))))
    for name in start:
        # x + (y - x) is y up to float32 rounding.
        np.testing.assert_allclose(
            start[name] + delta.weights[name], full.weights[name], rtol=0, atol=1e-6, err_msg=name
        )


def test_scaffold_worker_returns_option_two_control_delta(digits_workers: dict[str, WorkerProcess]) -> None:
    start = initial_weights()
    rng = np.random.default_rng(0)
    control = {name: rng.normal(0, 0.01, array.shape).astype(array.dtype) for name, array in start.items()}
    corrected = run(fit(digits_workers["bob"], "bob", Fit("digits-cnn", start, plan(), control)))
    plain = run(fit(digits_workers["bob"], "bob", Fit("digits-cnn", start, plan())))
    assert corrected.control_delta is not None and plain.control_delta is None
    # Karimireddy et al. 2020, option II with c_i = 0 at first: c_i+ - c_i = (x - y) / (K lr) - c.
    for name in start:
        expected = (start[name] - corrected.weights[name]) / (BATCHES * LR) - control[name]
        np.testing.assert_allclose(corrected.control_delta[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)
    assert distance(corrected.weights, plain.weights) > 0  # the correction changed the training


def test_sign_flip_hook_sends_the_flipped_boosted_update(hooked_workers: dict[str, WorkerProcess]) -> None:
    start = initial_weights()
    honest = run(fit(hooked_workers["abel"], "abel", Fit("digits-cnn", start, plan())))
    attack = run(fit(hooked_workers["mallory"], "mallory", Fit("digits-cnn", start, plan())))
    # Same digits, same seed: the same training, then w_global - 10 * delta.
    for name in start:
        expected = start[name] - 10.0 * (honest.weights[name].astype(np.float64) - start[name])
        np.testing.assert_allclose(attack.weights[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def rounds_of(metrics: Path, event: str = "round") -> list[dict[str, Any]]:
    return [record for line in metrics.read_text().splitlines() if (record := json.loads(line))["event"] == event]


def test_client_sampling_is_seeded_and_honours_the_minimum(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    settings = config(digits_workers, evaluator=False, training_rounds=6, fraction_fit=0.3, min_fit_workers=2)
    first = run(Coordinator(replace(settings, metrics_out=tmp_path / "a.jsonl"), report=lambda _: None).run())
    again = run(Coordinator(replace(settings, metrics_out=tmp_path / "b.jsonl"), report=lambda _: None).run())
    chosen = [tuple(record["selected"]) for record in rounds_of(tmp_path / "a.jsonl")]
    assert chosen == [tuple(record["selected"]) for record in rounds_of(tmp_path / "b.jsonl")]
    assert all(len(names) == 2 and set(names) <= set(TRAINERS) for names in chosen)
    assert len(set(chosen)) > 1  # the sample changes from round to round
    assert [record["workers"] for record in rounds_of(tmp_path / "a.jsonl")] == [list(names) for names in chosen]
    assert_same_weights(first.weights, again.weights)


@pytest.mark.parametrize(
    ("strategy", "settings"),
    [("median", {}), ("trimmed-mean", {"trim_ratio": 0.34}), ("krum", {"byzantine_f": 0}), ("fedyogi", {})],
)
def test_strategies_train_with_real_workers(
    digits_workers: dict[str, WorkerProcess], strategy: str, settings: dict[str, float]
) -> None:
    result = run(
        Coordinator(
            config(digits_workers, training_rounds=3, eval_every=2, strategy=strategy, strategy_settings=settings),
            report=lambda _: None,
        ).run()
    )
    assert all(np.all(np.isfinite(array)) for array in result.weights.values())
    if strategy != "krum":
        assert result.accuracy(3) > 0.15  # above chance (10%) on the non-IID split after 3 rounds
    else:
        # Krum forwards one worker's model unchanged: the evaluator scores it exactly like that worker's.
        scores = {record.model: record.result for record in result.evaluations if record.round == 3}
        federated = scores.pop("federated")
        assert any(score == federated for score in scores.values())


def test_scaffold_and_fedadam_resume_from_their_checkpointed_server_state(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    for strategy in ("scaffold", "fedadam"):
        base = config(digits_workers, evaluator=False, training_rounds=4, strategy=strategy)
        straight = run(Coordinator(base, report=lambda _: None).run())
        directory = tmp_path / strategy
        run(Coordinator(replace(base, training_rounds=2, checkpoint_dir=directory), report=lambda _: None).run())
        resumed = run(Coordinator(replace(base, checkpoint_dir=directory, resume=True), report=lambda _: None).run())
        assert resumed.first_round == 3
        assert_same_weights(resumed.weights, straight.weights)


def test_async_mode_publishes_versions_without_waiting_for_the_slow_worker(
    digits_workers: dict[str, WorkerProcess], hooked_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    metrics = tmp_path / "async.jsonl"
    settings = CoordinatorConfig(
        workers={**{name: digits_workers[name].uri for name in TRAINERS}, "sloth": hooked_workers["sloth"].uri},
        evaluator={"testing": digits_workers["testing"].uri},
        mode="async",
        buffer_size=2,
        training_rounds=12,
        eval_every=6,
        federate_after_n_batches=5,
        metrics_out=metrics,
        connect_timeout=10_000 * MS,
    )
    console = io.StringIO()
    progress = Progress(12, stream=console, unit="version")
    result = run(Coordinator(settings, report=progress.report, listeners=[progress]).run())
    versions = rounds_of(metrics)
    assert [record["round"] for record in versions] == list(range(1, 13))
    assert all(len(record["workers"]) == 2 and record["mode"] == "async" for record in versions)
    # Each folded update in order, a worker twice if it sent two, with its staleness, discount and loss.
    for record in versions:
        assert [update["worker"] for update in record["updates"]] == record["workers"]
        assert [update["staleness"] for update in record["updates"]] == record["staleness"]["values"]
        assert all(update["weight"] == (1 + update["staleness"]) ** -0.5 for update in record["updates"])
        assert all(update["loss"] > 0 for update in record["updates"])
    lines = console.getvalue().splitlines()
    assert lines[0] == (
        "Asynchronous mode (FedBuff): 4 workers train without waiting for each other, each from the newest global"
        " version; every 2 updates make the next version, each weighted (1+s)^-0.5 by its staleness s (the versions"
        " published since it started)"
    )
    said = [line for line in lines if line.startswith("Version ")]
    assert len(said) == 12 and not any(line.startswith("Round ") for line in lines)
    for line, record in zip(said, versions, strict=True):
        updates = ", ".join(f"{update['worker']} (staleness {update['staleness']})" for update in record["updates"])
        assert line.startswith(f"Version {record['round']}/12: {updates}; done in ")
    assert "Evaluation at version 7/12:" in lines
    stalenesses = [s for record in versions for s in record["staleness"]["values"]]
    assert max(stalenesses) >= 1  # updates arrive on older bases than the newest version
    contributions = [name for record in versions for name in record["workers"]]
    # sloth's batches take 0.1 s against a few ms: it cannot keep pace with the others.
    assert contributions.count("sloth") < min(contributions.count(name) for name in TRAINERS)
    assert [record["round"] for record in rounds_of(metrics, "eval")] == [1, 7, 12]
    assert result.accuracy(12) > result.accuracy(1)


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            {"staleness_weight": "constant", "buffer_size": 1},
            "each update makes the next version, each counted in full",
        ),
        (
            {"staleness_weight": "hinge", "staleness_a": 2.0, "staleness_b": 3, "max_staleness": 9},
            "each weighted 1 up to staleness 3, then 1/(2(s-3)+1) by its staleness s (the versions published since it"
            " started); updates staler than 9 are discarded",
        ),
    ],
)
def test_the_async_start_line_says_how_versions_are_made(settings: dict[str, Any], said: str) -> None:
    line = async_settings_line(CoordinatorConfig(mode="async", **settings))
    assert line.startswith("Asynchronous mode (FedBuff): 3 workers train without waiting for each other")
    assert said in line


def test_async_mode_refuses_strategies_that_need_every_update() -> None:
    from syncfed.exceptions import ConfigError

    with pytest.raises(ConfigError, match="--mode async applies buffered mean updates; strategy median"):
        CoordinatorConfig(mode="async", strategy="median")
