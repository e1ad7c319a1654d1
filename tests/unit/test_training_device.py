"""The device a worker trains on (``--cuda``), and what training does on it, checked on the CPU.

No GPU is needed: the choice is tested with torch's CUDA probe patched, and
the training loop's device handling (the loss summed on the device and read
once) runs with the CPU as its device.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syncfed.cli import coordinator as coordinator_cli
from syncfed.cli import worker as worker_cli
from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError
from syncfed.protocol import TrainingPlan
from syncfed.training import _batches, train, training_device


def cuda_present(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)


@pytest.mark.parametrize("present", [True, False])
def test_without_cuda_asked_a_worker_trains_on_the_cpu(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    cuda_present(monkeypatch, present)
    assert training_device(False) == torch.device("cpu")


def test_cuda_asked_and_present_is_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_present(monkeypatch, True)
    assert training_device(True) == torch.device("cuda")


def test_cuda_asked_but_absent_is_an_error_not_a_quiet_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_present(monkeypatch, False)
    with pytest.raises(
        ConfigError, match=r"^--cuda asks for a GPU, but torch \S+ .*: drop --cuda to train on the CPU$"
    ):
        training_device(True)


def test_the_worker_stops_at_start_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cuda_present(monkeypatch, False)
    with socket.socket() as taken:  # had the worker got past its device, it would stop here, not serve on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        status = worker_cli.main(["--id", "alice", "--host", "127.0.0.1", "--port", port, "--cuda", "--threads", "1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert len(error) == 1 and error[0].startswith("run_websocket_server.py: error: --cuda asks for a GPU, but torch")


@pytest.mark.parametrize("where", [[], ["--site", "ana=csv:a.csv"]])
def test_the_coordinator_spawns_no_cuda_workers_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: list[str]
) -> None:
    cuda_present(monkeypatch, False)

    def spawned(*_: object) -> None:
        raise AssertionError("workers were spawned")

    monkeypatch.setattr(coordinator_cli, "spawn_workers", spawned)
    status = coordinator_cli.main(["--spawn-workers", "--cuda", *where, "--training-rounds", "1", "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert error == [f"run_websocket_client.py: error: {_absent_line()}"]


def _absent_line() -> str:
    with pytest.raises(ConfigError) as raised:
        training_device(True)
    return str(raised.value)


def test_the_loss_summed_on_the_device_is_the_per_batch_sum_to_the_last_bit() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(45, 4)).astype(np.float32)
    data = Dataset("tiny", x, np.argmax(x[:, :3], axis=1).astype(np.int64), num_classes=3)
    # Batches of 7 and a short one: losses times sizes that are not powers of two round in float32.
    plan = TrainingPlan(round=1, lr=0.05, batch_size=7, num_batches=9, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    result = train(model, data, plan, torch.device("cpu"))
    optimizer = torch.optim.SGD(reference.parameters(), lr=plan.lr)
    total, seen = 0.0, 0
    for batch in _batches(len(data), plan):
        optimizer.zero_grad()
        loss = F.cross_entropy(reference(torch.from_numpy(data.batch(batch))), torch.from_numpy(data.labels[batch]))
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
        seen += len(batch)
    assert result.loss == total / seen
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert all(tensor.device.type == "cpu" for tensor in model.state_dict().values())
