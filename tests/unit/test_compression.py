"""Update compression: fp16 and int8 encodings of float tensors, their error bounds and their validation."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from syncfed.compression import COMPRESSIONS, compress, compression_error
from syncfed.exceptions import ConfigError, TensorError
from syncfed.models import DigitsCNN, get_weights
from syncfed.protocol import FitResult, decode, encode, encode_fragments
from syncfed.tensors import decode_tensor, decode_weights, encode_tensor, encode_weights

FLOATS = ("float16", "float32", "float64")


def wire(array: np.ndarray, compression: str) -> dict[str, object]:
    """The tensor map a receiver sees: through msgpack, data as bytes."""
    packed = msgpack.packb(encode_tensor(array, compression=compression), use_bin_type=True)
    return msgpack.unpackb(packed, raw=False)  # type: ignore[no-any-return]


def typical_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    weights = get_weights(DigitsCNN())
    weights["update"] = (rng.standard_normal(50_000) * 1e-3).astype(np.float32)  # a small FedAvg delta
    weights["wide"] = rng.standard_normal((64, 64)).astype(np.float64)
    return weights


def test_methods() -> None:
    assert COMPRESSIONS == ("none", "fp16", "int8")


@pytest.mark.parametrize("method", ["gzip", "", "FP16", None, "int4"])
def test_unknown_methods_are_config_errors(method: object) -> None:
    array = np.ones(3, np.float32)
    expected = f"compression {method!r} is not one of none, fp16, int8"
    for call in (
        lambda: encode_tensor(array, compression=method),  # type: ignore[arg-type]
        lambda: encode_weights({"w": array}, compression=method),  # type: ignore[arg-type]
        lambda: compression_error({"w": array}, method),  # type: ignore[arg-type]
        lambda: encode(1, FitResult({}, 1, 0.0), compression=method),  # type: ignore[arg-type]
        lambda: encode_fragments(1, FitResult({}, 1, 0.0), compression=method),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == expected


# fp16 --------------------------------------------------------------------------


def test_fp16_relative_error_on_typical_weights_is_below_1e_3() -> None:
    weights = typical_weights()
    error = compression_error(weights, "fp16")
    floats = [name for name, array in weights.items() if array.dtype.kind == "f"]
    decoded = decode_weights({name: wire(weights[name], "fp16") for name in floats})
    # Independently: the relative L2 norm over all float tensors, with numpy's cast.
    diff = np.concatenate([(decoded[n].astype(np.float64) - weights[n]).ravel() for n in floats])
    norm = np.concatenate([weights[n].astype(np.float64).ravel() for n in floats])
    assert error == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(norm), rel=1e-9)
    assert 0 < error < 1e-3
    print(f"\nfp16 relative L2 error on digits-cnn weights and a small update: {error:.2e}")


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.dtype("float32"), np.dtype("float64")]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
        elements=st.floats(-60_000, 60_000, width=32),
    )
)
def test_fp16_is_numpy_half_precision_cast_back(array: np.ndarray) -> None:
    tensor = wire(array, "fp16")
    assert tensor["encoding"] == "fp16" and len(tensor["data"]) == 2 * array.size  # type: ignore[arg-type]
    decoded = decode_tensor(tensor)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array.astype(np.float16).astype(array.dtype))
    # Per element: half an ulp of float16, relative, or 2**-25 below its normal range.
    bound = np.maximum(np.abs(array.astype(np.float64)) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(decoded.astype(np.float64) - array) <= bound)


# int8 --------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    array=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
        elements=st.floats(-1e4, 1e4, allow_subnormal=False),
    ),
)
def test_int8_error_is_at_most_half_a_step(dtype: str, array: np.ndarray) -> None:
    array = array.astype(dtype)
    tensor = wire(array, "int8")
    # Independently computed parameters: offset is the minimum, 255 steps span the range.
    low, high = float(array.min()), float(array.max())
    assert tensor["encoding"] == "int8" and tensor["offset"] == low
    assert tensor["scale"] == pytest.approx((high - low) / 255, rel=1e-12)
    codes = np.frombuffer(tensor["data"], dtype=np.uint8)  # type: ignore[arg-type]
    assert codes.size == array.size and (codes.size == 0 or codes.max() <= 255)
    decoded = decode_tensor(tensor)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    scale = float(tensor["scale"])  # type: ignore[arg-type]
    exact = array.astype(np.float64)
    # Half a step, plus rounding the result to the tensor's own dtype.
    # The rounding step is the larger of the exact and the decoded value's (they straddle a power of two).
    largest = np.maximum(np.abs(exact), np.abs(decoded.astype(np.float64)))
    bound = scale / 2 * (1 + 1e-9) + np.spacing(largest.astype(dtype)).astype(np.float64)
    assert np.all(np.abs(decoded.astype(np.float64) - exact) <= bound)
    # Each code is the nearest level, as plain numpy rounds it.
    if scale > 0:
        nearest = np.floor((exact - low) / scale + 0.5).reshape(-1)
        assert np.all(np.abs(codes.astype(np.float64) - nearest) <= 1)


def test_int8_error_matches_an_independent_computation() -> None:
    weights = typical_weights()
    floats = [name for name, array in weights.items() if array.dtype.kind == "f"]
    squared = total = 0.0
    for name in floats:
        w = weights[name].astype(np.float64).ravel()
        low, scale = w.min(), (w.max() - w.min()) / 255
        q = np.floor((w - low) / scale + 0.5) if scale > 0 else np.zeros_like(w)
        diff = (low + q * scale).astype(weights[name].dtype) - w
        squared += float(diff @ diff)
        total += float(w @ w)
    error = compression_error(weights, "int8")
    assert error == pytest.approx(math.sqrt(squared / total), rel=1e-6)
    assert 1e-3 < error < 0.05
    print(f"\nint8 relative L2 error on digits-cnn weights and a small update: {error:.2e}")


def test_constant_and_single_value_tensors_are_exact_under_int8() -> None:
    for array in (np.full((3, 3), -2.5, np.float32), np.array([7.25]), np.zeros(4, np.float16)):
        tensor = wire(array, "int8")
        assert tensor["scale"] == 0.0 and tensor["offset"] == float(array.flat[0])
        assert np.array_equal(decode_tensor(tensor), array)
    assert compression_error({"z": np.zeros(10, np.float32)}, "int8") == 0.0


# What is never compressed --------------------------------------------------------


@pytest.mark.parametrize("method", COMPRESSIONS)
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64", "bool"])
def test_non_float_tensors_are_never_compressed(method: str, dtype: str) -> None:
    array = np.arange(12).reshape(3, 4).astype(dtype)
    tensor = wire(array, method)
    assert set(tensor) == {"dtype", "shape", "data"}
    assert tensor["data"] == array.tobytes()


@pytest.mark.parametrize(
    ("array", "method"),
    [
        (np.array([1.0, np.nan], np.float32), "fp16"),
        (np.array([1.0, np.nan], np.float32), "int8"),
        (np.array([1.0, np.inf]), "int8"),
        (np.array([-np.inf, 0.0], np.float32), "fp16"),
        (np.array([1.0, 70_000.0], np.float32), "fp16"),  # past float16's largest finite value
        (np.array([-1e308, 1e308]), "int8"),  # a range too wide for a finite scale
        (np.zeros((0, 3), np.float32), "int8"),
        (np.ones(3, np.float16), "fp16"),  # nothing to gain
        (np.ones(3, np.float32), "none"),
    ],
)
def test_tensors_an_encoding_cannot_hold_go_as_they_are(array: np.ndarray, method: str) -> None:
    assert compress(array, method) is None
    tensor = wire(array, method)
    assert set(tensor) == {"dtype", "shape", "data"}
    np.testing.assert_array_equal(decode_tensor(tensor), array)


def test_compression_error_edge_cases() -> None:
    assert compression_error({}, "int8") == 0.0
    assert compression_error({"n": np.arange(5)}, "fp16") == 0.0
    assert compression_error(typical_weights(), "none") == 0.0
    assert compression_error({"w": np.zeros(7, np.float32)}, "fp16") == 0.0


# On the wire ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "code_size"), [("none", None), ("fp16", 2), ("int8", 1)])
def test_messages_shrink_and_decode_to_the_original_dtypes(method: str, code_size: int | None) -> None:
    weights = typical_weights()
    data = encode(3, FitResult(weights, 5, 0.5), compression=method)
    payload = sum(
        array.size * code_size if code_size is not None and array.dtype.kind == "f" else array.nbytes
        for array in weights.values()
    )
    assert payload < len(data) < payload * 1.01 + 2000  # the header is small
    received = decode(data).message
    assert isinstance(received, FitResult) and list(received.weights) == list(weights)
    for name, array in weights.items():
        assert received.weights[name].dtype == array.dtype and received.weights[name].shape == array.shape
        assert not received.weights[name].flags.writeable
        if array.dtype.kind != "f" or method == "none":
            np.testing.assert_array_equal(received.weights[name], array)


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_streamed_and_single_frame_compressed_messages_agree(method: str) -> None:
    weights = typical_weights()
    single = decode(encode(4, FitResult(weights, 5, 0.5), compression=method)).message
    outgoing = encode_fragments(4, FitResult(weights, 5, 0.5), chunk_size=4096, compression=method)
    assert outgoing.streamed
    streamed = decode(bytes(outgoing)).message
    assert single == streamed


# Validation of compressed entries --------------------------------------------------

GOOD = {
    "dtype": "float32",
    "shape": [2, 2],
    "data": b"\x00\x01\x02\xff",
    "encoding": "int8",
    "scale": 0.5,
    "offset": -1.0,
}


def test_a_valid_int8_entry_decodes() -> None:
    np.testing.assert_array_equal(decode_tensor(GOOD), np.array([[-1.0, -0.5], [0.0, 126.5]], np.float32))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"encoding": "int4"}, "tensor has encoding 'int4', not one of fp16, int8"),
        ({"encoding": "none"}, "tensor has encoding 'none', not one of fp16, int8"),
        ({"encoding": None}, "tensor has encoding None, not one of fp16, int8"),
        ({"encoding": ["int8"]}, "tensor has encoding ['int8'], not one of fp16, int8"),
        ({"scale": math.nan}, "tensor has scale nan and offset -1.0, not finite floats with a non-negative scale"),
        ({"scale": math.inf}, "tensor has scale inf and offset -1.0, not finite"),
        ({"scale": -0.5}, "tensor has scale -0.5 and offset -1.0, not finite"),
        ({"scale": 1}, "tensor has scale 1 and offset -1.0, not finite"),
        ({"scale": "0.5"}, "tensor has scale '0.5' and offset -1.0, not finite"),
        ({"offset": -math.inf}, "tensor has scale 0.5 and offset -inf, not finite"),
        ({"offset": None}, "tensor has scale 0.5 and offset None, not finite"),
        ({"dtype": "int32"}, "tensor has dtype int32, which int8 does not encode"),
        ({"dtype": "complex64"}, "tensor has dtype 'complex64', not one of"),
        ({"data": b"\x00" * 3}, "tensor has 3 bytes but dtype float32 and shape (2, 2) encoded with int8 need 4"),
        ({"data": b"\x00" * 5}, "tensor has 5 bytes but dtype float32 and shape (2, 2) encoded with int8 need 4"),
        ({"data": "\x00" * 4}, "tensor data must be bytes, not str"),
        ({"extra": 1}, "tensor encoded with int8 must be a map with keys data, dtype, encoding, offset, scale, shape"),
    ],
)
def test_bad_int8_entries_are_bad_tensors(changes: dict[str, object], error: str) -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor({**GOOD, **changes})
    assert str(info.value).startswith(error), str(info.value)
    assert info.value.code == "bad_tensor"


def test_int8_entries_need_scale_and_offset_and_fp16_entries_have_none() -> None:
    no_scale = {key: value for key, value in GOOD.items() if key != "scale"}
    with pytest.raises(TensorError, match="encoded with int8 must be a map with keys"):
        decode_tensor(no_scale)
    fp16 = {"dtype": "float64", "shape": [2], "data": np.array([1.5, -3], "<f2").tobytes(), "encoding": "fp16"}
    np.testing.assert_array_equal(decode_tensor(fp16), [1.5, -3.0])
    with pytest.raises(TensorError, match="encoded with fp16 must be a map with keys data, dtype, encoding, shape"):
        decode_tensor({**fp16, "scale": 1.0, "offset": 0.0})
    with pytest.raises(TensorError) as info:
        decode_tensor({**fp16, "data": b"\x00" * 2})
    assert str(info.value) == "tensor has 2 bytes but dtype float64 and shape (2,) encoded with fp16 need 4"


def test_bad_compressed_entry_in_a_message_is_a_bad_tensor_reply() -> None:
    body = {"weights": {"w": {**GOOD, "scale": math.nan}}, "num_examples": 1, "loss": 0.0, "seconds": 0.0}
    data = msgpack.packb({"v": 1, "id": 6, "kind": "fit_result", "body": body}, use_bin_type=True)
    with pytest.raises(TensorError) as info:
        decode(data)
    assert (info.value.code, info.value.request_id) == ("bad_tensor", 6)
    assert str(info.value).startswith("tensor w has scale nan")
