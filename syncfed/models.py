"""The model registry: models are named on the wire, never sent.

Worker and coordinator import this same registry. A user's own model is
named by import path, ``mypkg.models:Net`` (a class or function that takes
no arguments and returns a ``torch.nn.Module``); a worker only builds the
import paths it was started with, so a coordinator cannot make it import
arbitrary code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .exceptions import ModelError
from .tensors import Weights

__all__ = [
    "MODELS",
    "ModelFactory",
    "MnistCNN",
    "DigitsCNN",
    "DigitsMLP",
    "resolve_model",
    "default_model",
    "get_weights",
    "set_weights",
    "check_model",
]

ModelFactory = Callable[[], nn.Module]


class MnistCNN(nn.Module):
    """The classic demo's CNN for 28x28 MNIST (431,080 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class DigitsCNN(nn.Module):
    """A CNN for scikit-learn's 8x8 digits (601,610 parameters).

    Wide enough that FedAvg over the classic demo's non-IID shards (alice
    0-3, bob 4-6, charlie 7-9) passes 95% test accuracy in 40 rounds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class DigitsMLP(nn.Module):
    """An MLP over the 64 pixels of 8x8 digits with two ``width`` x ``width`` hidden layers.

    Not for accuracy: its size is set by one number (``2 * width**2 + 77 * width + 10``
    parameters), so benchmarks move 1M, 10M or 100M parameters through the same task.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8 * 8, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.fc4 = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return F.log_softmax(self.fc4(x), dim=1)


#: Built-in models by name; the MLPs (999,674, 10,009,844 and 100,004,422 parameters) are for benchmarks.
MODELS: Mapping[str, ModelFactory] = {
    "mnist-cnn": MnistCNN,
    "digits-cnn": DigitsCNN,
    "mlp-1m": partial(DigitsMLP, 688),
    "mlp-10m": partial(DigitsMLP, 2218),
    "mlp-100m": partial(DigitsMLP, 7052),
}

_DEFAULT_FOR_DATASET = {"mnist": "mnist-cnn", "digits": "digits-cnn"}


def default_model(dataset: str) -> str:
    """The registry name of the model that suits ``dataset``."""
    try:
        return _DEFAULT_FOR_DATASET[dataset]
    except KeyError:
        raise ModelError(f"no default model for data set {dataset!r}; pass --model") from None


def resolve_model(name: str) -> ModelFactory:
    """Find a model factory by registry name or ``module:attribute`` import path.

    Raises:
        ModelError: if the name is neither registered nor importable.
    """
    if name in MODELS:
        return MODELS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelError(f"model {name!r} is not one of {', '.join(MODELS)} nor an import path like mypkg.models:Net")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import model {name!r}: {exc}") from None
    if not callable(factory):
        raise ModelError(f"model {name!r} is not callable")
    return factory  # type: ignore[no-any-return]


def get_weights(model: nn.Module) -> Weights:
    """A copy of the model's state (parameters and buffers) as numpy arrays, in order.

    A copy, because ``Tensor.numpy()`` shares memory and the model trains on.
    """
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load ``weights`` into a model on the CPU, checking names, shapes and dtypes.

    Raises:
        ModelError: if the weights do not fit the model.
    """
    state = model.state_dict()
    if weights.keys() != state.keys():
        missing = sorted(set(state) - set(weights))
        extra = sorted(set(weights) - set(state))
        raise ModelError(f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, target in state.items():
        source, destination = weights[name], target.numpy()
        if source.shape != destination.shape:
            raise ModelError(f"tensor {name} has shape {source.shape}, the model needs {destination.shape}")
        if source.dtype != destination.dtype:
            raise ModelError(f"tensor {name} has dtype {source.dtype}, the model needs {destination.dtype}")
    for name, target in state.items():
        # Copy with numpy: received arrays are read-only views of the message.
        np.copyto(target.numpy(), weights[name])


def check_model(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Check that ``model`` maps one input of ``input_shape`` to ``num_classes`` outputs.

    Raises:
        ModelError: if the forward pass fails or gives another shape.
    """
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros((1, *input_shape)))
    except Exception as exc:  # a user's model may raise anything on a wrong shape
        raise ModelError(f"model fails on input of shape {(1, *input_shape)}: {exc}") from None
    if tuple(output.shape) != (1, num_classes):
        raise ModelError(
            f"model maps input of shape {(1, *input_shape)} to {tuple(output.shape)}, expected {(1, num_classes)}"
        )
