"""The local training plan: optimizers, gradient clipping, local epochs and kept optimizer state, on tiny data."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError
from syncfed.protocol import TrainingPlan
from syncfed.protocol.task_messages import Recipe
from syncfed.tasks import make_task
from syncfed.training import DPSGD, TrainResult, _batches, evaluate, num_steps, train

CPU = torch.device("cpu")

#: Opacus's hooks on a first layer whose input needs no gradient make torch say so, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def tiny_data(count: int = 40, seed: int = 0) -> Dataset:
    """Three classes a linear model can learn: the class is the largest of the first three features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 4)).astype(np.float32)
    return Dataset("tiny", x, np.argmax(x[:, :3], axis=1).astype(np.int64), num_classes=3)


def tiny_model(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, outputs))


def plan(**fields: Any) -> TrainingPlan:
    return TrainingPlan(**{"round": 1, "lr": 0.05, "batch_size": 8, "num_batches": 5, "seed": 3, **fields})


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def trained(model: nn.Module, data: Dataset, training: TrainingPlan, **options: Any) -> tuple[nn.Module, TrainResult]:
    copied = copy.deepcopy(model)
    return copied, train(copied, data, training, CPU, **options)


def test_the_defaults_are_the_classic_sgd_loop_bit_for_bit() -> None:
    data, model, training = tiny_data(), tiny_model(), plan()
    ours, _ = trained(model, data, training)
    explicit, _ = trained(model, data, training, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=training.lr)
    labels = torch.from_numpy(data.labels)
    for batch in _batches(len(data), training):
        index = torch.from_numpy(batch)
        optimizer.zero_grad()
        torch.autograd.backward(F.cross_entropy(reference(torch.from_numpy(data.batch(batch))), labels[index]))
        optimizer.step()
    assert torch.equal(flat(ours), flat(reference))
    assert torch.equal(flat(explicit), flat(reference))


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd"},
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-3},
        {"optimizer": "adam"},
        {"optimizer": "adamw", "weight_decay": 0.01},
    ],
)
def test_each_optimizer_lowers_the_loss(options: dict[str, Any]) -> None:
    data, model = tiny_data(), tiny_model()
    lr = 0.01 if options["optimizer"] != "sgd" else 0.1
    before = evaluate(model, data, 64, CPU).loss
    after, result = trained(model, data, plan(lr=lr, num_batches=40), **options)
    assert evaluate(after, data, 64, CPU).loss < 0.8 * before
    assert result.steps == 40 and math.isfinite(result.loss)


def test_other_tasks_train_too() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    binary = Dataset("screen", x, (x[:, 0] > 0).astype(np.int64), 2)
    regression = Dataset("stay", x, (3 * x[:, 1] + 5).astype(np.float32), 1)
    for data, recipe in (
        (binary, Recipe(task="binary", loss="bce")),
        (regression, Recipe(task="regression", loss="huber", target_mean=5.0, target_std=3.0)),
    ):
        task = make_task(recipe, data.num_classes)
        model = tiny_model(outputs=1)
        before = evaluate(model, data, 64, CPU, task).loss
        after, _ = trained(model, data, plan(lr=0.01, num_batches=60), task=task, optimizer="adam")
        assert evaluate(after, data, 64, CPU, task).loss < 0.5 * before


def test_the_gradient_clip_bounds_each_sgd_step() -> None:
    data, model = tiny_data(), tiny_model()
    one_step = plan(lr=0.5, num_batches=1)
    free, _ = trained(model, data, one_step)
    clipped, _ = trained(model, data, one_step, grad_clip=0.01)
    assert torch.linalg.vector_norm(flat(free) - flat(model)) > 0.5 * 0.01 * 2  # the clip bites
    assert torch.linalg.vector_norm(flat(clipped) - flat(model)) <= 0.5 * 0.01 * (1 + 1e-5)


