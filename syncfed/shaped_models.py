"""Built-in models built from the data the federation agreed on: they fit any table width or image size.

A bundled data set has its own model (``digits-cnn``, ``mnist-cnn``); a user's
own data gets one of these, sized from the :class:`~syncfed.protocol.DataPlan`
(its input shape and number of classes) on the coordinator and on every
worker alike, so the model is still named on the wire, never sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn

from .exceptions import ModelError
from .models import ModelFactory, resolve_model
from .protocol.data_messages import DataPlan

__all__ = ["SHAPED_MODELS", "TabularMLP", "ImageCNN", "default_shaped_model", "shaped_factory"]


class TabularMLP(nn.Module):
    """A multilayer perceptron over the flattened input (a table's encoded row, or any array)."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


class ImageCNN(nn.Module):
    """A small CNN for ``C x H x W`` images of any size: four 3x3 convolutions, pooling while the image is
    at least 8 pixels across, then an adaptive 4x4 pool, so the head's size does not depend on the image's."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(f"cnn needs images of shape (channels, height, width), not {input_shape}")
        channels, height, width = input_shape
        size = min(height, width)
        layers: list[nn.Module] = []
        for out in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            if size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(channels * 16, 128), nn.ReLU(), nn.Linear(128, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


#: Models built from a data plan's input shape and class count, by name.
SHAPED_MODELS: Mapping[str, Callable[[tuple[int, ...], int], nn.Module]] = MappingProxyType(
    {"mlp": TabularMLP, "cnn": ImageCNN}
)


def default_shaped_model(plan: DataPlan) -> str:
    """The built-in model that suits the agreed data: ``cnn`` for images, ``mlp`` for tables and arrays."""
    return "cnn" if plan.kind == "images" else "mlp"


def shaped_factory(name: str, plan: DataPlan) -> ModelFactory:
    """The factory of model ``name`` for data described by ``plan``: a shaped model sized from it, or a
    registered or imported model (which takes no arguments) as it is.

    Raises:
        ModelError: if the name is neither a shaped model nor resolvable.
    """
    shaped = SHAPED_MODELS.get(name)
    if shaped is None:
        return resolve_model(name)
    shape, outputs = plan.input_shape, plan.num_classes
    return lambda: shaped(shape, outputs)
