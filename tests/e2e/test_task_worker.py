"""Workers that run a request's task: real worker processes over small CSV tables, driven with recipes.

A binary, a three-class and a regression table, each at one site. Fits with
a recipe lower the task's loss; an evaluation's metric sums agree with
scikit-learn on the same rows scored here by the same weights; a kept
optimizer state changes the next fit and survives a restart with
``--state-dir``; a user's task trains when the worker was started with its
path and is refused when it was not.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from conftest import THREADS, running_workers
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from units import MS

from syncfed.compatibility import agreed_plan
from syncfed.config import CoordinatorConfig
from syncfed.coordinator.task_setup import task_readout
from syncfed.evaluation import headline, pool, result_json
from syncfed.exceptions import RemoteError
from syncfed.models import get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import DataPlan, EvalResult, Evaluate, Fit, FitResult, Hello, Info, Recipe, TrainingPlan
from syncfed.shaped_models import TabularMLP

T = TypeVar("T")

TEST_TIMEOUT = 180_000 * MS
LIMIT = 64 * 2**20
ROWS = 300
FEATURES = ("f1", "f2", "f3", "f4")
#: The user task module the binary site's worker is started with (written to a folder on its PYTHONPATH).
USER_TASK = "brier_task17:Brier"
USER_TASK_SOURCE = '''
    """A user's task: the Brier score, squared error between the softmax and the one-hot label."""

    import numpy as np
    import torch
    import torch.nn.functional as F


    class Brier:
        def __init__(self, num_classes):
            self.num_outputs = num_classes

        def targets(self, labels):
            return torch.from_numpy(labels.astype(np.int64))

        def loss(self, output, target):
            one_hot = F.one_hot(target, output.shape[1]).to(output.dtype)
            return ((F.softmax(output, dim=1) - one_hot) ** 2).sum(dim=1).mean()

        def predicted(self, output):
            return output.argmax(dim=1)

        def batch_sums(self, output, labels):
            c = self.num_outputs
            cells = labels.astype(np.int64) * c + output.argmax(dim=1).cpu().numpy()
            one_hot = np.eye(c)[labels.astype(np.int64)]
            squared = ((F.softmax(output, dim=1).double().cpu().numpy() - one_hot) ** 2).sum()
            return {
                "confusion": np.bincount(cells, minlength=c * c).reshape(c, c).astype(np.int64),
                "user.brier": np.array([squared, len(labels)]),
            }

        def metrics(self, sums):
            squared, n = sums["user.brier"]
            return {"brier": squared / n}
