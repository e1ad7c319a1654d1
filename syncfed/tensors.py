"""Tensors on the wire: dtype, shape and raw little-endian bytes.

Nothing executable crosses the wire, so a tensor is only ever a whitelisted
dtype name, a shape and a buffer whose length must match them. Decoding uses
``np.frombuffer`` and does not copy: the array is a read-only view of the
received bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .exceptions import TensorError

__all__ = ["DTYPES", "Weights", "encode_tensor", "decode_tensor", "encode_weights", "decode_weights"]

#: A model's parameters and buffers by name, in a stable order.
Weights = dict[str, np.ndarray]

#: Wire names of the accepted dtypes, all little-endian.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
}

#: Upper bound on the number of dimensions, as in numpy.
MAX_DIMS = 32


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Describe ``array`` for msgpack; the data is a view, not a copy, when contiguous."""
    name = array.dtype.name
    if name not in DTYPES:
        raise TensorError(f"dtype {name} is not one of {', '.join(DTYPES)}")
    array = array.astype(DTYPES[name], order="C", copy=False)
    # A flat uint8 view exposes the raw bytes without copying, whatever the dtype or shape.
    return {"dtype": name, "shape": list(array.shape), "data": array.reshape(-1).view(np.uint8).data}


def decode_tensor(value: Any, *, name: str = "tensor") -> np.ndarray:
    """Turn a decoded ``{"dtype", "shape", "data"}`` map into a read-only array.

    Raises:
        TensorError: if the dtype is not whitelisted or the bytes do not match the shape.
    """
    if not isinstance(value, Mapping) or set(value) != {"dtype", "shape", "data"}:
        raise TensorError(f"{name} must be a map with keys dtype, shape and data")
    dtype_name, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise TensorError(f"{name} has dtype {dtype_name!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise TensorError(f"{name} has shape {shape!r}, not a list of at most {MAX_DIMS} sizes")
    if not isinstance(data, bytes):
        raise TensorError(f"{name} data must be bytes, not {type(data).__name__}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{name} has {len(data)} bytes but dtype {dtype_name} and shape {tuple(shape)} need {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_weights(weights: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Describe every tensor of ``weights`` for msgpack, keeping the order."""
    return {name: encode_tensor(array) for name, array in weights.items()}


def decode_weights(value: Any, *, max_tensors: int = 100_000) -> Weights:
    """Decode a map of named tensors.

    Raises:
        TensorError: if the map, a name or a tensor is invalid.
    """
    if not isinstance(value, Mapping):
        raise TensorError(f"weights must be a map of tensors, not {type(value).__name__}")
    if len(value) > max_tensors:
        raise TensorError(f"weights with {len(value)} tensors exceed limit of {max_tensors} tensors")
    weights: Weights = {}
    for name, tensor in value.items():
        if not isinstance(name, str) or not name:
            raise TensorError(f"tensor name {name!r} must be a non-empty string")
        weights[name] = decode_tensor(tensor, name=f"tensor {name}")
    return weights
