"""Local training and evaluation: the compute a worker does for a request.

No I/O and no asyncio: the worker runs these in a thread so that it keeps
answering pings and other requests while it trains.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import Dataset
from .protocol import TrainingPlan
from .tensors import Weights

__all__ = ["Abandoned", "TrainResult", "EvalOutcome", "train", "evaluate", "corrupt"]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss per example over the round


@dataclass(frozen=True)
class EvalOutcome:
    loss: float  # mean loss per example
    correct: int
    num_examples: int
    predictions: list[int]  # histogram of predicted classes


def _batches(num_examples: int, plan: TrainingPlan) -> Iterator[np.ndarray]:
    """Index arrays of the plan's batches, drawn from a stream of reshuffled passes over the shard.

    Lazy, so memory stays at one pass plus one batch however long the plan.
    """
    rng = np.random.default_rng(plan.seed)
    pending = np.empty(0, dtype=np.int64)
    for _ in range(plan.num_batches):
        while len(pending) < plan.batch_size:
            pending = np.concatenate([pending, rng.permutation(num_examples)])
        yield pending[: plan.batch_size]
        pending = pending[plan.batch_size :]


class Abandoned(Exception):
    """Training stopped because nobody waits for its result any more."""


def train(
    model: nn.Module,
    data: Dataset,
    plan: TrainingPlan,
    device: torch.device,
    *,
    abandoned: threading.Event | None = None,
    batch_delay: float = 0.0,
    anchor: Mapping[str, np.ndarray] | None = None,
    correction: Mapping[str, np.ndarray] | None = None,
) -> TrainResult:
    """Plain SGD over ``plan.num_batches`` batches of the shard, in place.

    Uses cross-entropy on the model's output, which is the negative
    log-likelihood whether the model ends in ``log_softmax`` or in logits.
    With ``plan.mu > 0`` the loss gains FedProx's proximal term
    ``mu/2 * ||w - anchor||^2`` over the parameters (Li et al. 2020), which
    keeps non-IID workers near the global model. ``correction`` (SCAFFOLD's
    ``c - c_i``, Karimireddy et al. 2020) is added to each parameter's
    gradient. ``abandoned`` is checked before every batch, so a worker whose
    coordinator left stops within one batch; ``batch_delay`` (seconds of
    sleep per batch) simulates a slow site in tests and drills.

    Raises:
        Abandoned: if ``abandoned`` was set.
    """
    model.to(device).train()
    try:
        parameters = dict(model.named_parameters())
        optimizer = torch.optim.SGD(parameters.values(), lr=plan.lr)
        proximal = (
            {name: torch.from_numpy(np.asarray(anchor[name])).to(device) for name in parameters}
            if plan.mu and anchor is not None
            else {}
        )
        shifts = (
            {
                name: torch.from_numpy(np.asarray(correction[name])).to(device)
                for name in parameters
                if name in correction
            }
            if correction is not None
            else {}
        )
        images = torch.from_numpy(data.images)
        labels = torch.from_numpy(data.labels)
        total_loss = 0.0
        seen = 0
        for batch in _batches(len(data), plan):
            if abandoned is not None and abandoned.is_set():
                raise Abandoned
            if batch_delay:
                time.sleep(batch_delay)
            index = torch.from_numpy(batch)
            x, y = images[index].to(device), labels[index].to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            objective = loss
            if proximal:
                objective = loss + plan.mu / 2 * sum(
                    torch.sum((parameters[name] - proximal[name]) ** 2) for name in proximal
                )
            torch.autograd.backward(objective)
            for name, shift in shifts.items():
                grad = parameters[name].grad
                if grad is not None:
                    grad += shift
            optimizer.step()
            total_loss += loss.item() * len(index)
            seen += len(index)
    finally:
        model.cpu()  # also when abandoned or out of memory: the cached model lives on the CPU
    return TrainResult(total_loss / seen if seen else 0.0)


def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> EvalOutcome:
    """Mean loss per example (a sum over examples divided by their number), accuracy and predictions."""
    model.to(device).eval()
    try:
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
    finally:
        model.cpu()
    return EvalOutcome(total_loss / len(data), correct, len(data), [int(n) for n in predictions])


def corrupt(update: Weights, base: Mapping[str, np.ndarray], attack: str, rng: np.random.Generator) -> Weights:
    """What a byzantine worker sends instead of ``update`` (see ``config.ATTACKS``); a test hook only.

    ``update`` is the trained weights; integer tensors (counters) are left alone.
    """
    corrupted: Weights = {}
    for name, array in update.items():
        if not np.issubdtype(array.dtype, np.floating):
            corrupted[name] = array
            continue
        delta = array.astype(np.float64) - base[name]
        if attack == "sign-flip":
            result = base[name] - 10.0 * delta
        elif attack == "scale":
            result = base[name] + 50.0 * delta
        else:
            result = array + rng.normal(0.0, 1.0, array.shape)
        corrupted[name] = np.asarray(result, dtype=array.dtype)
    return corrupted
