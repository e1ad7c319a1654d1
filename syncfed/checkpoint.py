"""Checkpoints: the global model and everything needed to go on after a crash.

One safetensors file per run directory, replaced atomically (write, fsync,
rename) after every completed round, so killing the coordinator at any
moment loses at most the round in progress. The weights are tensors; the
rest (round, strategy state, seed, the run's identity, the metrics file's
length) is JSON in the file's metadata. Never pickle.

All randomness of a run derives from ``(seed, round, worker)``
(``coordinator.plan_seed``), so the seed is the whole RNG state: a resumed
run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .exceptions import CheckpointError
from .tensors import Weights

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "save_weights", "save_checkpoint", "load_checkpoint", "check_resumable"]

CHECKPOINT_FILE: Final = "checkpoint.safetensors"
#: Prefix of the strategy's tensors in the checkpoint file; no PyTorch tensor name contains a slash.
_SERVER: Final = "syncfed.server/"
_FORMAT: Final = 1

#: What must not change between a run and its resumption.
IDENTITY_FIELDS: Final = ("model", "dataset", "dataset_key", "workers", "evaluator")


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``round`` completed rounds."""

    round: int
    weights: Weights
    identity: dict[str, Any]  # model, dataset, dataset key, workers, evaluator
    seed: int
    config: dict[str, Any] = field(default_factory=dict)  # the run's settings, for the record
    strategy_state: dict[str, Any] = field(default_factory=dict)  # the strategy's name and settings
    server_state: Weights = field(default_factory=dict)  # the strategy's arrays: momentum, moments, control variate
    metrics_path: str | None = None  # the metrics file of the run, resolved
    metrics_size: int | None = None  # its bytes at this round's end (fsynced before the checkpoint)


def save_weights(path: Path, weights: Weights, metadata: Mapping[str, str]) -> None:
    """Write ``weights`` as safetensors atomically: a temporary file, fsynced, renamed over ``path``."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    # np.asarray, not np.ascontiguousarray, which turns 0-d tensors (batch-norm counters) into shape (1,).
    save_file({name: np.asarray(array, order="C") for name, array in weights.items()}, str(partial), dict(metadata))
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` atomically and return its path."""
    path = directory / CHECKPOINT_FILE
    state = {
        "format": _FORMAT,
        "round": checkpoint.round,
        "identity": checkpoint.identity,
        "seed": checkpoint.seed,
        "config": checkpoint.config,
        "strategy_state": checkpoint.strategy_state,
        "metrics_path": checkpoint.metrics_path,
        "metrics_size": checkpoint.metrics_size,
        "order": list(checkpoint.weights),
        "server_order": list(checkpoint.server_state),
    }
    tensors = {**checkpoint.weights, **{_SERVER + name: array for name, array in checkpoint.server_state.items()}}
    save_weights(path, tensors, {"format": "pt", "syncfed": json.dumps(state)})
    return path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Read the checkpoint in ``directory``, or ``None`` when there is none.

    Raises:
        CheckpointError: if the file exists but cannot be read.
    """
    from safetensors import safe_open

    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if "syncfed" not in metadata:
                raise CheckpointError(f"{path} is a safetensors file but not a syncfed checkpoint")
            state = json.loads(metadata["syncfed"])
            weights = {name: handle.get_tensor(name) for name in state["order"]}
            server_state = {name: handle.get_tensor(_SERVER + name) for name in state.get("server_order", [])}
        if state.get("format") != _FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {state.get('format')!r}, expected {_FORMAT}")
        return Checkpoint(
            round=int(state["round"]),
            weights=weights,
            identity=dict(state["identity"]),
            seed=int(state["seed"]),
            config=dict(state.get("config") or {}),
            strategy_state=dict(state.get("strategy_state") or {}),
            server_state=server_state,
            metrics_path=state.get("metrics_path"),
            metrics_size=state.get("metrics_size"),
        )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, JSON and key errors all mean the same thing here
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def check_resumable(checkpoint: Checkpoint, identity: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose model, data set (or named data set) or workers changed.

    A checkpoint from before a field existed lacks it, which reads as None:
    the field's default, so such a run resumes as long as it keeps that default.

    Raises:
        CheckpointError: naming each field that differs, with both values.
    """
    differences = [
        f"{name} was {checkpoint.identity.get(name)!r}, now {identity.get(name)!r}"
        for name in IDENTITY_FIELDS
        if checkpoint.identity.get(name) != identity.get(name)
    ]
    if differences:
        raise CheckpointError(
            "cannot resume: the run's configuration changed (" + "; ".join(differences) + ");"
            " use another --checkpoint-dir to start a new run"
        )
