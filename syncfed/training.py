"""Local training and evaluation: the compute a worker does for a request.

No I/O and no asyncio: the worker runs these in a thread so that it keeps
answering pings and other requests while it trains.

The task (``syncfed.tasks``) gives the loss, the targets and the metric
sums; without one, training is the classic cross-entropy. The optimizer is
SGD (with optional momentum and weight decay), Adam or AdamW; its state is
reset each round unless the caller hands back the state the last round
returned (``keep_state``).

Optional example-level DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") takes per-example gradients from Opacus, imported on
first use (``pip install 'syncfed[dpsgd]'``); syncfed keeps its own seeded
batches and SGD loop around them, and :class:`ExampleAccountant` adds up what
the steps spend with Opacus's RDP accountant.
"""

from __future__ import annotations

import importlib
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import Dataset
from .exceptions import AggregationError, ConfigError, ModelError
from .metrics import average_precision, combine, roc_auc
from .protocol import TrainingPlan
from .tasks import Binary, BuiltinTask, Task, make_task
from .tensors import Weights

__all__ = [
    "Abandoned",
    "TrainResult",
    "EvalOutcome",
    "DPSGD",
    "ExampleAccountant",
    "OPTIMIZERS",
    "batch_size",
    "num_steps",
    "training_device",
    "train",
    "evaluate",
    "corrupt",
]


#: The optimizers a plan may name.
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss per example over the round
    steps: int = 0  # batches trained on: what SCAFFOLD's K and the DP accountant count
    state: dict[str, Any] | None = None  # the optimizer's state, to hand back next round when it is kept


@dataclass(frozen=True)
class EvalOutcome:
    loss: float  # mean loss per example
    correct: int
    num_examples: int
    predictions: list[int]  # histogram of predicted classes
    class_counts: list[int]  # examples per true class
    class_correct: list[int]  # of them, those predicted right: per-class recall
    # The task's metric sums (syncfed.metrics); arrays, so left out of ==, which they would make ambiguous.
    metrics: dict[str, np.ndarray] = field(default_factory=dict, compare=False)


def batch_size(plan: TrainingPlan, num_examples: int) -> int:
    """The examples each of the plan's batches holds: its batch size, at most the whole shard.

    The plan's number comes from the peer; clamped, a batch never holds more
    than the data, so its cost is bounded by the shard, not by the request.
    """
    return min(plan.batch_size, num_examples)


