"""Tensors on the wire: dtype name, shape and raw little-endian bytes."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from syncfed.exceptions import ProtocolError, TensorError
from syncfed.tensors import (
    DTYPES,
    MAX_DIMS,
    decode_tensor,
    decode_weights,
    encode_tensor,
    encode_weights,
)

WHITELIST = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def wire(array: np.ndarray) -> dict:
    """What the receiver sees: the encoded map with its data as bytes."""
    encoded = encode_tensor(array)
    return {**encoded, "data": bytes(encoded["data"])}


def through_msgpack(value: object) -> object:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: exact, NaN payloads included."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_whitelist_is_exactly_the_documented_dtypes() -> None:
    assert tuple(DTYPES) == WHITELIST
    assert all(dtype.byteorder in ("<", "|", "=") and dtype.newbyteorder("<") == dtype for dtype in DTYPES.values())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype_name=st.sampled_from(WHITELIST), shape=shapes)
def test_round_trip_every_whitelisted_dtype(data: st.DataObject, dtype_name: str, shape: tuple[int, ...]) -> None:
    array = data.draw(hnp.arrays(np.dtype(dtype_name), shape))
    encoded = encode_tensor(array)
    assert encoded["dtype"] == dtype_name
    assert encoded["shape"] == list(shape)
    assert len(encoded["data"]) == array.size * array.itemsize

    direct = decode_tensor(wire(array))
    assert same_bits(direct, array)

    via_msgpack = decode_tensor(through_msgpack(encode_tensor(array)))
    assert same_bits(via_msgpack, array)


@settings(max_examples=30, deadline=None)
@given(
    array=hnp.arrays(
        st.sampled_from([np.dtype(">f4"), np.dtype(">i8"), np.dtype(">f8"), np.dtype(">i2")]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    )
)
def test_big_endian_input_goes_out_little_endian(array: np.ndarray) -> None:
    encoded = wire(array)
    assert encoded["data"] == array.astype(array.dtype.newbyteorder("<")).tobytes()
    decoded = decode_tensor(encoded)
    assert decoded.dtype == DTYPES[array.dtype.name]
    np.testing.assert_array_equal(decoded, array)


def test_non_contiguous_input_is_sent_in_c_order() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    view = base.T[::2]  # neither C- nor F-contiguous
    assert not view.flags.c_contiguous
    decoded = decode_tensor(wire(view))
    np.testing.assert_array_equal(decoded, view)
    assert decoded.shape == (3, 4)


def test_zero_d_and_empty_tensors() -> None:
    scalar = decode_tensor({"dtype": "float64", "shape": [], "data": np.float64(2.5).tobytes()})
    assert scalar.shape == () and scalar == 2.5
    empty = decode_tensor({"dtype": "int64", "shape": [3, 0, 2], "data": b""})
    assert empty.shape == (3, 0, 2) and empty.dtype == np.int64


def test_decode_is_zero_copy_and_read_only() -> None:
    payload = np.arange(12, dtype="<f4").tobytes()
    array = decode_tensor({"dtype": "float32", "shape": [3, 4], "data": payload})
    assert np.shares_memory(array, np.frombuffer(payload, dtype=np.uint8))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0, 0] = 1.0


def test_encode_does_not_copy_contiguous_arrays() -> None:
    array = np.arange(10, dtype=np.float32)
    data = encode_tensor(array)["data"]
    assert isinstance(data, memoryview)
    assert np.shares_memory(np.frombuffer(data, dtype=np.uint8), array)


@pytest.mark.parametrize(
    "dtype_name",
    [
        "float128",
        "complex64",
        "complex128",
        "object",
        "uint16",
        "uint32",
        "uint64",
        "bfloat16",
        "f4",
        "<f4",
        "float32 ",
        "FLOAT32",
        "",
        "O",
        "V8",
        "str",
    ],
)
def test_non_whitelisted_dtype_names_are_rejected(dtype_name: str) -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor({"dtype": dtype_name, "shape": [1], "data": b"\x00" * 4})
    assert info.value.code == "bad_tensor"
    assert str(info.value) == (
        f"tensor has dtype {dtype_name!r}, not one of float16, float32, float64, int8, uint8, int16, int32, int64, bool"
    )


@pytest.mark.parametrize("dtype_name", [None, 4, 1.5, b"float32"])
def test_non_string_dtype_is_rejected(dtype_name: object) -> None:
    with pytest.raises(TensorError):
        decode_tensor({"dtype": dtype_name, "shape": [1], "data": b"\x00" * 4})


# Regression test for a bug once in syncfed/tensors.py, decode_tensor.
@pytest.mark.parametrize("dtype_name", [["float32"], {"name": "float32"}])
def test_unhashable_dtype_is_rejected_as_tensor_error(dtype_name: object) -> None:
    with pytest.raises(TensorError):
        decode_tensor({"dtype": dtype_name, "shape": [1], "data": b"\x00" * 4})


@pytest.mark.parametrize("dtype", [np.complex64, np.uint16, np.float128 if hasattr(np, "float128") else np.uint64])
def test_encode_rejects_non_whitelisted_arrays(dtype: type) -> None:
    with pytest.raises(TensorError, match="is not one of"):
        encode_tensor(np.zeros(3, dtype=dtype))


def test_encode_rejects_object_arrays() -> None:
    with pytest.raises(TensorError):
        encode_tensor(np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize("dtype_name", WHITELIST)
@pytest.mark.parametrize("delta", [-1, 1])
def test_byte_count_one_short_or_one_over(dtype_name: str, delta: int) -> None:
    itemsize = np.dtype(dtype_name).itemsize
    good = b"\x00" * (6 * itemsize)
    data = good[:-1] if delta < 0 else good + b"\x00"
    assert decode_tensor({"dtype": dtype_name, "shape": [2, 3], "data": good}).shape == (2, 3)
    with pytest.raises(TensorError) as info:
        decode_tensor({"dtype": dtype_name, "shape": [2, 3], "data": data})
    assert str(info.value) == (
        f"tensor has {len(data)} bytes but dtype {dtype_name} and shape (2, 3) need {6 * itemsize}"
    )


def test_byte_count_of_empty_and_scalar_tensors() -> None:
    with pytest.raises(TensorError):
        decode_tensor({"dtype": "int8", "shape": [0], "data": b"\x00"})
    with pytest.raises(TensorError):
        decode_tensor({"dtype": "float32", "shape": [], "data": b""})


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [2.0], ["2"], [True], [None], [[2]], 6, "6", None, {"0": 6}],
)
def test_bad_shapes_are_rejected(shape: object) -> None:
    with pytest.raises(TensorError, match="has shape"):
        decode_tensor({"dtype": "uint8", "shape": shape, "data": b"\x00" * 6})


def test_number_of_dimensions_at_and_over_the_limit() -> None:
    assert MAX_DIMS == 32
    at_limit = decode_tensor({"dtype": "uint8", "shape": [1] * MAX_DIMS, "data": b"\x07"})
    assert at_limit.ndim == MAX_DIMS
    with pytest.raises(TensorError) as info:
        decode_tensor({"dtype": "uint8", "shape": [1] * (MAX_DIMS + 1), "data": b"\x07"})
    assert "not a list of at most 32 sizes" in str(info.value)


def test_huge_shape_does_not_allocate() -> None:
    with pytest.raises(TensorError, match="sizes up to 2147483648"):
        decode_tensor({"dtype": "float64", "shape": [2**40, 2**40], "data": b"\x00" * 8})


@pytest.mark.parametrize(
    "value",
    [
        None,
        [1, 2],
        b"raw",
        {"dtype": "uint8", "shape": [1]},
        {"dtype": "uint8", "shape": [1], "data": b"\x00", "extra": 1},
        {"type": "uint8", "shape": [1], "data": b"\x00"},
    ],
)
def test_tensor_must_be_a_map_with_three_keys(value: object) -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor(value)
    assert str(info.value) == "tensor must be a map with keys dtype, shape and data"


@pytest.mark.parametrize("data", ["\x00", [0], bytearray(b"\x00"), memoryview(b"\x00"), None])
def test_data_must_be_bytes(data: object) -> None:
    with pytest.raises(TensorError, match="data must be bytes"):
        decode_tensor({"dtype": "uint8", "shape": [1], "data": data})


def test_tensor_errors_are_protocol_errors() -> None:
    assert issubclass(TensorError, ProtocolError)
    assert TensorError("x").code == "bad_tensor"


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(st.sampled_from([np.dtype(n) for n in WHITELIST]), shapes),
        max_size=5,
    )
)
def test_weights_round_trip_keeps_names_order_and_bits(weights: dict[str, np.ndarray]) -> None:
    decoded = decode_weights(through_msgpack(encode_weights(weights)))
    assert list(decoded) == list(weights)
    assert all(same_bits(decoded[name], weights[name]) for name in weights)


def test_weights_error_names_the_tensor() -> None:
    value = {"conv1.weight": {"dtype": "float32", "shape": [2], "data": b"\x00" * 7}}
    with pytest.raises(TensorError) as info:
        decode_weights(value)
    assert str(info.value) == "tensor conv1.weight has 7 bytes but dtype float32 and shape (2,) need 8"


@pytest.mark.parametrize("value", [None, [], "weights", b"\x00"])
def test_weights_must_be_a_map(value: object) -> None:
    with pytest.raises(TensorError, match="weights must be a map of tensors"):
        decode_weights(value)


@pytest.mark.parametrize("name", ["", 3, b"w", None, "n" * 1025])
def test_weights_names_must_be_strings_of_bounded_length(name: object) -> None:
    with pytest.raises(TensorError, match="must be a string of 1 to 1024 characters"):
        decode_weights({name: wire(np.zeros(1, np.float32))})
    assert decode_weights({"n" * 1024: wire(np.zeros(1, np.float32))})


def test_weights_tensor_limit_at_and_over() -> None:
    value = {f"t{i}": wire(np.full(2, i, dtype=np.int16)) for i in range(3)}
    assert len(decode_weights(value, max_tensors=3)) == 3
    with pytest.raises(TensorError) as info:
        decode_weights(value, max_tensors=2)
    assert str(info.value) == "weights with 3 tensors exceed limit of 2 tensors"


def test_byte_counts_follow_itemsize() -> None:
    for name, dtype in DTYPES.items():
        shape = [3, 2]
        tensor = decode_tensor({"dtype": name, "shape": shape, "data": b"\x01" * (math.prod(shape) * dtype.itemsize)})
        assert tensor.dtype == dtype
