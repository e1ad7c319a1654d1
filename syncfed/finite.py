"""Finiteness of weights: one NaN or infinity in an update poisons every tensor it is averaged into.

A peer can send non-finite values in many legal ways (plain NaN, fp16 NaN
codes, an int8 ``scale`` whose product with a code overflows the tensor's
dtype), so the coordinator checks what it received *after* decoding, and
checks again whatever it is about to save. The scan goes in blocks, so it
allocates a small mask whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from .exceptions import AggregationError
from .tensors import Weights

__all__ = ["finite_model", "nonfinite"]

#: Elements scanned at a time: the boolean mask stays at 1 MiB.
_BLOCK: Final = 1 << 20


def nonfinite(weights: Mapping[str, np.ndarray]) -> str | None:
    """Which tensor of ``weights`` holds a NaN or an infinity, and how many, if any does.

    Integer and boolean tensors are always finite. The answer reads like
    ``tensor conv1.weight holds 3 non-finite values (nan, inf)``.
    """
    for name, array in weights.items():
        if array.dtype.kind not in "fc":
            continue
        flat = np.ravel(array)
        bad = 0
        kinds: set[str] = set()
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            mask = ~np.isfinite(block)
            count = int(np.count_nonzero(mask))
            if count:
                bad += count
                values = block[mask]
                kinds |= {"nan"} if np.isnan(values).any() else set()
                kinds |= {"inf"} if np.isinf(values).any() else set()
        if bad:
            return f"tensor {name} holds {bad} non-finite values ({', '.join(sorted(kinds, reverse=True))})"
    return None


def finite_model(weights: Weights, version: int) -> Weights:
    """``weights``, the new global model, unless a server optimizer overflowed on finite updates.

    Raises:
        AggregationError: naming the tensor; the run stops before anything non-finite is saved.
    """
    reason = nonfinite(weights)
    if reason is not None:
        raise AggregationError(f"round {version}: the aggregated model is not finite: {reason}")
    return weights
