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

from .exceptions import CheckpointError, describe
from .finite import nonfinite
from .tensors import Weights

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "save_weights",
    "save_checkpoint",
    "load_checkpoint",
    "check_resumable",
    "check_weights",
]

CHECKPOINT_FILE: Final = "checkpoint.safetensors"
#: Prefix of the strategy's tensors in the checkpoint file; no PyTorch tensor name contains a slash.
_SERVER: Final = "syncfed.server/"
_FORMAT: Final = 1

#: Rounds go on the wire as a plan's round (at most 2**63 - 1), and the next round is one more.
MAX_ROUND: Final = 2**63 - 1

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
    """Write ``weights`` as safetensors atomically: a temporary file, fsynced, renamed over ``path``.

    It stores what it is given, bit for bit, NaN included (the model registry is a store); the
    coordinator checks that a global model is finite before it saves or registers it.
    """
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    # np.asarray, not np.ascontiguousarray, which turns 0-d tensors (batch-norm counters) into shape (1,).
    save_file({name: np.asarray(array, order="C") for name, array in weights.items()}, str(partial), dict(metadata))
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` atomically and return its path.

    Raises:
        CheckpointError: if the model or the strategy's state holds NaN or infinity: the
            previous checkpoint stays, so ``--resume`` can still go on from it.
    """
    path = directory / CHECKPOINT_FILE
    reason = nonfinite(checkpoint.weights) or nonfinite(checkpoint.server_state)
    if reason is not None:
        raise CheckpointError(f"refusing to write a non-finite checkpoint of round {checkpoint.round}: {reason}")
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
            _check_state(state, path)
            weights = {name: handle.get_tensor(name) for name in state["order"]}
            server_state = {name: handle.get_tensor(_SERVER + name) for name in state.get("server_order", [])}
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
        reason = " ".join(str(exc).split())  # one line, whatever the library put in its message
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _check_state(state: Any, path: Path) -> None:
    """Refuse metadata of the wrong types or out of range, before any of it is used.

    Raises:
        CheckpointError: naming the first field that is wrong, and what it should be.
    """

    def field(name: str, valid: bool, expected: str) -> None:
        if not valid:
            raise CheckpointError(f"checkpoint {path} has {name} {describe(state.get(name))}, expected {expected}")

    def is_int(value: Any) -> bool:
        return type(value) is int

    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has metadata {describe(state)}, expected a JSON object")
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')!r}, expected {_FORMAT}")
    field("round", is_int(state.get("round")) and 1 <= state["round"] < MAX_ROUND, f"an integer in 1..{MAX_ROUND - 1}")
    field("seed", is_int(state.get("seed")) and 0 <= state["seed"] < 2**32, f"an integer in 0..{2**32 - 1}")
    field("identity", isinstance(state.get("identity"), dict), "an object")
    for name in ("config", "strategy_state"):
        field(name, isinstance(state.get(name, {}), dict | None), "an object")
    field("metrics_path", isinstance(state.get("metrics_path"), str | None), "a path or null")
    size = state.get("metrics_size")
    field("metrics_size", size is None or (is_int(size) and size >= 0), "a non-negative integer or null")
    for name in ("order", "server_order"):
        names = state.get(name, [])
        field(
            name,
            isinstance(names, list) and all(isinstance(item, str) for item in names) and len(set(names)) == len(names),
            "a list of distinct tensor names",
        )
    strategy = (state.get("strategy_state") or {}).get("name")
    field("strategy_state", strategy is None or isinstance(strategy, str), "an object whose name is a string")


def check_weights(checkpoint: Checkpoint, model: Mapping[str, np.ndarray]) -> None:
    """Refuse a checkpoint whose tensors do not fit the run's model, or hold NaN or infinity.

    ``model`` is the run's freshly built model's weights: the checkpoint must
    hold the same names, shapes and dtypes.

    Raises:
        CheckpointError: naming the first tensor that differs.
    """
    weights = checkpoint.weights
    if weights.keys() != model.keys():
        missing, extra = sorted(set(model) - set(weights)), sorted(set(weights) - set(model))
        raise CheckpointError(
            f"cannot resume: the checkpoint's tensors do not match the model's (missing {describe(missing)},"
            f" extra {describe(extra)})"
        )
    for name, array in model.items():
        got = weights[name]
        if got.shape != array.shape or got.dtype != array.dtype:
            raise CheckpointError(
                f"cannot resume: checkpoint tensor {name} is {got.dtype}{list(got.shape)},"
                f" the model's is {array.dtype}{list(array.shape)}"
            )
    for key, array in checkpoint.server_state.items():
        # A strategy's arrays are named slot/tensor, one per floating-point tensor of the model.
        reference = model.get(key.partition("/")[2])
        if reference is None or array.shape != reference.shape or array.dtype != reference.dtype:
            expected = "no tensor" if reference is None else f"{reference.dtype}{list(reference.shape)}"
            raise CheckpointError(
                f"cannot resume: checkpoint strategy state {key} is {array.dtype}{list(array.shape)},"
                f" the model's tensor is {expected}"
            )
    reason = nonfinite(weights) or nonfinite(checkpoint.server_state)
    if reason is not None:
        raise CheckpointError(f"cannot resume: the checkpoint is not finite: {reason}")


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
