"""Built-in models built from the data the federation agreed on: they fit any table width or image size.

A bundled data set has its own model (``digits-cnn``, ``mnist-cnn``); a user's
own data gets one of these, sized from the :class:`~syncfed.protocol.DataPlan`
(its input shape) and the run's :class:`~syncfed.protocol.task_messages.Recipe`
(its number of outputs, hidden layers and dropout) on the coordinator and on
every worker alike, so the model is still named on the wire, never sent::

    build = shaped_factory("cnn", plan, recipe)
    model = build()

Dropout layers are always built, even at ``p = 0`` (where they are the
identity and draw no random numbers), so a model's tensor names do not
depend on its dropout and weights move between runs that differ only there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Protocol

import torch
from torch import nn

from .exceptions import ModelError
from .models import ModelFactory, resolve_model
from .protocol.data_messages import DataPlan
from .protocol.task_messages import Recipe

__all__ = [
    "SHAPED_MODELS",
    "MAX_CNN_SIDE",
    "ShapedModel",
    "TabularMLP",
    "LinearModel",
    "ImageCNN",
    "BasicBlock",
    "ResNet18",
    "default_shaped_model",
    "shaped_factory",
]

#: Images up to this many pixels on a side get the ``cnn`` by default, larger ones ``resnet18``.
MAX_CNN_SIDE = 64


class ShapedModel(Protocol):
    """A model class sized from the agreed input shape, its output count and the recipe's hidden widths and dropout."""

    def __call__(
        self, input_shape: tuple[int, ...], num_outputs: int, *, hidden: tuple[int, ...] = (), dropout: float = 0.0
    ) -> nn.Module: ...


def _head(width: int, hidden: tuple[int, ...], num_outputs: int, dropout: float) -> nn.Sequential:
    """Fully connected layers from ``width`` inputs: each hidden layer with ReLU and dropout, then the outputs."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _no_hidden(model: str, hidden: tuple[int, ...]) -> None:
    if hidden:
        raise ModelError(f"{model} has no hidden layers to size, not {hidden}")


class TabularMLP(nn.Module):
    """A multilayer perceptron over the flattened input (a table's encoded row, or any array).

    ``hidden`` empty means the default two layers of 64 and 32.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_outputs: int, *, hidden: tuple[int, ...] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = _head(math.prod(input_shape), hidden or (64, 32), num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(x))  # type: ignore[no-any-return]


class LinearModel(nn.Module):
    """One linear layer over the flattened input: logistic regression (binary, or softmax over classes)
    or linear regression, as the task's loss makes it; a baseline whose weights can be read."""

    def __init__(
        self, input_shape: tuple[int, ...], num_outputs: int, *, hidden: tuple[int, ...] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        _no_hidden("linear", hidden)
        if dropout:
            raise ModelError(f"linear takes no dropout, not {dropout}")
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))  # type: ignore[no-any-return]


class ImageCNN(nn.Module):
    """A CNN for ``C x H x W`` images of any size, laid out as :class:`~syncfed.models.DigitsCNN`.

    3x3 convolutions of 64 and 128 channels and one 2x2 max-pool, then a
    head of 256 units (``hidden``): over 8x8 images exactly DigitsCNN's
    601,610 parameters for ten classes, which FedAvg trains well on non-IID
    sites. Larger images are pooled after the first convolution too (above
    16 pixels across) and pass through further 128-channel convolutions,
    each pooled, until at most 8 pixels across; an adaptive 4x4 average pool
    then makes the head's size independent of the image's.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_outputs: int, *, hidden: tuple[int, ...] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(f"cnn needs images of shape (channels, height, width), not {input_shape}")
        channels, height, width = input_shape
        size = min(height, width)
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, padding=1), nn.ReLU()]
        if size > 16:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers += [nn.Conv2d(64, 128, 3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        while size > 8:
            layers += [nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            size //= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = _head(128 * 4 * 4, hidden or (256,), num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and an identity shortcut (He et al. 2016), projected
    by a 1x1 convolution where the block changes the resolution or the width."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)  # type: ignore[no-any-return]


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for ``C x H x W`` images, made for 224 x 224.

    The standard layout and stem (7x7 stride-2 convolution, max-pool, four
    stages of two :class:`BasicBlock`, global average pool), whatever the
    image size: 11,689,512 parameters for 3 x 224 x 224 and 1,000 outputs, as
    torchvision's. Its tensor names are torchvision's too, so ImageNet weights
    saved as safetensors start a run through ``--initial-weights``
    (``--allow-partial-weights`` skips the ``fc`` layer, and ``conv1`` over
    other than 3 channels). ``dropout`` acts before ``fc``.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_outputs: int, *, hidden: tuple[int, ...] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(f"resnet18 needs images of shape (channels, height, width), not {input_shape}")
        _no_hidden("resnet18", hidden)
        self.conv1 = nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_outputs)
        # torchvision's initialisation: He-normal convolutions, batch norm as the identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))  # type: ignore[no-any-return]


#: Models built from a data plan's input shape and the recipe's outputs, hidden widths and dropout, by name.
SHAPED_MODELS: Mapping[str, ShapedModel] = MappingProxyType(
    {"mlp": TabularMLP, "cnn": ImageCNN, "linear": LinearModel, "resnet18": ResNet18}
)


def default_shaped_model(plan: DataPlan) -> str:
    """The built-in model that suits the agreed data: ``mlp`` for tables and arrays, ``cnn`` for images up
    to :data:`MAX_CNN_SIDE` pixels on a side, ``resnet18`` for larger ones."""
    if plan.kind != "images":
        return "mlp"
    return "cnn" if max(plan.input_shape[1:]) <= MAX_CNN_SIDE else "resnet18"


def shaped_factory(name: str, plan: DataPlan, recipe: Recipe | None = None) -> ModelFactory:
    """The factory of model ``name`` for data described by ``plan`` and a task described by ``recipe``.

    A shaped model is sized from them: the plan's input shape, the recipe's
    number of outputs (one for binary and regression), hidden widths and
    dropout. Without a recipe: one output per class and the default layers,
    as before tasks existed. Any other name is resolved as a registered or
    imported model, given the input shape and output count if it takes them
    (see :func:`syncfed.models.resolve_model`).

    Raises:
        ModelError: if the name is neither a shaped model nor resolvable. A plan or recipe the
            model does not suit (a cnn over a table) raises when the factory is called.
    """
    outputs = plan.num_classes if recipe is None else recipe.num_outputs(plan.num_classes)
    shaped = SHAPED_MODELS.get(name)
    if shaped is None:
        return resolve_model(name, input_shape=plan.input_shape, num_outputs=outputs)
    hidden, dropout = ((), 0.0) if recipe is None else (recipe.hidden, recipe.dropout)
    return partial(shaped, plan.input_shape, outputs, hidden=hidden, dropout=dropout)