def test_the_clip_applies_after_scaffolds_correction() -> None:
    data, model = tiny_data(), tiny_model()
    shift = {name: np.full(p.shape, 100.0, np.float32) for name, p in model.named_parameters()}
    clipped, _ = trained(model, data, plan(lr=0.5, num_batches=1), correction=shift, grad_clip=0.01)
    assert torch.linalg.vector_norm(flat(clipped) - flat(model)) <= 0.5 * 0.01 * (1 + 1e-5)


@pytest.mark.parametrize(("count", "size", "epochs", "steps"), [(40, 8, 1, 5), (40, 8, 3, 15), (41, 8, 2, 12)])
def test_local_epochs_are_passes_of_ceil_n_over_batch_size_batches(
    count: int, size: int, epochs: int, steps: int
) -> None:
    data, model = tiny_data(count), tiny_model()
    training = plan(batch_size=size)
    assert num_steps(training, count, epochs) == steps
    by_epochs, result = trained(model, data, training, local_epochs=epochs)
    by_batches, _ = trained(model, data, plan(batch_size=size, num_batches=steps))
    assert result.steps == steps
    assert torch.equal(flat(by_epochs), flat(by_batches))


def test_one_local_epoch_visits_every_example_once() -> None:
    batches = list(_batches(40, plan(batch_size=8), num_steps(plan(batch_size=8), 40, 1)))
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))


def test_kept_state_continues_adam_and_reset_state_starts_it_afresh() -> None:
    data, model = tiny_data(), tiny_model()
    first, second = plan(lr=0.01), plan(lr=0.003, round=2, seed=4)
    after_first, result = trained(model, data, first, optimizer="adam")
    kept, _ = trained(after_first, data, second, optimizer="adam", state=result.state)
    reset, _ = trained(after_first, data, second, optimizer="adam")
    # The reference: one Adam over both rounds' batches, its learning rate set to round 2's in between.
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=first.lr)
    for training in (first, second):
        optimizer.param_groups[0]["lr"] = training.lr
        for batch in _batches(len(data), training):
            optimizer.zero_grad()
            target = torch.from_numpy(data.labels[batch])
            torch.autograd.backward(F.cross_entropy(reference(torch.from_numpy(data.batch(batch))), target))
            optimizer.step()
    assert torch.equal(flat(kept), flat(reference))
    assert not torch.allclose(flat(reset), flat(reference))


def test_state_of_another_optimizer_is_refused() -> None:
    data, model = tiny_data(), tiny_model()
    _, result = trained(model, data, plan(), optimizer="adam")
    with pytest.raises(ConfigError, match="^optimizer state of 'adam' cannot resume sgd$"):
        trained(model, data, plan(), optimizer="sgd", state=result.state)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "rmsprop"}, "^optimizer 'rmsprop' is not one of sgd, adam, adamw$"),
        ({"optimizer": "adam", "momentum": 0.9}, "^momentum 0.9 goes with sgd: adam keeps its own moments$"),
        ({"momentum": 1.0}, "^momentum 1.0 must be a number from 0 to below 1$"),
        ({"weight_decay": -1.0}, "^weight decay -1.0 must be a non-negative finite number$"),
        ({"grad_clip": 0.0}, "^gradient clip 0.0 must be a positive finite number$"),
        ({"local_epochs": 0}, "^local epochs 0 must be a positive integer$"),
    ],
)
def test_bad_settings_are_refused_in_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trained(tiny_model(), tiny_data(), plan(), **options)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_dp_sgd_works_with_adam_its_gradient_processed_further(optimizer: str) -> None:
    """Without noise and with a clip no example reaches, DP-SGD's gradient is the plain one: the same Adam steps."""
    data, model, training = tiny_data(), tiny_model(), plan(lr=0.01)
    private, _ = trained(model, data, training, optimizer=optimizer, dp_sgd=DPSGD(noise_multiplier=0.0, clip=1e6))
    plain, _ = trained(model, data, training, optimizer=optimizer)
    assert torch.allclose(flat(private), flat(plain), atol=1e-5)
    noisy, _ = trained(model, data, training, optimizer=optimizer, dp_sgd=DPSGD(noise_multiplier=1.0, clip=1.0))
    assert not torch.allclose(flat(noisy), flat(plain), atol=1e-3)
