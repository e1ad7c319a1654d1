"""Lossy encodings of float tensors, to cut the bytes of workers' updates on slow links.

Two encodings of one float tensor, both decoded back to its own dtype:

- ``fp16``: each value cast to IEEE half precision. The relative error of a
  value is at most 2**-11 (about 4.9e-4) in float16's normal range; values
  below it (magnitude under 6.1e-5) lose at most 2**-25 absolutely.
- ``int8``: per-tensor linear quantization to 8-bit codes ``q`` in 0..255,
  ``w ~ offset + q * scale`` with ``offset = min(w)`` and
  ``scale = (max(w) - min(w)) / 255``, both sent as float64. Codes are the
  nearest integers, so each value is off by at most ``scale / 2``, plus the
  rounding of the result to the tensor's dtype.

Quantizing the update ``w - w_global`` rather than the weights keeps
``scale`` small (QSGD, Alistarh et al. 2017; "Federated Learning: Strategies
for Improving Communication Efficiency", Konečný et al. 2016). A tensor that
an encoding cannot hold faithfully (non-finite values, values past float16's
range, a range too wide for a finite scale) goes uncompressed, and so do
non-float tensors, empty ones and float16 ones under ``fp16``: compression
never changes what a value means, only how precisely it arrives.

This module does no I/O and trusts its inputs: peers' values are checked in
:mod:`syncfed.tensors` before they get here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from .exceptions import ConfigError

__all__ = [
    "COMPRESSIONS",
    "CODE_DTYPES",
    "Compressed",
    "check_method",
    "compress",
    "decompress",
    "compression_error",
]

#: The ``compression`` settings, from lossless to smallest.
COMPRESSIONS: Final = ("none", "fp16", "int8")

#: The dtype of the codes each encoding puts on the wire.
CODE_DTYPES: Final[dict[str, np.dtype[Any]]] = {"fp16": np.dtype("<f2"), "int8": np.dtype("u1")}

#: Elements handled at a time, so float64 temporaries stay small whatever the tensor's size.
_BLOCK: Final = 1 << 20
_FP16_MAX: Final = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Compressed:
    """One tensor's codes (flat, C order) and the parameters that decode them."""

    encoding: str
    codes: np.ndarray
    scale: float = 0.0
    offset: float = 0.0


def _blocks(size: int) -> Iterator[slice]:
    for start in range(0, size, _BLOCK):
        yield slice(start, min(start + _BLOCK, size))


def check_method(method: str) -> None:
    """Raise :class:`ConfigError` unless ``method`` is one of :data:`COMPRESSIONS`."""
    if method not in COMPRESSIONS:
        raise ConfigError(f"compression {method!r} is not one of {', '.join(COMPRESSIONS)}")


def compress(array: np.ndarray, method: str) -> Compressed | None:
    """Encode ``array`` with ``method``, or ``None`` when it goes as it is (see the module docstring).

    Raises:
        ConfigError: if ``method`` is not one of :data:`COMPRESSIONS`.
    """
    check_method(method)
    if method == "none" or array.dtype.kind != "f" or array.size == 0:
        return None
    flat = array.reshape(-1)
    if method == "fp16":
        if array.dtype.itemsize <= 2:
            return None
        # Values past float16's largest finite one (+ half an ulp) would turn into infinities.
        magnitude = float(np.max(np.abs(flat)))
        if not magnitude <= _FP16_MAX:
            return None
        return Compressed("fp16", flat.astype(CODE_DTYPES["fp16"]))
    low, high = float(np.min(flat)), float(np.max(flat))
    scale = (high - low) / 255
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(scale)):
        return None
    codes = np.empty(flat.size, dtype=CODE_DTYPES["int8"])
    if scale > 0:
        for block in _blocks(flat.size):
            # float64 keeps the rounding to the nearest code exact for every input dtype.
            levels = (flat[block].astype(np.float64) - low) / scale
            codes[block] = np.clip(np.rint(levels), 0, 255)
    else:
        codes.fill(0)  # a constant tensor: every value is the offset
    return Compressed("int8", codes, scale, low)


def decompress(codes: np.ndarray, encoding: str, dtype: np.dtype[Any], scale: float, offset: float) -> np.ndarray:
    """Decode flat ``codes`` of ``encoding`` into a new flat array of ``dtype``."""
    if encoding == "fp16":
        return codes.astype(dtype)
    values = np.empty(codes.size, dtype=dtype)
    # A peer's legal scale and offset may still overflow the dtype: that gives infinities, which
    # the receiver refuses (see syncfed.finite), not a warning here.
    with np.errstate(over="ignore"):
        for block in _blocks(codes.size):
            values[block] = offset + codes[block] * scale  # computed in float64, rounded once into dtype
    return values


def compression_error(original: Mapping[str, np.ndarray], method: str) -> float:
    """Relative L2 error ``||decode(encode(w)) - w|| / ||w||`` over all float tensors of ``original``.

    0.0 for ``none``, for weights without float tensors and for all-zero ones;
    NaN when the weights hold NaN. Workers report it in their metrics; it
    costs one encode and one decode of every float tensor.

    Raises:
        ConfigError: if ``method`` is not one of :data:`COMPRESSIONS`.
    """
    check_method(method)
    error = norm = 0.0
    for array in original.values():
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        packed = compress(array, method)
        decoded = (
            None
            if packed is None
            else decompress(packed.codes, packed.encoding, flat.dtype, packed.scale, packed.offset)
        )
        for block in _blocks(flat.size):
            exact = flat[block].astype(np.float64)
            norm += float(np.sum(np.square(exact)))
            if decoded is not None:  # a tensor sent as it is arrives exactly
                error += float(np.sum(np.square(decoded[block] - exact)))
    return math.sqrt(error) / math.sqrt(norm) if norm > 0 else 0.0
