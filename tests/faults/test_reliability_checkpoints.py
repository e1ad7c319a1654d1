"""Reliability, unit level: the reconnection backoff, and checkpoints on disk.

A checkpoint is written whole or not at all, read back bit for bit, refused
when it is damaged or of another format, and resumed only by the run that
wrote it. No process is started here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from syncfed.checkpoint import CHECKPOINT_FILE, Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from syncfed.coordinator import _Backoff
from syncfed.exceptions import CheckpointError
from syncfed.models import DigitsCNN, get_weights


def test_backoff_retries_at_once_then_doubles_from_half_a_second_up_to_the_cap() -> None:
    backoff = _Backoff()
    assert backoff.due(0.0)
    delays = []
    now = 100.0
    for _ in range(8):
        backoff.failed(now, cap=5.0)
        delays.append(backoff.retry_at - now)
        assert not backoff.due(now) or delays[-1] == 0
        assert backoff.due(backoff.retry_at)
        assert not backoff.due(backoff.retry_at - 0.01) or delays[-1] == 0
        now += 1.0
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff.failures == 8
    capped = _Backoff()
    for _ in range(40):  # 0.5 * 2 ** 38 would be years without the cap
        capped.failed(0.0, cap=30.0)
    assert capped.retry_at == 30.0


def checkpoint_of(round_number: int, **identity: Any) -> Checkpoint:
    weights = get_weights(DigitsCNN())
    return Checkpoint(
        round=round_number,
        weights=weights,
        identity={"model": "digits-cnn", "dataset": "digits", "workers": ["alice", "bob"], "evaluator": [], **identity},
        seed=7,
        config={"lr": 0.1, "checkpoint_dir": "/somewhere"},
        metrics_size=1234,
    )


def test_checkpoint_round_trip_and_resumability(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none") is None
    saved = checkpoint_of(3)
    path = save_checkpoint(tmp_path / "run", saved)
    assert path == tmp_path / "run" / CHECKPOINT_FILE
    assert sorted(os.listdir(tmp_path / "run")) == [CHECKPOINT_FILE], "a partial file was left behind"
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded is not None
    assert (loaded.round, loaded.seed, loaded.identity, loaded.config, loaded.metrics_size) == (
        3,
        7,
        saved.identity,
        saved.config,
        1234,
    )
    assert list(loaded.weights) == list(saved.weights)  # order kept
    for name, array in saved.weights.items():
        assert loaded.weights[name].dtype == array.dtype and np.array_equal(loaded.weights[name], array), name
    check_resumable(loaded, dict(saved.identity))  # same run: fine
    check_resumable(loaded, {**saved.identity, "unrelated": 1})  # only the identity fields count

    # A later round replaces the file whole.
    save_checkpoint(tmp_path / "run", checkpoint_of(4))
    again = load_checkpoint(tmp_path / "run")
    assert again is not None and again.round == 4

    with pytest.raises(CheckpointError) as changed:
        check_resumable(loaded, {**saved.identity, "workers": ["alice", "bob", "charlie"]})
    assert str(changed.value) == (
        "cannot resume: the run's configuration changed"
        " (workers was ['alice', 'bob'], now ['alice', 'bob', 'charlie']);"
        " use another --checkpoint-dir to start a new run"
    )
    with pytest.raises(CheckpointError) as two:
        check_resumable(loaded, {**saved.identity, "model": "mnist-cnn", "dataset": "mnist"})
    assert "model was 'digits-cnn', now 'mnist-cnn'; dataset was 'digits', now 'mnist'" in str(two.value)
    # Another named data set of the same kind is another run too; a checkpoint without the field
    # (written before it existed) reads as the default, None.
    assert "dataset_key" not in saved.identity
    with pytest.raises(CheckpointError, match=r"\(dataset_key was None, now 'digits-b'\)"):
        check_resumable(loaded, {**saved.identity, "dataset_key": "digits-b"})
    check_resumable(loaded, {**saved.identity, "dataset_key": None})


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"\x00" * 8 + data[8:], id="zeroed-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: os.urandom(len(data)), id="random"),
    ],
)
def test_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    path = save_checkpoint(tmp_path, checkpoint_of(2))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path)
    assert str(raised.value).startswith(f"cannot read checkpoint {path}: ")
    assert "\n" not in str(raised.value)


def test_a_checkpoint_without_syncfed_metadata_or_of_another_format_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / CHECKPOINT_FILE
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(tmp_path)
    assert str(missing.value) == f"{path} is a safetensors file but not a syncfed checkpoint"
    state = {"format": 99, "round": 1, "identity": {}, "seed": 1, "order": ["w"]}
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path), metadata={"syncfed": json.dumps(state)})
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path)
    assert str(raised.value) == f"{path} has checkpoint format 99, expected 1"
