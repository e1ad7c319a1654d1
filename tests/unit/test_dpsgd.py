"""Example-level DP-SGD on workers (``--dp-sgd``): clipping, noise and the accountant, against plain torch.

The reference computations take each example's gradient with its own
``torch.autograd.grad`` call on a copy of the model, not through Opacus.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import THREADS, run, running_workers
from opacus.accountants.analysis import rdp
from torch import nn
from units import MS

from syncfed.cli.worker import build_parser, config_from_args
from syncfed.config import CoordinatorConfig, WorkerConfig
from syncfed.coordinator import Coordinator
from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError, ModelError, ProtocolError
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.protocol import Fit, FitResult, Hello, TrainingPlan, decode, encode
from syncfed.training import DPSGD, ExampleAccountant, _batches, train

CPU = torch.device("cpu")

#: Opacus's hooks on a first layer whose input needs no gradient make torch say so, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def tiny_data(count: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 1.0, (count, 1, 4, 4)).astype(np.float32)
    return Dataset("tiny", images, rng.integers(0, 3, count).astype(np.int64), num_classes=3)


def tiny_model(seed: int = 0) -> nn.Module:
    """A convolution and two linear layers: the kinds of layer the built-in models use."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3), nn.LogSoftmax(1)
    )


def flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel().astype(np.float64) for p in model.parameters()])


def example_gradient(model: nn.Module, data: Dataset, index: int) -> np.ndarray:
    """One example's loss gradient, flattened: its own forward and backward pass, no Opacus."""
    x = torch.from_numpy(data.images[index : index + 1])
    y = torch.from_numpy(data.labels[index : index + 1])
    loss = nn.functional.nll_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return np.concatenate([g.numpy().ravel().astype(np.float64) for g in grads])


def trained(model: nn.Module, data: Dataset, plan: TrainingPlan, **options: Any) -> nn.Module:
    copied = copy.deepcopy(model)
    train(copied, data, plan, CPU, **options)
    return copied


# -- Pure: the DP path against plain SGD and against a hand computation --------------------------


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_without_noise_and_with_a_huge_clip_dp_sgd_is_plain_sgd(mu: float) -> None:
    data = tiny_data(40)
    model = tiny_model()
    plan = TrainingPlan(round=1, batch_size=8, num_batches=7, lr=0.1, seed=5, mu=mu)
    anchor = {name: p.detach().numpy() + 0.1 for name, p in model.named_parameters()}
    plain = trained(model, data, plan, anchor=anchor)
    private = trained(model, data, plan, anchor=anchor, dp_sgd=DPSGD(0.0, 1e9))
    assert np.abs(flat(plain) - flat(model)).max() > 1e-3  # it trained
    np.testing.assert_allclose(flat(private), flat(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("count", "batch_size"), [(20, 5), (3, 7)])
def test_each_example_moves_the_step_by_at_most_the_clip(count: int, batch_size: int) -> None:
    """One step of lr 1: the update is minus the mean of the clipped per-example gradients.

    A batch size of 7 over 3 examples is a batch of the whole shard, each example once
    (a batch never holds more than the data), and the mean is over those 3.
    """
    data = tiny_data(count, seed=1)
    model = tiny_model(seed=2)
    clip = 0.05
    plan = TrainingPlan(round=1, batch_size=batch_size, num_batches=1, lr=1.0, seed=9)
    batch = next(_batches(count, plan))
    copies = np.bincount(batch, minlength=count)
    gradients = [copies[i] * example_gradient(model, data, i) for i in range(count) if copies[i]]
    norms = [float(np.linalg.norm(g)) for g in gradients]
    assert min(norms) > 2 * clip  # clipping bites for every example
    assert len(batch) == min(batch_size, count)
    expected = -np.sum([g * min(1.0, clip / n) for g, n in zip(gradients, norms, strict=True)], axis=0) / len(batch)
    private = trained(model, data, plan, dp_sgd=DPSGD(0.0, clip))
    update = flat(private) - flat(model)
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(update) <= len(gradients) * clip / len(batch) * (1 + 1e-5)


def test_the_noise_on_the_gradient_has_std_z_times_c_over_the_batch() -> None:
    data = tiny_data(50, seed=3)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 400), nn.ReLU(), nn.Linear(400, 3))  # 8,003 parameters
    z, clip, batch_size = 2.0, 0.5, 4
    plan = TrainingPlan(round=1, batch_size=batch_size, num_batches=1, lr=1.0, seed=1)
    quiet = flat(trained(model, data, plan, dp_sgd=DPSGD(0.0, clip)))
    noisy = [
        flat(trained(model, data, plan, dp_sgd=DPSGD(z, clip), noise=torch.Generator().manual_seed(seed)))
        for seed in (11, 11, 12)
    ]
    noise = quiet - noisy[0]  # lr 1: minus the noise over the batch size
    assert np.std(noise) == pytest.approx(z * clip / batch_size, rel=0.04)
    assert abs(np.mean(noise)) < 4 * z * clip / batch_size / math.sqrt(noise.size)
    np.testing.assert_array_equal(noisy[0], noisy[1])  # seeded
    assert np.abs(noisy[0] - noisy[2]).max() > 0.1
    # Without a generator the noise comes from the operating system, not from the plan's seed.
    unseeded = [flat(trained(model, data, plan, dp_sgd=DPSGD(z, clip))) for _ in range(2)]
    assert np.abs(unseeded[0] - unseeded[1]).max() > 0.1


