"""The model registry, and moving weights in and out of models as numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TESTS

from syncfed.exceptions import ModelError
from syncfed.models import (
    MODELS,
    DigitsCNN,
    MnistCNN,
    check_model,
    default_model,
    get_weights,
    resolve_model,
    set_weights,
)
from syncfed.tensors import decode_weights, encode_weights


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make tests/user_models.py importable as a user's own module would be."""
    monkeypatch.syspath_prepend(str(TESTS))
    return "user_models"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mnist_cnn_has_431080_parameters() -> None:
    assert parameter_count(MnistCNN()) == 431_080


def test_mnist_cnn_shapes() -> None:
    model = MnistCNN().eval()
    with torch.no_grad():
        output = model(torch.zeros(2, 1, 28, 28))
    assert tuple(output.shape) == (2, 10)
    # log_softmax: the probabilities of each row sum to one.
    np.testing.assert_allclose(output.exp().sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_digits_cnn_maps_one_8x8_image_to_ten_classes() -> None:
    model = DigitsCNN().eval()
    with torch.no_grad():
        output = model(torch.zeros(1, 1, 8, 8))
    assert tuple(output.shape) == (1, 10)
    np.testing.assert_allclose(float(output.exp().sum()), 1.0, rtol=1e-5)


def test_registry_and_defaults() -> None:
    assert set(MODELS) == {"mnist-cnn", "digits-cnn", "mlp-1m", "mlp-10m", "mlp-100m"}
    assert resolve_model("mnist-cnn") is MnistCNN
    assert resolve_model("digits-cnn") is DigitsCNN
    assert default_model("mnist") == "mnist-cnn"
    assert default_model("digits") == "digits-cnn"
    with pytest.raises(ModelError) as info:
        default_model("cifar10")
    assert str(info.value) == "no default model for data set 'cifar10'; pass --model"


def test_check_model() -> None:
    check_model(DigitsCNN(), (1, 8, 8), 10)
    check_model(MnistCNN(), (1, 28, 28), 10)
    with pytest.raises(ModelError, match=r"model fails on input of shape \(1, 1, 8, 8\)"):
        check_model(MnistCNN(), (1, 8, 8), 10)
    with pytest.raises(ModelError) as info:
        check_model(DigitsCNN(), (1, 8, 8), 3)
    assert str(info.value) == "model maps input of shape (1, 1, 8, 8) to (1, 10), expected (1, 3)"


def test_get_weights_returns_copies_in_state_order() -> None:
    model = DigitsCNN()
    weights = get_weights(model)
    assert list(weights) == list(model.state_dict())
    before = {name: array.copy() for name, array in weights.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    for name, array in weights.items():
        np.testing.assert_array_equal(array, before[name])
    # And the other way round: writing to the copy leaves the model alone.
    weights["fc2.bias"][:] = 123.0
    assert not torch.any(model.state_dict()["fc2.bias"] == 123.0)


def test_get_weights_dtypes_and_shapes() -> None:
    model = MnistCNN()
    weights = get_weights(model)
    assert weights["conv1.weight"].shape == (20, 1, 5, 5)
    assert weights["fc1.weight"].shape == (500, 800)
    assert all(array.dtype == np.float32 for array in weights.values())
    assert sum(array.size for array in weights.values()) == 431_080


def test_set_weights_round_trip() -> None:
    torch.manual_seed(0)
    source = DigitsCNN()
    torch.manual_seed(1)
    target = DigitsCNN()
    weights = get_weights(source)
    assert not np.array_equal(get_weights(target)["conv1.weight"], weights["conv1.weight"])
    set_weights(target, weights)
    loaded = get_weights(target)
    assert list(loaded) == list(weights)
    for name in weights:
        np.testing.assert_array_equal(loaded[name], weights[name])
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_set_weights_accepts_read_only_arrays_from_the_wire(user_models: str) -> None:
    factory = resolve_model(f"{user_models}:WithBuffer")
    source, target = factory(), factory()
    with torch.no_grad():
        source.norm.running_mean.fill_(0.5)
        source.norm.num_batches_tracked.fill_(7)
    encoded = encode_weights(get_weights(source))
    received = decode_weights({name: {**t, "data": bytes(t["data"])} for name, t in encoded.items()})
    assert not received["fc.weight"].flags.writeable
    set_weights(target, received)
    assert int(target.norm.num_batches_tracked) == 7
    np.testing.assert_array_equal(target.norm.running_mean.numpy(), [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(target.fc.weight.detach().numpy(), source.fc.weight.detach().numpy())


def test_set_weights_missing_name() -> None:
    model = DigitsCNN()
    weights = get_weights(model)
    del weights["fc2.bias"]
    before = get_weights(model)
    with pytest.raises(ModelError) as info:
        set_weights(model, {name: array + 1 for name, array in weights.items()})
    assert str(info.value) == "weights do not fit the model: missing ['fc2.bias'], unexpected []"
    # Nothing was loaded: the checks come before any copy.
    np.testing.assert_array_equal(get_weights(model)["conv1.weight"], before["conv1.weight"])


def test_set_weights_unexpected_name() -> None:
    model = DigitsCNN()
    weights = {**get_weights(model), "extra": np.zeros(1, np.float32)}
    with pytest.raises(ModelError, match=r"unexpected \['extra'\]"):
        set_weights(model, weights)


def test_set_weights_wrong_shape() -> None:
    model = DigitsCNN()
    weights = get_weights(model)
    weights["fc2.bias"] = np.zeros(11, dtype=np.float32)
    with pytest.raises(ModelError) as info:
        set_weights(model, weights)
    assert str(info.value) == "tensor fc2.bias has shape (11,), the model needs (10,)"


def test_set_weights_wrong_dtype_leaves_the_model_unchanged() -> None:
    model = DigitsCNN()
    before = get_weights(model)
    weights = {name: array + 1 for name, array in before.items()}
    weights["fc2.weight"] = weights["fc2.weight"].astype(np.float64)
    with pytest.raises(ModelError) as info:
        set_weights(model, weights)
    assert str(info.value) == "tensor fc2.weight has dtype float64, the model needs float32"
    after = get_weights(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_resolve_user_model_class_and_function(user_models: str) -> None:
    from user_models import TinyNet  # type: ignore[import-not-found]

    assert resolve_model(f"{user_models}:TinyNet") is TinyNet
    model = resolve_model(f"{user_models}:make_tiny_net")()
    assert isinstance(model, TinyNet)
    check_model(model, (1, 8, 8), 10)
    assert parameter_count(model) == 650


def test_resolve_package_path() -> None:
    # A dotted module path resolves too.
    factory = resolve_model("torch.nn:Identity")
    assert factory is torch.nn.Identity


@pytest.mark.parametrize("name", ["resnet", "", "mnist_cnn", "MNIST-CNN", "user_models", "user_models:", ":TinyNet"])
def test_unknown_names(name: str, user_models: str) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model(name)
    assert str(info.value) == (
        f"model {name!r} is not one of mnist-cnn, digits-cnn, mlp-1m, mlp-10m, mlp-100m"
        " nor an import path like mypkg.models:Net"
    )


def test_unimportable_paths(user_models: str) -> None:
    with pytest.raises(ModelError, match=r"^cannot import model 'no_such_module_xyz:Net': "):
        resolve_model("no_such_module_xyz:Net")
    with pytest.raises(ModelError, match=r"^cannot import model 'user_models:Missing': "):
        resolve_model(f"{user_models}:Missing")
    with pytest.raises(ModelError) as info:
        resolve_model(f"{user_models}:NOT_CALLABLE")
    assert str(info.value) == "model 'user_models:NOT_CALLABLE' is not callable"
