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

from .exceptions import TensorError, describe

__all__ = ["DTYPES", "Weights", "encode_tensor", "decode_tensor", "encode_weights", "decode_weights"]

#: A model's parameters and buffers by name, in a stable order.
Weights = dict[str, np.ndarray]

#: Wire names of the accepted dtypes, all little-endian.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
}

#: Upper bounds on the number of dimensions (as in numpy), on each size (numpy
#: cannot index sizes that multiply past 2**63, even with a zero among them)
#: and on the length of a tensor's name.
MAX_DIMS = 32
MAX_DIM = 2**31
MAX_NAME = 1024


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
        raise TensorError(f"{name} has dtype {describe(dtype_name)}, not one of {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(dim) is int and 0 <= dim <= MAX_DIM for dim in shape)
    ):
        raise TensorError(f"{name} has shape {describe(shape)}, not a list of at most {MAX_DIMS} sizes up to {MAX_DIM}")
    if not isinstance(data, bytes):
        raise TensorError(f"{name} data must be bytes, not {type(data).__name__}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{name} has {len(data)} bytes but dtype {dtype_name} and shape {tuple(shape)} need {expected}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError):  # sizes numpy cannot index, even with no elements
        raise TensorError(f"{name} has shape {tuple(shape)}, which numpy cannot hold") from None


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
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise TensorError(f"tensor name {describe(name)} must be a string of 1 to {MAX_NAME} characters")
        weights[name] = decode_tensor(tensor, name=f"tensor {name}")
    return weights
