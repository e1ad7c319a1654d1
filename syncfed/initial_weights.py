"""Initial weights: a run may start from weights the user holds rather than from a fresh model.

``--initial-weights PATH.safetensors`` on the coordinator: ImageNet weights
for ``resnet18`` (its tensor names are torchvision's), or the model an
earlier run saved with ``--save-model``. The file is read with safetensors,
never unpickled, and checked against the model tensor by tensor: names,
shapes and dtypes must all agree, unless ``--allow-partial-weights`` takes
what fits (transfer learning onto another head) and names what it skipped::

    weights, skipped = initial_weights(path, get_weights(model), allow_partial=True)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .exceptions import ModelError
from .finite import nonfinite
from .tensors import Weights

__all__ = ["initial_weights"]


def initial_weights(path: str | Path, model_weights: Weights, *, allow_partial: bool) -> tuple[Weights, list[str]]:
    """The model's starting weights taken from the safetensors file at ``path``, and the names skipped.

    ``model_weights`` are a freshly built model's (:func:`~syncfed.models.get_weights`), in its
    order. Each tensor comes from the file where the file has one of that name, shape and
    dtype. Without ``allow_partial`` every tensor must, and the file may hold no other; with
    it, the model's tensors the file lacks or does not fit keep their fresh values, and the
    skipped names (those, then the file's tensors the model has no place for) are returned.

    Raises:
        ModelError: if the file cannot be read as safetensors or holds a non-finite value; without
            ``allow_partial``, naming the first tensor that does not fit; with it, if none does.
    """
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise ModelError(f"initial weights {path}: no such file")
    try:
        loaded = load_file(str(path))
    except Exception as exc:  # safetensors raises its own errors, sharing no base with ours
        reason = " ".join(str(exc).split())  # one line, whatever the library put in its message
        raise ModelError(f"cannot read initial weights {path} as safetensors: {reason}") from None
    bad = nonfinite(loaded)
    if bad is not None:
        raise ModelError(f"initial weights {path}: {bad}")
    weights: Weights = {}
    skipped: list[str] = []
    first_misfit = ""
    for name, fresh in model_weights.items():
        misfit = _misfit(name, loaded.get(name), fresh)
        if misfit is None:
            weights[name] = loaded[name]
            continue
        if not allow_partial:
            raise ModelError(f"initial weights {path}: {misfit}")
        weights[name] = fresh
        skipped.append(name)
        first_misfit = first_misfit or misfit
    unused = [name for name in loaded if name not in model_weights]
    if unused and not allow_partial:
        raise ModelError(f"initial weights {path}: tensor {unused[0]} is not in the model")
    if model_weights and len(skipped) == len(model_weights):
        raise ModelError(f"initial weights {path}: no tensor fits the model, the first: {first_misfit}")
    return weights, skipped + unused


def _misfit(name: str, array: np.ndarray | None, fresh: np.ndarray) -> str | None:
    """Why ``array`` from the file cannot stand for the model's tensor ``name``, or ``None`` if it can."""
    if array is None:
        return f"no tensor {name}, which the model needs"
    if array.shape != fresh.shape:
        return f"tensor {name} has shape {array.shape}, the model needs {fresh.shape}"
    if array.dtype != fresh.dtype:
        return f"tensor {name} has dtype {array.dtype}, the model needs {fresh.dtype}"
    return None
