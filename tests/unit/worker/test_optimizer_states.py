"""Kept optimizer state: in memory, bounded, and through a state directory read back by a new worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError
from syncfed.protocol import TrainingPlan
from syncfed.training import train
from syncfed.worker.optimizer_states import OptimizerStates

PLAN = TrainingPlan(round=1, batch_size=8, num_batches=3, lr=0.01, seed=5)


def adam_state(momentum: bool = False) -> dict[str, Any]:
    """A real optimizer state after three steps on a small linear model."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = Dataset("tiny", rng.normal(size=(24, 3)).astype(np.float32), rng.integers(0, 2, 24), num_classes=2)
    optimizer = {"optimizer": "sgd", "momentum": 0.9} if momentum else {"optimizer": "adam"}
    state = train(nn.Linear(3, 2), data, PLAN, torch.device("cpu"), **optimizer).state
    assert state is not None
    return state


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["optimizer"] == b["optimizer"]
    moments, read = a["torch"]["state"], b["torch"]["state"]
    assert moments.keys() == read.keys()
    for index, entry in moments.items():
        assert entry.keys() == read[index].keys()
        for name, value in entry.items():
            assert torch.equal(value, read[index][name]) and value.dtype == read[index][name].dtype


@pytest.mark.parametrize("momentum", [False, True])
def test_a_state_written_to_the_directory_is_read_back_at_start(tmp_path: Path, momentum: bool) -> None:
    state = adam_state(momentum)
    key = ("user.models:Net", "abc-123", state["optimizer"])
    OptimizerStates(tmp_path).put(key, state)
    read = OptimizerStates(tmp_path).get(key)
    assert read is not None
    assert_same_state(state, read)
    assert [path.suffix for path in tmp_path.iterdir()] == [".safetensors"]


def test_drop_forgets_every_optimizer_of_a_model_on_disk_too(tmp_path: Path) -> None:
    states = OptimizerStates(tmp_path)
    states.put(("mlp", "d1", "adam"), adam_state())
    states.put(("mlp", "d1", "sgd"), adam_state(momentum=True))
    states.put(("mlp", "d2", "adam"), adam_state())
    states.drop(("mlp", "d1"))
    assert states.get(("mlp", "d1", "adam")) is None and states.get(("mlp", "d1", "sgd")) is None
    assert len(states) == 1 and len(OptimizerStates(tmp_path)) == 1


def test_the_least_recently_used_states_beyond_the_limit_are_dropped(tmp_path: Path) -> None:
    states = OptimizerStates(tmp_path, max_states=2)
    state = adam_state()
    states.put(("a", "", "adam"), state)
    states.put(("b", "", "adam"), state)
    assert states.get(("a", "", "adam")) is not None  # now b is the least recently used
    states.put(("c", "", "adam"), state)
    assert states.get(("b", "", "adam")) is None and len(states) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    with pytest.raises(ConfigError, match="^max optimizer states 0 must be at least 1$"):
        OptimizerStates(max_states=0)


def test_a_file_that_is_not_a_state_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "stray.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as error:
        OptimizerStates(tmp_path)
    assert str(error.value).startswith(f"optimizer state file {tmp_path / 'stray.safetensors'} cannot be read: ")
    assert "\n" not in str(error.value)
