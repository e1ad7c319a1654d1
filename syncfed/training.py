"""Local training and evaluation: the compute a worker does for a request.

No I/O and no asyncio: the worker runs these in a thread so that it keeps
answering pings and other requests while it trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import Dataset
from .protocol import TrainingPlan

__all__ = ["TrainResult", "EvalOutcome", "train", "evaluate"]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss per example over the round
    examples_seen: int


@dataclass(frozen=True)
class EvalOutcome:
    loss: float  # mean loss per example
    correct: int
    num_examples: int
    predictions: list[int]  # histogram of predicted classes


def _batch_order(num_examples: int, plan: TrainingPlan) -> np.ndarray:
    """Indices of the examples of each batch, reshuffling at every pass over the shard."""
    rng = np.random.default_rng(plan.seed)
    needed = plan.batch_size * plan.num_batches
    passes = -(-needed // num_examples)
    return np.concatenate([rng.permutation(num_examples) for _ in range(passes)])[:needed]


def train(model: nn.Module, data: Dataset, plan: TrainingPlan, device: torch.device) -> TrainResult:
    """Plain SGD over ``plan.num_batches`` batches of the shard, in place.

    Uses cross-entropy on the model's output, which is the negative
    log-likelihood whether the model ends in ``log_softmax`` or in logits.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr)
    order = _batch_order(len(data), plan)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    total_loss = 0.0
    seen = 0
    for start in range(0, len(order), plan.batch_size):
        index = torch.from_numpy(order[start : start + plan.batch_size])
        x, y = images[index].to(device), labels[index].to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        torch.autograd.backward(loss)
        optimizer.step()
        total_loss += loss.item() * len(index)
        seen += len(index)
    model.cpu()
    return TrainResult(total_loss / seen, seen)


def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> EvalOutcome:
    """Mean loss per example (a sum over examples divided by their number), accuracy and predictions."""
    model.to(device).eval()
    total_loss = 0.0
    correct = 0
    predictions = torch.zeros(data.num_classes, dtype=torch.int64)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            output = model(x)
            total_loss += F.cross_entropy(output, y, reduction="sum").item()
            predicted = output.argmax(dim=1)
            correct += int((predicted == y).sum().item())
            predictions += torch.bincount(predicted.cpu(), minlength=data.num_classes)[: data.num_classes]
    model.cpu()
    return EvalOutcome(total_loss / len(data), correct, len(data), [int(n) for n in predictions])
