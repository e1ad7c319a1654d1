"""A user's own model module, named by import path in tests (``user_models:TinyNet``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyNet(nn.Module):
    """A linear model for 8x8 digits: 650 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def make_tiny_net() -> nn.Module:
    """A factory function works as well as a class."""
    return TinyNet()


class WithBuffer(nn.Module):
    """Batch norm adds an int64 buffer (num_batches_tracked) to the state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


NOT_CALLABLE = 42


class MetaShy(nn.Module):
    """Reads a value of its own weights while it is built, which PyTorch's meta device cannot do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("scale", torch.tensor([float(self.fc.weight.detach().abs().max())]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * self.scale


class SchemaNet(nn.Module):
    """Takes the agreed schema, so it fits any input shape and output count."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def make_head(*, num_outputs: int = 10) -> nn.Module:
    """Takes only the output count, by keyword: a model for 8x8 images whatever the task."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs))