'''


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


def tables() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels of each site's table: binary (neg/pos), three classes (a/b/c), and a continuous y."""
    rng = np.random.default_rng(17)
    x = np.round(rng.normal(size=(ROWS, len(FEATURES))), 4)
    binary = np.where(x[:, 0] - x[:, 1] + 0.3 * rng.normal(size=ROWS) > 0, "pos", "neg")
    three = np.array(["a", "b", "c"])[np.argmax(x[:, :3] + 0.2 * rng.normal(size=(ROWS, 3)), axis=1)]
    y = np.round(10.0 + 3.0 * x[:, 0] - 2.0 * x[:, 2] + 0.5 * rng.normal(size=ROWS), 4) + 0.00005
    return {"binary": (x, binary), "three": (x, three), "regression": (x, y)}


def write_csv(path: Path, x: np.ndarray, labels: np.ndarray) -> None:
    lines = [",".join((*FEATURES, "y"))]
    lines += [",".join([*(f"{value:.4f}" for value in row), str(label)]) for row, label in zip(x, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    for name, (x, labels) in tables().items():
        write_csv(folder / f"{name}.csv", x, labels)
    (folder / "brier_task17.py").write_text(textwrap.dedent(USER_TASK_SOURCE))
    return folder


def site(folder: Path, name: str, *extra: str) -> list[str]:
    """A worker's flags over the whole of table ``name`` (no validation hold-out)."""
    return [*THREADS, "--data", f"csv:{folder / name}.csv", "--label-column", "y", "--val-fraction", "0", *extra]


@contextlib.contextmanager
def spawned(folder: Path, *plan: tuple[str, list[str]]) -> Iterator[dict[str, WorkerProcess]]:
    """Workers started with ``folder`` on their PYTHONPATH, where the user's task module lies."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(folder), prepend=":")
        with running_workers(list(plan)) as workers:
            yield workers


@pytest.fixture(scope="module")
def workers(folder: Path) -> Iterator[dict[str, WorkerProcess]]:
    with spawned(
        folder,
        ("binary", site(folder, "binary", "--task", USER_TASK)),
        ("three", site(folder, "three")),
        ("regression", site(folder, "regression")),
    ) as workers:
        yield workers


def link(worker: WorkerProcess) -> WorkerLink:
    return WorkerLink(worker.worker_id, worker.uri, max_message_size=LIMIT, connect_timeout=30_000 * MS)


async def data_plan(peer: WorkerLink) -> DataPlan:
    info = await peer.request(Hello())
    assert isinstance(info, Info)
    plan = agreed_plan({"site": info})
    assert plan is not None
    return plan


def fresh(plan: DataPlan, recipe: Recipe | None) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    outputs = plan.num_classes if recipe is None else recipe.num_outputs(plan.num_classes)
    return get_weights(TabularMLP(plan.input_shape, outputs))


def training(round_: int, **settings: Any) -> TrainingPlan:
    return TrainingPlan(
        **{"round": round_, "batch_size": 32, "num_batches": 20, "lr": 0.05, "seed": round_, **settings}
    )


async def fit_rounds(
    peer: WorkerLink, plan: DataPlan, recipe: Recipe | None, rounds: int, **settings: Any
) -> tuple[list[float], dict[str, np.ndarray]]:
    losses, weights = [], fresh(plan, recipe)
    for round_ in range(1, rounds + 1):
        reply = await peer.request(Fit("mlp", weights, training(round_, **settings), data=plan, recipe=recipe))
        assert isinstance(reply, FitResult) and reply.num_examples == ROWS
        losses.append(reply.loss)
        weights = reply.weights
    return losses, weights


def train_and_score(
    worker: WorkerProcess, recipe: Recipe, rounds: int = 4, **settings: Any
) -> tuple[list[float], dict[str, np.ndarray], EvalResult]:
    async def scenario() -> tuple[list[float], dict[str, np.ndarray], EvalResult]:
        async with link(worker) as peer:
            plan = await data_plan(peer)
            losses, weights = await fit_rounds(peer, plan, recipe, rounds, **settings)
            scored = await peer.request(Evaluate("mlp", weights, 64, data=plan, recipe=recipe))
            assert isinstance(scored, EvalResult)
            return losses, weights, scored

    return run(scenario())


def outputs(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The model's outputs on ``x``, computed here with the same weights (float64 for the references)."""
    model = TabularMLP((x.shape[1],), len(next(reversed(weights.values()))))  # the last bias: one per output
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in weights.items()})
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x.astype(np.float32))).double().numpy()


def test_a_binary_task_trains_and_its_sums_agree_with_scikit_learn(workers: dict[str, WorkerProcess]) -> None:
    losses, weights, scored = train_and_score(workers["binary"], Recipe("binary"), optimizer="adam")
    assert losses[-1] < 0.7 * losses[0], losses
    x, labels = tables()["binary"]
    y = (labels == "pos").astype(np.int64)  # classes sorted: neg 0, pos 1
    p = 1 / (1 + np.exp(-outputs(weights, x)[:, 0]))
    assert scored.metrics is not None and scored.num_examples == ROWS
    assert scored.metrics["confusion"].tolist() == confusion_matrix(y, p > 0.5).tolist()
    assert scored.metrics["scores"].shape == (2, 1000)
    assert scored.metrics["scores"].sum(axis=1).tolist() == np.bincount(y).tolist()
    assert float(scored.metrics["auc"][0]) == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert float(scored.metrics["pr_auc"][0]) == pytest.approx(average_precision_score(y, p), abs=1e-6)
    assert scored.loss == pytest.approx(log_loss(y, p), abs=1e-5)
    assert scored.correct == int(np.sum((p > 0.5) == y))


def test_three_classes_train_and_the_confusion_agrees_with_scikit_learn(workers: dict[str, WorkerProcess]) -> None:
    losses, weights, scored = train_and_score(workers["three"], Recipe("classification"), momentum=0.9)
    assert losses[-1] < 0.7 * losses[0], losses
    x, labels = tables()["three"]
    y = np.searchsorted(["a", "b", "c"], labels)
    logits = outputs(weights, x)
    assert scored.metrics is not None and set(scored.metrics) == {"confusion"}
    assert scored.metrics["confusion"].tolist() == confusion_matrix(y, logits.argmax(axis=1), labels=[0, 1, 2]).tolist()
    assert scored.class_counts == tuple(np.bincount(y, minlength=3).tolist())
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert scored.loss == pytest.approx(log_loss(y, probabilities, labels=[0, 1, 2]), abs=1e-5)


def test_a_regression_trains_on_the_standardised_target_and_reports_its_own_units(
    workers: dict[str, WorkerProcess],
) -> None:
    x, y = tables()["regression"]
    y = y.astype(np.float32).astype(np.float64)
    recipe = Recipe("regression", "huber", target_mean=float(y.mean()), target_std=float(y.std()))
    losses, weights, scored = train_and_score(workers["regression"], recipe, local_epochs=2, num_batches=0)
    assert losses[-1] < 0.5 * losses[0], losses
    prediction = outputs(weights, x)[:, 0] * y.std() + y.mean()
    assert scored.metrics is not None and set(scored.metrics) == {"regression"}
    n, error, absolute, squared, total, total_squared = scored.metrics["regression"].tolist()
    assert (scored.correct, scored.predictions, scored.class_counts) == (0, (ROWS,), None)
    assert n == ROWS and error == pytest.approx(np.sum(prediction - y), abs=1e-3)
    assert absolute / n == pytest.approx(mean_absolute_error(y, prediction), rel=1e-5)
    assert squared / n == pytest.approx(mean_squared_error(y, prediction), rel=1e-5)
    assert 1 - squared / (total_squared - total**2 / n) == pytest.approx(r2_score(y, prediction), abs=1e-5)
    assert r2_score(y, prediction) > 0.8


def second_fits(worker: WorkerProcess, keeps: tuple[bool, ...]) -> list[dict[str, np.ndarray]]:
    """Round 1 with Adam's state kept, then round 2 from its weights once for each of ``keeps``."""

    async def scenario() -> list[dict[str, np.ndarray]]:
        async with link(worker) as peer:
            plan = await data_plan(peer)
            _, weights = await fit_rounds(peer, plan, None, 1, optimizer="adam", keep_state=True)
            trained = []
            for keep in keeps:
                second = training(2, optimizer="adam", keep_state=keep)
                reply = await peer.request(Fit("mlp", weights, second, data=plan))
                assert isinstance(reply, FitResult)
                trained.append(reply.weights)
            return trained

    return run(scenario())


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[name], b[name]) for name in a)


def test_kept_optimizer_state_carries_into_the_next_round_and_a_reset_drops_it(
    workers: dict[str, WorkerProcess],
) -> None:
    kept, reset, after_reset = second_fits(workers["three"], (True, False, True))
    assert not same(kept, reset)  # round 2 resumed round 1's Adam moments
    assert same(after_reset, reset)  # keep_state false dropped them: the next kept round starts afresh


def test_a_restarted_worker_goes_on_with_the_state_in_its_state_dir(
    folder: Path, tmp_path: Path, workers: dict[str, WorkerProcess]
) -> None:
    flags = site(folder, "three", "--state-dir", str(tmp_path / "state"))

    async def first(worker: WorkerProcess) -> dict[str, np.ndarray]:
        async with link(worker) as peer:
            return (await fit_rounds(peer, await data_plan(peer), None, 1, optimizer="adam", keep_state=True))[1]

    async def second(worker: WorkerProcess, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        async with link(worker) as peer:
            reply = await peer.request(
                Fit("mlp", weights, training(2, optimizer="adam", keep_state=True), data=await data_plan(peer))
            )
            assert isinstance(reply, FitResult)
            return reply.weights

    with spawned(folder, ("restarted", flags)) as started:
        weights = run(first(started["restarted"]))
    assert len(list((tmp_path / "state").glob("*.safetensors"))) == 1
    with spawned(folder, ("restarted", flags)) as started:
        resumed = run(second(started["restarted"], weights))
    kept, reset = second_fits(workers["three"], (True, False))  # the same two rounds without a restart
    assert same(resumed, kept) and not same(resumed, reset)


def test_a_users_task_trains_by_the_path_the_worker_was_started_with_and_sends_its_own_sums(
    folder: Path, workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    losses, weights, scored = train_and_score(workers["binary"], Recipe(USER_TASK), rounds=3)
    assert losses[-1] < 0.8 * losses[0], losses
    x, labels = tables()["binary"]
    y = (labels == "pos").astype(np.int64)
    logits = outputs(weights, x)
    assert scored.metrics is not None
    assert scored.metrics["confusion"].tolist() == confusion_matrix(y, logits.argmax(axis=1)).tolist()
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    brier = float(((probabilities - np.eye(2)[y]) ** 2).sum(axis=1).mean())
    assert scored.metrics["user.brier"].tolist() == pytest.approx([brier * ROWS, ROWS], rel=1e-5)
    # The coordinator started with the same path imports the task to turn the summed sums into its figures.
    monkeypatch.syspath_prepend(str(folder))
    config = CoordinatorConfig(workers={"binary": workers["binary"].uri}, evaluator={}, task=USER_TASK)
    readout = task_readout(config, Recipe(USER_TASK), None, 2, report=pytest.fail)
    summed = pool([scored, scored])  # two sites' sums add up; the Brier score of both is the same
    assert result_json(summed, (), readout)["user.brier"] == pytest.approx(brier, rel=1e-5)
    assert headline(summed, readout).endswith(f", brier {result_json(summed, (), readout)['user.brier']:.4g}")


def test_a_task_the_worker_was_not_started_with_is_refused(workers: dict[str, WorkerProcess]) -> None:
    async def scenario() -> list[tuple[str, str]]:
        refusals = []
        async with link(workers["three"]) as peer:
            plan = await data_plan(peer)
            for request in (
                Fit("mlp", fresh(plan, None), training(1), data=plan, recipe=Recipe(USER_TASK)),
                Evaluate("mlp", fresh(plan, None), 64, data=plan, recipe=Recipe(USER_TASK)),
            ):
                with pytest.raises(RemoteError) as refused:
                    await peer.request(request)
                refusals.append((refused.value.code, refused.value.reason))
        return refusals

    line = f"task {USER_TASK} is not one this worker was started with (--task)"
    assert run(scenario()) == [("incompatible", line)] * 2
