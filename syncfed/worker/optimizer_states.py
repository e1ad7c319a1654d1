"""The optimizer state a worker keeps from round to round when a plan asks for it (``keep_state``).

Kept per model (its :data:`~syncfed.worker.catalog.ModelKey`) and
optimizer, in memory, and with ``--state-dir`` also on disk, so that a
restarted worker goes on with its momentum and Adam moments instead of
starting them from zero. Each state is one safetensors file: its tensors
under ``<parameter index>.<name>`` and everything else (the key, the
optimizer, non-tensor values) as JSON in the file's metadata. Nothing is
pickled, so a state file can be read without trusting it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final, TypeAlias

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..exceptions import ConfigError

__all__ = ["StateKey", "OptimizerStates"]

logger = logging.getLogger("syncfed.worker")

#: A kept state: the model's name, the digest it was sized from ("" for none), and the optimizer.
StateKey: TypeAlias = tuple[str, str, str]

#: Marks a file as one of these states, and its layout's version.
FORMAT: Final = "syncfed-optimizer-state-1"


class OptimizerStates:
    """Optimizer states by :data:`StateKey`, the most recently used ``max_states`` of them.

    Raises:
        ConfigError: if ``max_states`` is below 1, or a file in ``directory`` cannot be read as a state.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        # Limits
        max_states: int = 16,
    ) -> None:
        if max_states < 1:
            raise ConfigError(f"max optimizer states {max_states} must be at least 1")
        self.directory = directory
        self.max_states = max_states
        self._states: OrderedDict[StateKey, dict[str, Any]] = OrderedDict()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(directory.glob("*.safetensors"), key=lambda path: path.stat().st_mtime):
                key, state = _read(path)
                self._states[key] = state
                self._bound()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: StateKey) -> dict[str, Any] | None:
        """The state kept under ``key``, or ``None`` (the optimizer starts afresh)."""
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: StateKey, state: dict[str, Any]) -> None:
        """Keep ``state`` (a :attr:`syncfed.training.TrainResult.state`) under ``key``, on disk too with a directory."""
        self._states[key] = state
        self._states.move_to_end(key)
        if self.directory is not None:
            _write(self._path(key), key, state)
        self._bound()

    def drop(self, model: tuple[str, str]) -> None:
        """Forget every optimizer's state for ``model``: its next round with ``keep_state`` starts afresh."""
        for key in [key for key in self._states if key[:2] == model]:
            self._forget(key)

    def _bound(self) -> None:
        while len(self._states) > self.max_states:
            self._forget(next(iter(self._states)))

    def _forget(self, key: StateKey) -> None:
        del self._states[key]
        if self.directory is not None:
            self._path(key).unlink(missing_ok=True)

    def _path(self, key: StateKey) -> Path:
        assert self.directory is not None
        name = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32]
        return self.directory / f"{name}.safetensors"


def _write(path: Path, key: StateKey, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` whole or not at all: a crash mid-write leaves the previous file."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entry in state["torch"]["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    metadata = {"format": FORMAT, "key": json.dumps(list(key)), "optimizer": state["optimizer"]}
    metadata["values"] = json.dumps(values)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def _read(path: Path) -> tuple[StateKey, dict[str, Any]]:
    """The key and state saved in ``path`` by :func:`_write`.

    Raises:
        ConfigError: if the file is not such a state.
    """
    try:
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"its format is {metadata.get('format')!r}, not {FORMAT}")
            key = json.loads(metadata["key"])
            if not (isinstance(key, list) and len(key) == 3 and all(isinstance(part, str) for part in key)):
                raise ValueError(f"its key {key!r} is not a model name, digest and optimizer")
            entries: dict[int, dict[str, Any]] = {}
            for index, values in json.loads(metadata["values"]).items():
                entries.setdefault(int(index), {}).update(values)
            for name in saved.keys():
                index, _, field = name.partition(".")
                entries.setdefault(int(index), {})[field] = saved.get_tensor(name)
            optimizer = metadata["optimizer"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise ConfigError(f"optimizer state file {path} cannot be read: {exc}") from None
    logger.info("optimizer state of %s (%s) read from %s", key[0], key[2], path)
    state = {"optimizer": optimizer, "torch": {"state": entries, "param_groups": []}}
    return (key[0], key[1], key[2]), state