def num_steps(plan: TrainingPlan, num_examples: int, local_epochs: int | None = None) -> int:
    """The batches a round trains on: the plan's ``num_batches``, or with ``local_epochs`` E, E passes of
    ``ceil(n / batch size)`` batches each.

    Raises:
        ConfigError: if ``local_epochs`` is not a positive integer.
    """
    if local_epochs is None:
        return plan.num_batches
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        raise ConfigError(f"local epochs {local_epochs!r} must be a positive integer")
    size = batch_size(plan, num_examples)
    return local_epochs * -(-num_examples // size) if size else 0


def _batches(num_examples: int, plan: TrainingPlan, count: int | None = None) -> Iterator[np.ndarray]:
    """Index arrays of ``count`` batches (by default the plan's), drawn from a stream of reshuffled passes
    over the shard.

    Lazy, so memory stays at one pass plus one batch however long the plan.
    Each batch holds :func:`batch_size` examples.
    """
    size = batch_size(plan, num_examples)
    if size == 0:
        return
    rng = np.random.default_rng(plan.seed)
    pending = np.empty(0, dtype=np.int64)
    for _ in range(plan.num_batches if count is None else count):
        if len(pending) < size:
            pending = np.concatenate([pending, rng.permutation(num_examples)])
        yield pending[:size]
        pending = pending[size:]


class Abandoned(Exception):
    """Training stopped because nobody waits for its result any more."""


def _opacus(module: str) -> ModuleType:
    """Import a part of Opacus on first use, so the rest of syncfed runs without it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("--dp-sgd needs the opacus package: pip install 'syncfed[dpsgd]'") from None


@dataclass(frozen=True)
class DPSGD:
    """Example-level DP-SGD settings (Abadi et al. 2016): per-example clip ``C``, noise multiplier ``z``.

    Each example's gradient is scaled down to L2 norm at most ``clip`` over
    the whole model, and Gaussian noise of standard deviation
    ``noise_multiplier * clip`` is added to the batch's sum before it is
    divided by the batch size. ``noise_multiplier`` 0 clips without noise
    (no privacy; for tests and for measuring what clipping alone costs).

    Raises:
        ConfigError: if a setting is out of range.
    """

    noise_multiplier: float
    clip: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"dp-sgd noise multiplier {self.noise_multiplier!r} must be a non-negative finite number")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"dp-sgd clip {self.clip!r} must be a positive finite number")


class ExampleAccountant:
    """The ``(epsilon, delta)`` a worker's DP-SGD steps spend on its examples, by Opacus's ``RDPAccountant``.

    Each step is the sampled Gaussian mechanism at ``sample_rate`` = batch
    size over the examples trained on (Mironov, Talwar and Zhang 2019); the
    steps of every round compose. Like Opacus, the analysis assumes Poisson
    sampling, while syncfed draws its batches from shuffled passes: the usual
    approximation (docs/privacy.md).

    Usage::

        accountant = ExampleAccountant(noise_multiplier=1.0, delta=1e-5)
        accountant.step(sample_rate=32 / 1000, steps=10)
        accountant.epsilon()

    Raises:
        ConfigError: if a setting is out of range, or Opacus is not installed.
    """

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"dp-sgd noise multiplier {noise_multiplier!r} must be a positive finite number")
        if not (math.isfinite(delta) and 0 < delta < 1):
            raise ConfigError(f"dp-sgd delta {delta!r} must be in (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self._accountant: Any = _opacus("opacus.accountants").RDPAccountant()
        self._steps = 0

    @property
    def steps(self) -> int:
        """DP-SGD steps accounted for so far."""
        return self._steps

    def step(self, sample_rate: float, steps: int) -> None:
        """Account for ``steps`` more steps, each on a batch drawn at ``sample_rate``.

        Raises:
            ConfigError: if ``sample_rate`` is not in (0, 1] or ``steps`` is negative.
        """
        if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
            raise ConfigError(f"sample rate {sample_rate!r} must be in (0, 1]")
        if steps < 0:
            raise ConfigError(f"number of steps {steps} must not be negative")
        for _ in range(steps):  # Opacus folds equal consecutive steps into one entry of its history
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        self._steps += steps

    def epsilon(self) -> float:
        """Epsilon spent so far at this accountant's delta (0 before any step)."""
        return float(self._accountant.get_epsilon(delta=self.delta))


def _grad_sampler(model: nn.Module) -> Any:
    """Opacus's per-example gradient hooks on ``model`` (in training mode); close them after training.

    Raises:
        ModelError: if Opacus cannot compute the model's per-example gradients (batch normalisation and the like).
        ConfigError: if Opacus is not installed.
    """
    opacus = _opacus("opacus")
    validator = _opacus("opacus.validators").ModuleValidator
    errors = [*validator.validate(model, strict=False), *opacus.GradSampleModule.validate(model, strict=False)]
    if errors:
        raise ModelError(f"model {type(model).__name__} cannot train with dp-sgd: {str(errors[0]).strip()}")
    # "mean": the loss is the batch's mean, and Opacus scales its per-example gradients back to each example's own.
    return opacus.GradSampleModule(model, loss_reduction="mean")


def _privatize(parameters: Sequence[nn.Parameter], index: torch.Tensor, dp_sgd: DPSGD, noise: torch.Generator) -> None:
    """Replace each gradient by the noised sum of clipped per-example gradients over the batch size (Abadi et al. 2016).

    The per-example gradients are Opacus's ``grad_sample``. A batch that
    straddles two of syncfed's shuffled passes can hold an example twice:
    its rows are added up before clipping, so one example still moves the sum
    by at most ``clip``. The noise is drawn on the CPU from ``noise``.
    """
    unique, inverse = torch.unique(index, return_inverse=True)
    samples = []
    for parameter in parameters:
        rows: torch.Tensor = parameter.grad_sample  # type: ignore[attr-defined]
        if len(unique) < len(index):
            merged = torch.zeros((len(unique), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
            rows = merged.index_add_(0, inverse.to(rows.device), rows)
        samples.append(rows)
    norms = torch.sqrt(torch.stack([torch.sum(sample.flatten(1) ** 2, dim=1) for sample in samples]).sum(dim=0))
    factors = torch.clamp(dp_sgd.clip / norms, max=1.0)  # a zero gradient gives inf, clamped to 1
    std = dp_sgd.noise_multiplier * dp_sgd.clip
    for parameter, sample in zip(parameters, samples, strict=True):
        total = torch.tensordot(factors, sample, dims=1)
        if std:
            total += torch.normal(0.0, std, total.shape, generator=noise).to(total.device, total.dtype)
        parameter.grad = total / len(index)
        parameter.grad_sample = None  # type: ignore[attr-defined]


def _optimizer(
    parameters: Iterable[nn.Parameter], lr: float, name: str, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The local optimizer. SGD at momentum 0 and weight decay 0 is the classic ``SGD(params, lr=lr)``:
    torch's defaults, so the classic training does not move by a bit.

    Raises:
        ConfigError: if the name is unknown, a setting is out of range, or momentum is asked of Adam.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ConfigError(f"momentum {momentum!r} must be a number from 0 to below 1")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight decay {weight_decay!r} must be a non-negative finite number")
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum:
        raise ConfigError(f"momentum {momentum} goes with sgd: {name} keeps its own moments")
    kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return kind(parameters, lr=lr, weight_decay=weight_decay)


def _resume(optimizer: torch.optim.Optimizer, name: str, state: Mapping[str, Any]) -> None:
    """Load the moments ``state`` (a previous :attr:`TrainResult.state`) into ``optimizer``, keeping the
    plan's hyperparameters: torch's own ``load_state_dict`` would bring back last round's learning rate.

    Raises:
        ConfigError: if the state is another optimizer's or another model's.
    """
    if state.get("optimizer") != name:
        raise ConfigError(f"optimizer state of {state.get('optimizer')!r} cannot resume {name}")
    groups = optimizer.state_dict()["param_groups"]
    try:
        optimizer.load_state_dict({"state": state["torch"]["state"], "param_groups": groups})
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"optimizer state does not fit the model: {exc}") from None


def _portable(name: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for :attr:`TrainResult.state`, its tensors on the CPU as the cached model is."""
    saved = optimizer.state_dict()
    moments = {
        index: {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        for index, entry in saved["state"].items()
    }
    return {"optimizer": name, "torch": {"state": moments, "param_groups": saved["param_groups"]}}


def training_device(cuda: bool) -> torch.device:
    """The device a worker trains on: the GPU when asked for (``--cuda``), else the CPU.

    Asking for a GPU that is not there is an error, not a quiet fallback: a
    site that means to train on its GPU should learn at start that it cannot.

    Raises:
        ConfigError: if ``cuda`` is set and torch sees no CUDA device.
    """
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} " + (
            "has CUDA but sees no GPU" if torch.version.cuda else "is built without CUDA"
        )
        raise ConfigError(f"--cuda asks for a GPU, but {build}: drop --cuda to train on the CPU")
    return torch.device("cuda")


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
    dp_sgd: DPSGD | None = None,
    noise: torch.Generator | None = None,
    task: Task | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    local_epochs: int | None = None,
    state: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place over the round's batches of the shard (:func:`num_steps`).

    ``task`` gives the loss (by default cross-entropy, the negative
    log-likelihood whether the model ends in ``log_softmax`` or in logits).
    ``optimizer`` is ``sgd`` (with ``momentum`` and ``weight_decay``),
    ``adam`` or ``adamw`` (``weight_decay``, decoupled for AdamW), all at the
    plan's learning rate. ``state``, the :attr:`TrainResult.state` of an
    earlier round, resumes the optimizer's moments; without it they start
    from zero (reset each round).

    Each step's gradient is, in this order: the loss's (or DP-SGD's private
    one), plus FedProx's and SCAFFOLD's terms, then clipped to L2 norm
    ``grad_clip`` over the whole model. Clipping last bounds what one step
    may do whatever its sources: an SGD step without momentum moves the
    weights by at most ``lr * grad_clip``.

    With ``plan.mu > 0`` the loss gains FedProx's proximal term
    ``mu/2 * ||w - anchor||^2`` over the parameters (Li et al. 2020), which
    keeps non-IID workers near the global model. ``correction`` (SCAFFOLD's
    ``c - c_i``, Karimireddy et al. 2020) is added to each parameter's
    gradient. ``abandoned`` is checked before every batch, so a worker whose
    coordinator left stops within one batch; ``batch_delay`` (seconds of
    sleep per batch) simulates a slow site in tests and drills.

    With ``dp_sgd`` each batch's loss gradient is replaced by DP-SGD's clipped
    and noised one (see :class:`DPSGD`); the proximal term and the correction,
    which do not read the examples, are added after. ``noise`` seeds the
    noise; by default it comes from the operating system's entropy, never from
    the plan's seed, which the coordinator knows. The returned loss is the
    plain mean over the examples, not a private figure.

    DP-SGD works with every optimizer: Adam's moments, weight decay and
    ``grad_clip`` only process the private gradient further, which spends
    no more privacy (post-processing).

    Raises:
        Abandoned: if ``abandoned`` was set.
        ModelError: if ``dp_sgd`` is set and Opacus cannot handle the model.
        ConfigError: if ``dp_sgd`` is set and Opacus is not installed, an optimizer setting is
            out of range, or ``state`` does not fit.
    """
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise ConfigError(f"gradient clip {grad_clip!r} must be a positive finite number")
    task = task if task is not None else make_task(None, data.num_classes)
    steps = num_steps(plan, len(data), local_epochs)
    model.to(device).train()
    sampler = None
    try:
        private: tuple[DPSGD, torch.Generator] | None = None
        if dp_sgd is not None:
            sampler = _grad_sampler(model)
            private = dp_sgd, noise if noise is not None else torch.Generator().manual_seed(secrets.randbits(63))
        parameters = dict(model.named_parameters())
        local = _optimizer(parameters.values(), plan.lr, optimizer, momentum, weight_decay)
        if state is not None:
            _resume(local, optimizer, state)
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
        # Summed on the device, read once: a per-batch ``item()`` would wait for a GPU at every step.
        # float64, as Python's float was, so the loss is the same to the last bit.
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for batch in _batches(len(data), plan, steps):
            if abandoned is not None and abandoned.is_set():
                raise Abandoned
            if batch_delay:
                time.sleep(batch_delay)
            index = torch.from_numpy(batch)
            # One batch read at a time: a folder of images is never held whole.
            x, y = torch.from_numpy(data.batch(batch)).to(device), task.targets(data.labels[batch]).to(device)
            local.zero_grad()
            loss = task.loss(model(x), y)
            pull = None  # FedProx's proximal term
            if proximal:
                distances = [torch.sum((parameters[name] - proximal[name]) ** 2) for name in proximal]
                pull = plan.mu / 2 * torch.stack(distances).sum()
            if private is None:
                torch.autograd.backward(loss if pull is None else loss + pull)
            else:
                torch.autograd.backward(loss)
                _privatize([p for p in parameters.values() if p.requires_grad], index, *private)
                if pull is not None:
                    torch.autograd.backward(pull)  # its gradient adds to the private one
            for name, shift in shifts.items():
                grad = parameters[name].grad
                if grad is not None:
                    grad += shift
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(parameters.values()), grad_clip)
            local.step()
            total_loss += loss.detach().double() * len(index)
            seen += len(index)
    finally:
        if sampler is not None:
            sampler._close()  # removes Opacus's hooks and attributes from the cached model
        model.cpu()  # also when abandoned or out of memory: the cached model lives on the CPU
    return TrainResult(total_loss.item() / seen if seen else 0.0, steps, _portable(optimizer, local))


def _summed_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> float:
    """The batch's loss summed over its examples: exact for a built-in task, mean times size for a user's."""
    if isinstance(task, BuiltinTask):
        return task.summed_loss(output, target).item()
    return task.loss(output, target).item() * len(target)


def _add_sums(total: dict[str, np.ndarray] | None, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A running sum of the task's per-batch metric sums, checked like sites' sums.

    Raises:
        ModelError: if a batch's sums are not numeric, finite, or shaped as the first batch's.
    """
    try:
        return combine([batch] if total is None else [total, batch], what="batch")
    except AggregationError as exc:
        raise ModelError(f"task metric sums are inconsistent: {exc}") from None


def evaluate(
    model: nn.Module, data: Dataset, batch_size: int, device: torch.device, task: Task | None = None
) -> EvalOutcome:
    """Mean loss per example (a sum over examples divided by their number), accuracy, predictions, per
    true class its examples and those predicted right, and the task's metric sums; ``batch_size`` examples
    read at a time.

    ``task`` defaults to the classic classification. A task that predicts no
    class (regression) counts every example in the one class of a continuous
    label, none of them correct. A binary task's sums also hold the site's
    exact ``auc`` and ``pr_auc`` from its raw scores when both classes are present.

    Raises:
        ModelError: if the task predicts a class out of range or its metric sums are inconsistent.
    """
    task = task if task is not None else make_task(None, data.num_classes)
    model.to(device).eval()
    try:
        total_loss = 0.0
        correct = 0
        predictions = torch.zeros(data.num_classes, dtype=torch.int64)
        counts = torch.zeros(data.num_classes, dtype=torch.int64)
        hits = torch.zeros(data.num_classes, dtype=torch.int64)
        sums: dict[str, np.ndarray] | None = None
        scores: list[np.ndarray] = []  # a binary task's probabilities, for the site's exact AUC
        with torch.no_grad():
            for inputs, labels in data.chunks(batch_size):
                x = torch.from_numpy(inputs).to(device)
                output = model(x)
                total_loss += _summed_loss(task, output, task.targets(labels).to(device))
                predicted = task.predicted(output)
                if predicted is None:
                    predictions[0] += len(labels)
                    counts[0] += len(labels)
                else:
                    if len(predicted) and not 0 <= int(predicted.min()) <= int(predicted.max()) < data.num_classes:
                        raise ModelError(f"task predicted class {int(predicted.max())} of {data.num_classes} classes")
                    y = torch.from_numpy(labels).to(device)
                    right = predicted == y
                    correct += int(right.sum().item())
                    predictions += torch.bincount(predicted.cpu(), minlength=data.num_classes)[: data.num_classes]
                    counts += torch.bincount(y.cpu(), minlength=data.num_classes)[: data.num_classes]
                    hits += torch.bincount(y[right].cpu(), minlength=data.num_classes)[: data.num_classes]
                sums = _add_sums(sums, task.batch_sums(output, labels))
                if isinstance(task, Binary):
                    scores.append(task.probabilities(output).cpu().numpy().astype(np.float64))
    finally:
        model.cpu()
    metrics = sums if sums is not None else {}
    if scores:
        auc, pr_auc = (
            roc_auc(data.labels, np.concatenate(scores)),
            average_precision(data.labels, np.concatenate(scores)),
        )
        if auc is not None and pr_auc is not None:
            metrics.update(auc=np.array([auc]), pr_auc=np.array([pr_auc]))
    return EvalOutcome(
        total_loss / len(data),
        correct,
        len(data),
        [int(n) for n in predictions],
        [int(n) for n in counts],
        [int(n) for n in hits],
        metrics,
    )


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
        elif attack == "nan":
            result = np.full(array.shape, np.nan)
        else:
            result = array + rng.normal(0.0, 1.0, array.shape)
        corrupted[name] = np.asarray(result, dtype=array.dtype)
    return corrupted
