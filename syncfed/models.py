"""The model registry: models are named on the wire, never sent.

Worker and coordinator import this same registry. A user's own model is
named by import path, ``mypkg.models:Net`` (a class or function that returns
a ``torch.nn.Module``, taking no arguments or the agreed schema: see
:func:`resolve_model`); a worker only builds the
import paths it was started with, so a coordinator cannot make it import
arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .exceptions import ModelError
from .tensors import Weights

__all__ = [
    "MODELS",
    "DEMO_MODELS",
    "BENCH_MODELS",
    "ModelFactory",
    "Layout",
    "MnistCNN",
    "DigitsCNN",
    "DigitsMLP",
    "resolve_model",
    "schema_parameters",
    "default_model",
    "get_weights",
    "set_weights",
    "check_model",
    "describe_model",
    "check_layout",
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


#: The demo models every worker builds.
DEMO_MODELS: Mapping[str, ModelFactory] = MappingProxyType({"mnist-cnn": MnistCNN, "digits-cnn": DigitsCNN})
#: Benchmark MLPs (999,674, 10,009,844 and 100,004,422 parameters). A worker builds them only when
#: started with ``--bench-models`` (or names one with ``--model``): a cheap request must not make
#: every worker hold a 400 MB model.
BENCH_MODELS: Mapping[str, ModelFactory] = MappingProxyType(
    {"mlp-1m": partial(DigitsMLP, 688), "mlp-10m": partial(DigitsMLP, 2218), "mlp-100m": partial(DigitsMLP, 7052)}
)
#: Every built-in model by name: what a coordinator may build and ``--model`` may name.
MODELS: Mapping[str, ModelFactory] = MappingProxyType({**DEMO_MODELS, **BENCH_MODELS})

_DEFAULT_FOR_DATASET = {"mnist": "mnist-cnn", "digits": "digits-cnn"}


def default_model(dataset: str) -> str:
    """The registry name of the model that suits ``dataset``."""
    try:
        return _DEFAULT_FOR_DATASET[dataset]
    except KeyError:
        raise ModelError(f"no default model for data set {dataset!r}; pass --model") from None


def resolve_model(
    name: str, *, input_shape: tuple[int, ...] | None = None, num_outputs: int | None = None
) -> ModelFactory:
    """Find a model factory by registry name or ``module:attribute`` import path.

    A user's model may take the agreed schema: a class or function with a
    parameter named ``input_shape`` (a tuple, e.g. ``(30,)`` or ``(1, 8, 8)``)
    or ``num_outputs`` (an int: one per class, one for binary and
    regression) gets the values given here bound to it, so one model fits
    every table width or image size::

        class Net(nn.Module):
            def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None: ...

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
    given = {"input_shape": input_shape, "num_outputs": num_outputs}
    schema = {key: value for key, value in given.items() if value is not None and key in schema_parameters(factory)}
    return partial(factory, **schema) if schema else factory


def schema_parameters(factory: Callable[..., object]) -> frozenset[str]:
    """The schema parameters (``input_shape``, ``num_outputs``) that ``factory`` takes by keyword."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature takes no schema
        return frozenset()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(
        name for name in ("input_shape", "num_outputs") if name in parameters and parameters[name].kind in keyword
    )


#: A model's state as the wire describes it: tensor name -> (dtype name, shape), in the model's order.
Layout = dict[str, tuple[str, tuple[int, ...]]]

_NUMPY_DTYPES = {
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}


def describe_model(factory: ModelFactory) -> Layout:
    """The names, dtypes and shapes of the state ``factory``'s model has, built without its memory.

    Built on PyTorch's ``meta`` device, where tensors have a shape and no
    storage, so describing ``mlp-100m`` costs nothing. A user model that
    cannot be built there (it reads a value of its own tensors in
    ``__init__``, say) is built once on the CPU instead and dropped. A dtype
    numpy has no name for (``bfloat16``) keeps torch's name, which no
    weights sent over the wire can match.

    Raises:
        ModelError: if the model cannot be built at all.
    """
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # whatever fails on meta may work on the CPU
        try:
            model = factory()
        except Exception as exc:  # a user's model may raise anything
            raise ModelError(f"cannot build the model: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    return {
        name: (_NUMPY_DTYPES.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape))
        for name, tensor in model.state_dict().items()
    }


def check_layout(layout: Layout, weights: Mapping[str, np.ndarray]) -> None:
    """Check that ``weights`` hold exactly the tensors of ``layout``, in any order, before any model is built.

    Raises:
        ModelError: naming the first tensor that is missing, unexpected, or of another shape or dtype.
    """
    if weights.keys() != layout.keys():
        missing = sorted(set(layout) - set(weights))
        extra = sorted(set(weights) - set(layout))
        raise ModelError(f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape) in layout.items():
        array = weights[name]
        if array.shape != shape:
            raise ModelError(f"tensor {name} has shape {array.shape}, the model needs {shape}")
        if array.dtype.name != dtype or not array.dtype.isnative:
            raise ModelError(f"tensor {name} has dtype {array.dtype}, the model needs {dtype}")


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