def test_training_twice_leaves_no_opacus_state_on_the_model() -> None:
    data = tiny_data(20)
    model = tiny_model()
    plan = TrainingPlan(round=1, batch_size=4, num_batches=2, lr=0.1, seed=1)
    for _ in range(2):  # Opacus refuses to hook a model twice: the first run's hooks are gone
        train(model, data, plan, CPU, dp_sgd=DPSGD(1.0, 1.0))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_a_model_opacus_cannot_handle_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3))
    plan = TrainingPlan(round=1, batch_size=4, num_batches=1, lr=0.1, seed=1)
    with pytest.raises(ModelError, match=r"^model Sequential cannot train with dp-sgd: .*BatchNorm"):
        train(model, tiny_data(8), plan, CPU, dp_sgd=DPSGD(1.0, 1.0))


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^dp-sgd noise multiplier -1\.0 must be a non-negative finite number$"):
        DPSGD(-1.0, 1.0)
    with pytest.raises(ConfigError, match=r"^dp-sgd clip 0\.0 must be a positive finite number$"):
        DPSGD(1.0, 0.0)
    with pytest.raises(ConfigError, match=r"^dp_sgd_noise_multiplier must be a positive number, not 0\.0$"):
        WorkerConfig("alice", dp_sgd_noise_multiplier=0.0)
    with pytest.raises(ConfigError, match=r"^dp_sgd_clip must be a positive number, not -1\.0$"):
        WorkerConfig("alice", dp_sgd_noise_multiplier=1.0, dp_sgd_clip=-1.0)
    with pytest.raises(ConfigError, match=r"^dp_sgd_delta must be in \(0, 1\), not 1\.0$"):
        WorkerConfig("alice", dp_sgd_noise_multiplier=1.0, dp_sgd_delta=1.0)
    with pytest.raises(ConfigError, match="^--dp-sgd is for training workers: the evaluator does not train$"):
        WorkerConfig("testing", testing=True, dp_sgd_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match=r"^sample rate 1\.5 must be in \(0, 1\]$"):
        ExampleAccountant(1.0, 1e-5).step(1.5, 1)


def test_the_flags_reach_the_worker_config() -> None:
    args = build_parser().parse_args(["--id", "alice", "--dp-sgd", "1.1", "--dp-sgd-clip", "0.5"])
    config = config_from_args(args)
    assert (config.dp_sgd_noise_multiplier, config.dp_sgd_clip, config.dp_sgd_delta) == (1.1, 0.5, 1e-5)
    assert config_from_args(build_parser().parse_args(["--id", "alice"])).dp_sgd_noise_multiplier is None


# -- The accountant ----------------------------------------------------------------------------------


def opacus_epsilon(z: float, rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP analysis called directly on ``steps`` compositions, at its default orders."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    epsilon, _ = rdp.get_privacy_spent(
        orders=orders, rdp=rdp.compute_rdp(q=rate, noise_multiplier=z, steps=steps, orders=orders), delta=delta
    )
    return float(epsilon)


