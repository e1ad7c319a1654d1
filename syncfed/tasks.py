"""What a model learns and how it is judged: classification, binary, regression, or a user's own task.

A task is built from the run's :class:`~syncfed.protocol.Recipe` by
:func:`make_task` (no recipe: classification with cross-entropy, exactly the
classic training), or imported from a path the worker was started with
(:func:`resolve_task`).

**The task protocol.** A user's task, ``--task mypkg.tasks:Task``, is an
object, or a class called with one argument, the agreed number of classes (1
for a continuous label), that gives:

- ``num_outputs: int``: the model's output width per example (positive);
- ``targets(labels: np.ndarray) -> torch.Tensor``: the training targets of a
  batch's labels (int64 class indices, or float32 values for a continuous label);
- ``loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor``: the
  batch's mean loss, a scalar with a gradient; ``target`` is ``targets(...)``
  moved to the model's device;
- ``predicted(output: torch.Tensor) -> torch.Tensor | None``: the predicted
  class of each example (int64, in ``range(num_classes)``), or ``None`` for a
  task that predicts no class;
- ``batch_sums(output: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]``:
  the batch's metric sums, which evaluation adds up over batches and the
  coordinator over sites (``syncfed.metrics``). Built-in names must be in a
  built-in task's layout (``confusion``; ``confusion`` and ``scores``;
  ``regression``); a task's own sums are named ``user.<name>`` (``<name>``
  of ``[a-z][a-z0-9_]{0,31}``), at most 16, int64 or float64 of at most
  65,536 elements each (:func:`~syncfed.protocol.task_messages.check_metrics`
  refuses the rest). Every batch must give the same names and shapes.

Optionally, for the coordinator alone:

- ``metrics(sums: dict[str, np.ndarray]) -> dict[str, float]``: the task's
  figures from the sums added over every batch and site (its own sums and
  any built-in ones). A coordinator started with the same ``--task`` path
  that can import it prints them and writes them as ``user.<name>``
  (:func:`user_figures` checks them); one that cannot writes the raw sums.

The built-in tasks follow the same protocol, plus :meth:`BuiltinTask.summed_loss`,
which evaluation uses for an exact loss sum (a user task's is its mean
loss times the batch size).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .exceptions import ConfigError, DatasetError, ModelError, describe
from .metrics import score_histogram
from .protocol.task_messages import MAX_CONFUSION_CLASSES, Recipe

__all__ = [
    "Task",
    "BuiltinTask",
    "Classification",
    "Binary",
    "Regression",
    "make_task",
    "resolve_task",
    "MAX_USER_FIGURES",
    "user_figures",
]

_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_FIGURE = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: The most figures a user task's ``metrics`` may return.
MAX_USER_FIGURES: Final = 16
_METHODS = ("targets", "loss", "predicted", "batch_sums")


@runtime_checkable
class Task(Protocol):
    """What training and evaluation need of a task (the module docstring gives each member's contract)."""

    @property
    def num_outputs(self) -> int: ...

    def targets(self, labels: np.ndarray) -> torch.Tensor: ...

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def predicted(self, output: torch.Tensor) -> torch.Tensor | None: ...

    def batch_sums(self, output: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]: ...


def _class_labels(labels: np.ndarray, num_classes: int, task: str) -> np.ndarray:
    """``labels`` as class indices, checked: a continuous label cannot train a task of classes."""
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"a {task} task needs class labels, not a continuous label ({labels.dtype})")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"label {int(labels.max())} is out of range for {num_classes} classes")
    return labels


def _one_output(output: torch.Tensor, task: str) -> torch.Tensor:
    """The single output column of a binary or regression model, as a vector."""
    if output.dim() != 2 or output.shape[1] != 1:
        raise ModelError(f"model output of shape {tuple(output.shape)} does not fit a {task} task: it needs (N, 1)")
    return output[:, 0]


class BuiltinTask:
    """Common ground of the built-in tasks: the output width and the exact loss sum evaluation reports."""

    def __init__(self, num_outputs: int) -> None:
        self._num_outputs = num_outputs

    @property
    def num_outputs(self) -> int:
        return self._num_outputs

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss summed over the batch's examples (``reduction="sum"``)."""
        raise NotImplementedError


