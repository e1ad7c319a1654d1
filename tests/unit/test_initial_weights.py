"""Starting a run from weights the user holds: read as safetensors, checked tensor by tensor against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from syncfed.checkpoint import save_weights
from syncfed.exceptions import ModelError
from syncfed.initial_weights import initial_weights
from syncfed.models import get_weights
from syncfed.shaped_models import ResNet18, TabularMLP
from syncfed.tensors import Weights


def mlp_weights(columns: int = 6, outputs: int = 3, seed: int = 0) -> Weights:
    torch.manual_seed(seed)
    return get_weights(TabularMLP((columns,), outputs))


def assert_same(a: Weights, b: Weights) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def test_a_saved_model_loads_exactly(tmp_path: Path) -> None:
    saved = mlp_weights(seed=1)
    path = tmp_path / "model.safetensors"
    save_weights(path, saved, {"format": "pt", "model": "mlp"})  # what --save-model writes
    weights, skipped = initial_weights(path, mlp_weights(seed=2), allow_partial=False)
    assert_same(weights, saved)
    assert skipped == []


def test_a_model_with_batch_norm_counters_loads_exactly(tmp_path: Path) -> None:
    saved = get_weights(ResNet18((3, 16, 16), 2))
    saved["bn1.num_batches_tracked"] = np.array(7, dtype=np.int64)  # a 0-d tensor survives the file
    path = tmp_path / "resnet.safetensors"
    save_weights(path, saved, {})
    weights, skipped = initial_weights(path, get_weights(ResNet18((3, 16, 16), 2)), allow_partial=False)
    assert_same(weights, saved)
    assert skipped == []


def test_partial_weights_take_what_fits_and_name_what_was_skipped(tmp_path: Path) -> None:
    # Transfer learning: a 1000-class, 3-channel ResNet-18 onto a 1-channel binary task.
    source = get_weights(ResNet18((3, 32, 32), 1000))
    path = tmp_path / "imagenet.safetensors"
    save_file(source, str(path))
    fresh = get_weights(ResNet18((1, 32, 32), 1))
    weights, skipped = initial_weights(path, fresh, allow_partial=True)
    assert skipped == ["conv1.weight", "fc.weight", "fc.bias"]
    assert list(weights) == list(fresh)
    for name, array in weights.items():
        np.testing.assert_array_equal(array, (fresh if name in skipped else source)[name])


def test_partial_weights_skip_the_file_s_extra_tensors_and_fill_the_missing_ones(tmp_path: Path) -> None:
    source = mlp_weights(seed=1)
    fresh = mlp_weights(seed=2)
    source["extra.weight"] = np.ones(3, dtype=np.float32)
    del source["head.0.bias"]
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    weights, skipped = initial_weights(path, fresh, allow_partial=True)
    assert skipped == ["head.0.bias", "extra.weight"]
    np.testing.assert_array_equal(weights["head.0.bias"], fresh["head.0.bias"])
    np.testing.assert_array_equal(weights["head.0.weight"], source["head.0.weight"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda w: w.update({"head.3.weight": np.zeros((32, 7), np.float32)}),
            "tensor head.3.weight has shape (32, 7), the model needs (32, 64)",
        ),
        (
            lambda w: w.update({"head.0.bias": w["head.0.bias"].astype(np.float64)}),
            "tensor head.0.bias has dtype float64, the model needs float32",
        ),
        (lambda w: w.pop("head.6.bias"), "no tensor head.6.bias, which the model needs"),
        (lambda w: w.update({"fc.weight": np.zeros(2, np.float32)}), "tensor fc.weight is not in the model"),
    ],
)
def test_a_mismatch_is_refused_in_one_line_naming_the_first_tensor(tmp_path: Path, change, reason: str) -> None:  # type: ignore[no-untyped-def]
    source = mlp_weights()
    change(source)
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(), allow_partial=False)
    assert str(info.value) == f"initial weights {path}: {reason}"


def test_the_first_mismatch_in_the_model_s_order_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(mlp_weights(columns=5, outputs=2), str(path))
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(columns=6, outputs=3), allow_partial=False)
    assert str(info.value) == f"initial weights {path}: tensor head.0.weight has shape (64, 5), the model needs (64, 6)"


def test_weights_of_which_nothing_fits_are_refused_even_partially(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"other.weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(), allow_partial=True)
    assert str(info.value) == (
        f"initial weights {path}: no tensor fits the model, the first: no tensor head.0.weight, which the model needs"
    )


def test_a_file_that_is_not_safetensors_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04\x95 a pickle, say\n and more lines\n")
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(), allow_partial=True)
    message = str(info.value)
    assert message.startswith(f"cannot read initial weights {path} as safetensors: ")
    assert "\n" not in message


def test_a_missing_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(), allow_partial=False)
    assert str(info.value) == f"initial weights {path}: no such file"


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    source = mlp_weights()
    source["head.0.bias"][3] = np.nan
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    with pytest.raises(ModelError) as info:
        initial_weights(path, mlp_weights(), allow_partial=True)
    assert str(info.value) == f"initial weights {path}: tensor head.0.bias holds 1 non-finite values (nan)"