def test_epsilon_grows_with_rounds_and_matches_opacus() -> None:
    accountant = ExampleAccountant(noise_multiplier=1.1, delta=1e-5)
    assert accountant.epsilon() == 0.0
    rate = 32 / 600
    found = []
    for round_number in range(1, 4):
        accountant.step(rate, 10)
        found.append(accountant.epsilon())
        assert found[-1] == pytest.approx(opacus_epsilon(1.1, rate, 10 * round_number, 1e-5), rel=1e-9)
    assert accountant.steps == 30
    assert 0 < found[0] < found[1] < found[2]


def test_a_missing_opacus_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # import now fails
    with pytest.raises(ConfigError, match=r"^--dp-sgd needs the opacus package: pip install 'syncfed\[dpsgd\]'$"):
        ExampleAccountant(1.0, 1e-5)


def test_the_epsilon_travels_only_when_set() -> None:
    weights = {"w": np.ones(3, np.float32)}
    assert "dp_epsilon" not in FitResult(weights, 5, 0.5).to_body()
    plain = decode(encode(1, FitResult(weights, 5, 0.5))).message
    assert isinstance(plain, FitResult) and plain.dp_epsilon is None
    received = decode(encode(2, FitResult(weights, 5, 0.5, dp_epsilon=2.5))).message
    assert isinstance(received, FitResult) and received.dp_epsilon == 2.5
    with pytest.raises(ProtocolError, match="dp_epsilon must be a non-negative number"):
        FitResult(weights, 5, 0.5, dp_epsilon=-1.0)


# -- End to end: a real worker process started with --dp-sgd 1.0 -------------------------------------

REPLY_TIMEOUT = 120_000 * MS
LOG_TIMEOUT = 10_000 * MS  # a logged line to reach the test through the worker's pipe


def test_a_dp_sgd_worker_reports_a_growing_epsilon(tmp_path: Path) -> None:
    plan = TrainingPlan(round=1, batch_size=8, num_batches=3, lr=0.05, seed=3)
    start = get_weights(DigitsCNN())

    async def fits(uri: str) -> list[FitResult]:
        replies = []
        async with WorkerLink("erin", uri, max_message_size=2**26, ping_interval=None) as client:
            await client.request(Hello())
            for _ in range(2):
                reply = await client.request(Fit("digits-cnn", start, plan), timeout=REPLY_TIMEOUT)
                assert isinstance(reply, FitResult)
                replies.append(reply)
        return replies

    with running_workers([("erin", [*THREADS, "--digits", "1,2", "--dp-sgd", "1.0"])]) as workers:
        uri = workers["erin"].uri
        first, second = run(fits(uri))
        metrics = tmp_path / "metrics.jsonl"
        settings = CoordinatorConfig(
            workers={"erin": uri},
            evaluator={},
            training_rounds=2,
            federate_after_n_batches=2,
            batch_size=8,
            connect_timeout=10_000 * MS,
            metrics_out=metrics,
        )
        run(Coordinator(settings).run())
        # The worker logs its figure every round too.
        deadline = time.monotonic() + LOG_TIMEOUT
        while not any("dp-sgd: 10 steps so far" in line for line in workers["erin"].output):
            assert time.monotonic() < deadline, " | ".join(workers["erin"].output)
            time.sleep(50 * MS)
    for reply in (first, second):
        assert all(np.isfinite(array).all() for array in reply.weights.values())
    assert any(not np.array_equal(first.weights[name], start[name]) for name in start)  # it trained
    rate = 8 / first.num_examples
    assert first.dp_epsilon == pytest.approx(opacus_epsilon(1.0, rate, 3, 1e-5), rel=1e-9)
    assert second.dp_epsilon == pytest.approx(opacus_epsilon(1.0, rate, 6, 1e-5), rel=1e-9)
    assert 0 < first.dp_epsilon < second.dp_epsilon
    # The coordinator writes each round's figure: two more steps a round on the same worker.
    events = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    epsilons = [event["dp_epsilon"]["erin"] for event in events if event["event"] == "round"]
    assert epsilons == pytest.approx([opacus_epsilon(1.0, rate, steps, 1e-5) for steps in (8, 10)], rel=1e-9)
