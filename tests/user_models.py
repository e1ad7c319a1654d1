"""A user's own model module, named by import path in tests (``user_models:TinyNet``)."""

from __future__ import annotations

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
