"""Tensors on the wire: dtype, shape and raw little-endian bytes.

Nothing executable crosses the wire, so a tensor is only ever a whitelisted
dtype name, a shape and a buffer whose length must match them. Decoding uses
``np.frombuffer`` and does not copy: the array is a read-only view of the
received bytes. A float tensor may instead carry lossy codes and how to
decode them (``encoding``, see :mod:`syncfed.compression`); it is decoded
into a new array of its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compression import CODE_DTYPES, compress, decompress
from .exceptions import TensorError, describe

__all__ = [
    "DTYPES",
    "Weights",
    "encode_tensor",
    "decode_tensor",
    "tensor_nbytes",
    "encode_weights",
    "decode_weights",
]

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


def encode_tensor(array: np.ndarray, *, compression: str = "none") -> dict[str, Any]:
    """Describe ``array`` for msgpack; the data is a view, not a copy, when contiguous and sent as it is.

    With ``compression`` (see :mod:`syncfed.compression`) a float tensor's
    data are codes instead, and the map says how to decode them.

    Raises:
        TensorError: if the dtype is not whitelisted.
        ConfigError: if ``compression`` is not one of ``COMPRESSIONS``.
    """
    name = array.dtype.name
    if name not in DTYPES:
        raise TensorError(f"dtype {name} is not one of {', '.join(DTYPES)}")
    array = array.astype(DTYPES[name], order="C", copy=False)
    packed = compress(array, compression)
    if packed is None:
        # A flat uint8 view exposes the raw bytes without copying, whatever the dtype or shape.
        return {"dtype": name, "shape": list(array.shape), "data": array.reshape(-1).view(np.uint8).data}
    encoded: dict[str, Any] = {
        "dtype": name,
        "shape": list(array.shape),
        "data": packed.codes.view(np.uint8).data,
        "encoding": packed.encoding,
    }
    if packed.encoding == "int8":
        encoded.update(scale=packed.scale, offset=packed.offset)
    return encoded


@dataclass(frozen=True)
class _Layout:
    """What a validated tensor map says its data holds."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    encoding: str | None
    scale: float
    offset: float
    nbytes: int

    def spec(self) -> str:
        coded = f" encoded with {self.encoding}" if self.encoding is not None else ""
        return f"dtype {self.dtype.name} and shape {self.shape}{coded}"


def _is_float(value: Any) -> bool:
    return type(value) is float and math.isfinite(value)


def _layout(value: Any, name: str, data_key: str) -> _Layout:
    """Check everything about a tensor map but its data, which is under ``data_key``."""
    plain = {"dtype", "shape", data_key}
    if not isinstance(value, Mapping) or (set(value) != plain and "encoding" not in value):
        raise TensorError(f"{name} must be a map with keys dtype, shape and {data_key}")
    encoding = value.get("encoding")
    if "encoding" in value:
        if not isinstance(encoding, str) or encoding not in CODE_DTYPES:
            raise TensorError(f"{name} has encoding {describe(encoding)}, not one of {', '.join(CODE_DTYPES)}")
        keys = plain | {"encoding"} | ({"scale", "offset"} if encoding == "int8" else set())
        if set(value) != keys:
            raise TensorError(f"{name} encoded with {encoding} must be a map with keys {', '.join(sorted(keys))}")
    dtype_name, shape = value["dtype"], value["shape"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise TensorError(f"{name} has dtype {describe(dtype_name)}, not one of {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(dim) is int and 0 <= dim <= MAX_DIM for dim in shape)
    ):
        raise TensorError(f"{name} has shape {describe(shape)}, not a list of at most {MAX_DIMS} sizes up to {MAX_DIM}")
    dtype = DTYPES[dtype_name]
    scale = offset = 0.0
    if encoding is not None:
        if dtype.kind != "f":
            raise TensorError(f"{name} has dtype {dtype_name}, which {encoding} does not encode")
        if encoding == "int8":
            scale, offset = value["scale"], value["offset"]
            if not (_is_float(scale) and scale >= 0 and _is_float(offset)):
                raise TensorError(
                    f"{name} has scale {describe(scale)} and offset {describe(offset)},"
                    " not finite floats with a non-negative scale"
                )
    itemsize = dtype.itemsize if encoding is None else CODE_DTYPES[encoding].itemsize
    return _Layout(dtype, tuple(shape), encoding, scale, offset, math.prod(shape) * itemsize)


def tensor_nbytes(value: Any, *, name: str = "tensor") -> int:
    """Check a streamed tensor's header entry (a tensor map with ``nbytes`` in place of ``data``) and
    return its byte count, so a receiver can refuse it before allocating anything.

    Raises:
        TensorError: if the dtype, shape or encoding is invalid, or ``nbytes`` does not match them.
    """
    layout = _layout(value, name, "nbytes")
    nbytes = value["nbytes"]
    if type(nbytes) is not int or nbytes != layout.nbytes:
        raise TensorError(f"{name} declares {describe(nbytes)} bytes but {layout.spec()} need {layout.nbytes}")
    return nbytes


def decode_tensor(value: Any, *, name: str = "tensor") -> np.ndarray:
    """Turn a decoded ``{"dtype", "shape", "data"}`` map into a read-only array.

    ``data`` is bytes (a view of them is returned) or, from the streamed
    format, a flat uint8 array the receiver filled (viewed the same way).
    Compressed data are decoded into a new array of the tensor's dtype.

    Raises:
        TensorError: if the dtype, shape or encoding is invalid or the bytes do not match them.
    """
    layout = _layout(value, name, "data")
    data = value["data"]
    if not (isinstance(data, bytes) or (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1)):
        raise TensorError(f"{name} data must be bytes, not {type(data).__name__}")
    if len(data) != layout.nbytes:
        raise TensorError(f"{name} has {len(data)} bytes but {layout.spec()} need {layout.nbytes}")
    try:
        if layout.encoding is None:
            array = np.frombuffer(data, dtype=layout.dtype).reshape(layout.shape)
        else:
            codes = np.frombuffer(data, dtype=CODE_DTYPES[layout.encoding])
            flat = decompress(codes, layout.encoding, layout.dtype, layout.scale, layout.offset)
            array = flat.reshape(layout.shape)
    except (ValueError, OverflowError):  # sizes numpy cannot index, even with no elements
        raise TensorError(f"{name} has shape {layout.shape}, which numpy cannot hold") from None
    array.flags.writeable = False
    return array


def encode_weights(weights: Mapping[str, np.ndarray], *, compression: str = "none") -> dict[str, dict[str, Any]]:
    """Describe every tensor of ``weights`` for msgpack, keeping the order; see :func:`encode_tensor`."""
    return {name: encode_tensor(array, compression=compression) for name, array in weights.items()}


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