class Classification(BuiltinTask):
    """Cross-entropy over one output per class, optionally class-weighted; the predicted class is the argmax.

    Without weights the loss is ``F.cross_entropy(output, target)``, the call
    the classic training always made, so its figures do not move.
    """

    def __init__(self, num_classes: int, class_weights: tuple[float, ...] = ()) -> None:
        if num_classes < 1:
            raise ConfigError(f"a classification task needs at least 1 class, not {num_classes}")
        if class_weights and len(class_weights) != num_classes:
            raise ConfigError(f"{len(class_weights)} class weights do not fit {num_classes} classes")
        super().__init__(num_classes)
        self.num_classes = num_classes
        self.class_weights = class_weights

    def _weight(self, output: torch.Tensor) -> torch.Tensor | None:
        if not self.class_weights:
            return None
        return torch.tensor(self.class_weights, dtype=output.dtype, device=output.device)

    def targets(self, labels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(_class_labels(labels, self.num_classes, "classification").astype(np.int64, copy=False))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self._weight(output)
        return F.cross_entropy(output, target) if weight is None else F.cross_entropy(output, target, weight=weight)

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, weight=self._weight(output), reduction="sum")

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)

    def batch_sums(self, output: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
        c = self.num_classes
        if c > MAX_CONFUSION_CLASSES:  # C * C counts (80 GB at 100,000 classes) that no result may carry
            return {}
        truth = _class_labels(labels, self.num_classes, "classification").astype(np.int64)
        guess = self.predicted(output).cpu().numpy().astype(np.int64)
        return {"confusion": np.bincount(truth * c + guess, minlength=c * c).reshape(c, c).astype(np.int64)}


class Binary(BuiltinTask):
    """Binary cross-entropy on one logit; class 1 of the agreed two is the positive one.

    An example is predicted positive when its probability ``sigmoid(logit)``
    exceeds ``threshold``; its probability also fills the score histogram of
    ``bins`` bins from which the coordinator computes ROC and PR AUC.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5, bins: int = 1000) -> None:
        if num_classes != 2:
            raise ConfigError(f"a binary task needs 2 classes, not {num_classes}")
        super().__init__(1)
        self.threshold = threshold
        self.bins = bins

    def targets(self, labels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(_class_labels(labels, 2, "binary").astype(np.float32))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(_one_output(output, "binary"), target)

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(_one_output(output, "binary"), target, reduction="sum")

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """Each example's probability of being positive."""
        return torch.sigmoid(_one_output(output, "binary"))

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        return (self.probabilities(output) > self.threshold).to(torch.int64)

    def batch_sums(self, output: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
        truth = _class_labels(labels, 2, "binary").astype(np.int64)
        probabilities = self.probabilities(output)
        guess = (probabilities > self.threshold).to(torch.int64).cpu().numpy()
        return {
            "confusion": np.bincount(truth * 2 + guess, minlength=4).reshape(2, 2).astype(np.int64),
            "scores": score_histogram(truth, probabilities.cpu().numpy().astype(np.float64), self.bins),
        }


class Regression(BuiltinTask):
    """One output trained on the standardised target ``(y - mean) / std``; metrics in the target's own units.

    ``loss``: ``mse``, ``mae`` (L1) or ``huber`` with ``huber_delta`` in
    standardised units. The model predicts no class.
    """

    def __init__(self, loss: str = "mse", target_mean: float = 0.0, target_std: float = 1.0, huber_delta: float = 1.0):
        if loss not in ("mse", "mae", "huber"):
            raise ConfigError(f"regression loss {loss!r} is not one of mse, mae, huber")
        if not target_std > 0:
            raise ConfigError(f"target standard deviation {target_std!r} must be positive")
        super().__init__(1)
        self.kind = loss
        self.target_mean = target_mean
        self.target_std = target_std
        self.huber_delta = huber_delta

    def targets(self, labels: np.ndarray) -> torch.Tensor:
        if labels.dtype.kind != "f":
            raise DatasetError(f"a regression task needs a continuous label, not class labels ({labels.dtype})")
        return torch.from_numpy(((labels.astype(np.float64) - self.target_mean) / self.target_std).astype(np.float32))

    def _loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
        prediction = _one_output(output, "regression")
        if self.kind == "mse":
            return F.mse_loss(prediction, target, reduction=reduction)
        if self.kind == "mae":
            return F.l1_loss(prediction, target, reduction=reduction)
        return F.huber_loss(prediction, target, reduction=reduction, delta=self.huber_delta)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target, "mean")

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target, "sum")

    def predicted(self, output: torch.Tensor) -> None:
        return None

    def batch_sums(self, output: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
        if labels.dtype.kind != "f":
            raise DatasetError(f"a regression task needs a continuous label, not class labels ({labels.dtype})")
        prediction = _one_output(output, "regression").detach().cpu().numpy().astype(np.float64)
        prediction = prediction * self.target_std + self.target_mean  # back in the target's own units
        y = labels.astype(np.float64)
        error = prediction - y
        return {
            "regression": np.array(
                [len(y), error.sum(), np.abs(error).sum(), (error**2).sum(), y.sum(), (y**2).sum()], dtype=np.float64
            )
        }


def make_task(recipe: Recipe | None, num_classes: int, *, user_tasks: Collection[str] = ()) -> Task:
    """The task a request's recipe names, over data of ``num_classes`` agreed classes (1: a continuous label).

    No recipe is classification with plain cross-entropy, the classic
    training. A user task is imported only when its path is in
    ``user_tasks``, the paths this worker's operator started it with: a
    coordinator never makes a worker import code.

    Raises:
        ConfigError: if the recipe does not fit the data (a binary task over 3 classes, class
            weights of another count), or names a task path this worker was not started with.
    """
    if recipe is None:
        return Classification(num_classes)
    if recipe.task == "classification":
        return Classification(num_classes, recipe.class_weights)
    if recipe.task == "binary":
        return Binary(num_classes, recipe.threshold, recipe.bins)
    if recipe.task == "regression":
        return Regression(recipe.loss, recipe.target_mean, recipe.target_std, recipe.huber_delta)
    if recipe.task not in user_tasks:
        raise ConfigError(f"task {recipe.task} is not one this worker was started with (--task)")
    return resolve_task(recipe.task, num_classes)


def resolve_task(path: str, num_classes: int) -> Task:
    """Import the user task at ``mypkg.tasks:Task`` and check that it gives the task protocol.

    A class (or other type) is instantiated with ``num_classes``; any other
    object is the task itself.

    Raises:
        ConfigError: if the path is malformed, cannot be imported, or its object lacks a member of the protocol.
    """
    if not _PATH.fullmatch(path):
        raise ConfigError(f"task path {path!r} must look like mypkg.tasks:Task")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task {path} cannot be imported: {exc}") from None
    found = getattr(module, attribute, None)
    if found is None:
        raise ConfigError(f"task {path}: module {module_name} has no {attribute}")
    try:
        task = found(num_classes) if isinstance(found, type) else found
    except Exception as exc:  # the user's constructor: any failure is a bad setting, said in one line
        raise ConfigError(f"task {path} cannot be built for {num_classes} classes: {exc}") from None
    missing = [name for name in _METHODS if not callable(getattr(task, name, None))]
    if missing:
        raise ConfigError(f"task {path} lacks {', '.join(missing)}: a task gives num_outputs, {', '.join(_METHODS)}")
    outputs = getattr(task, "num_outputs", None)
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise ConfigError(f"task {path} num_outputs {outputs!r} must be a positive integer")
    return task  # type: ignore[no-any-return]


def user_figures(task: Any, sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The figures a user task's optional ``metrics`` gives for combined ``sums``; ``{}`` when it has none.

    Raises:
        ModelError: if ``metrics`` fails, or returns other than at most 16 finite numbers under short
            lowercase names (``[a-z][a-z0-9_]{0,31}``).
    """
    compute = getattr(task, "metrics", None)
    if compute is None:
        return {}
    try:
        figures = compute({name: array.copy() for name, array in sums.items()})
    except Exception as exc:  # the operator's own code: any failure is said in one line
        raise ModelError(f"the task's metrics failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(figures, Mapping) or len(figures) > MAX_USER_FIGURES:
        raise ModelError(f"the task's metrics must return a dict of at most {MAX_USER_FIGURES} figures")
    checked = {}
    for name, value in figures.items():
        if not isinstance(name, str) or not _FIGURE.fullmatch(name):
            raise ModelError(f"the task's metric name {describe(name)} must match [a-z][a-z0-9_]{{0,31}}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ModelError(f"the task's metric {name} is {type(value).__name__}, not a number")
        if not np.isfinite(float(value)):
            raise ModelError(f"the task's metric {name} is {float(value)}, not a finite number")
        checked[name] = float(value)
    return checked
