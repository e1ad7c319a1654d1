"""The task on the wire: what a run asks the model to learn, and how its built-in model is shaped.

A :class:`Recipe` travels as the optional ``recipe`` field of fit, evaluate
and describe requests. Without it a request means what it always meant:
classification with cross-entropy, so the classic demo's messages are
unchanged. With it a worker knows the task (classification, binary,
regression, or a task of the worker operator's own, named by import path),
its loss and settings, and the shape of a built-in model sized from the
data plan (``syncfed.shaped_models``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..exceptions import describe
from .base import MAX_CLASSES, _check, _check_name, _fields, _is_int, _is_number

__all__ = [
    "TASK_KINDS",
    "LOSSES",
    "MIN_BINS",
    "MAX_BINS",
    "MAX_HIDDEN",
    "MAX_WIDTH",
    "Recipe",
    "recipe_field",
    "recipe_from",
]

#: The built-in tasks; any other task is an import path the worker was started with.
TASK_KINDS: Final = ("classification", "binary", "regression")
#: The losses each built-in task trains with; the first is its default.
LOSSES: Final[dict[str, tuple[str, ...]]] = {
    "classification": ("cross_entropy",),
    "binary": ("bce",),
    "regression": ("mse", "mae", "huber"),
}
#: Score-histogram bins a binary evaluation fills for federated AUC: at least 1,000, so the binning error is small.
MIN_BINS: Final = 1000
MAX_BINS: Final = 65_536
#: The most hidden layers, and the widest, a shaped model may be asked for.
MAX_HIDDEN: Final = 16
MAX_WIDTH: Final = 65_536


@dataclass(frozen=True)
class Recipe:
    """What a run trains: the task and its loss, their settings, and the built-in model's shape.

    - ``task``: one of :data:`TASK_KINDS`, or an import path ``mypkg.tasks:Task``
      (a worker builds only the task paths it was started with);
    - ``loss``: one of the task's :data:`LOSSES` (a user task ignores it);
    - ``class_weights``: classification only, one weight per agreed class, or empty for none;
    - ``threshold``: binary only, the score above which an example counts as positive;
    - ``bins``: binary only, the score histogram's bins for federated ROC and PR AUC;
    - ``huber_delta``: the Huber loss's delta, in standardised target units;
    - ``target_mean``, ``target_std``: regression only, the agreed standardisation of the target
      (the model learns ``(y - mean) / std``; metrics are reported in the target's own units);
    - ``hidden``, ``dropout``: the shaped ``mlp``'s hidden layer widths (empty: its default) and dropout.
    """

    task: str = "classification"
    loss: str = "cross_entropy"
    class_weights: tuple[float, ...] = ()
    threshold: float = 0.5
    bins: int = MIN_BINS
    huber_delta: float = 1.0
    target_mean: float = 0.0
    target_std: float = 1.0
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_name(self.task, "task")
        builtin = self.task in TASK_KINDS
        _check(builtin or ":" in self.task, f"task must be one of {', '.join(TASK_KINDS)} or mypkg.tasks:Task")
        if builtin:
            _check(
                self.loss in LOSSES[self.task],
                f"loss of a {self.task} task must be one of {', '.join(LOSSES[self.task])}, not {describe(self.loss)}",
            )
        else:
            _check_name(self.loss, "loss")
        _check(
            isinstance(self.class_weights, (list, tuple))
            and len(self.class_weights) <= MAX_CLASSES
            and all(_is_number(w) and w > 0 for w in self.class_weights),
            f"class_weights must be at most {MAX_CLASSES} positive finite numbers",
        )
        _check(not self.class_weights or self.task == "classification", "class_weights go with a classification task")
        _check(
            _is_number(self.threshold) and 0 < self.threshold < 1,
            f"threshold must be a number strictly between 0 and 1, not {describe(self.threshold)}",
        )
        _check(
            _is_int(self.bins) and MIN_BINS <= self.bins <= MAX_BINS,
            f"bins must be an integer from {MIN_BINS} to {MAX_BINS}, not {describe(self.bins)}",
        )
        _check(
            _is_number(self.huber_delta) and self.huber_delta > 0,
            f"huber_delta must be a positive finite number, not {describe(self.huber_delta)}",
        )
        _check(_is_number(self.target_mean), f"target_mean must be a finite number, not {describe(self.target_mean)}")
        _check(
            _is_number(self.target_std) and self.target_std > 0,
            f"target_std must be a positive finite number, not {describe(self.target_std)}",
        )
        _check(
            isinstance(self.hidden, (list, tuple))
            and len(self.hidden) <= MAX_HIDDEN
            and all(_is_int(width) and 0 < width <= MAX_WIDTH for width in self.hidden),
            f"hidden must be at most {MAX_HIDDEN} layer widths from 1 to {MAX_WIDTH}, not {describe(self.hidden)}",
        )
        _check(
            _is_number(self.dropout) and 0 <= self.dropout < 1,
            f"dropout must be a number from 0 to below 1, not {describe(self.dropout)}",
        )
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for name in ("threshold", "huber_delta", "target_mean", "target_std", "dropout"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def outputs_per_class(self) -> bool:
        """Whether the model has one output per class (classification), rather than one output (binary, regression)."""
        return self.task == "classification"

    def num_outputs(self, num_classes: int) -> int:
        """The model's output width over data of ``num_classes`` agreed classes (a user task: one per class)."""
        return 1 if self.task in ("binary", "regression") else num_classes

    def to_body(self) -> dict[str, Any]:
        default = Recipe()
        body: dict[str, Any] = {"task": self.task, "loss": self.loss}
        # Settings at their default stay off the wire.
        for name in ("threshold", "bins", "huber_delta", "target_mean", "target_std", "dropout"):
            if getattr(self, name) != getattr(default, name):
                body[name] = getattr(self, name)
        if self.class_weights:
            body["class_weights"] = list(self.class_weights)
        if self.hidden:
            body["hidden"] = list(self.hidden)
        return body

    @classmethod
    def from_body(cls, body: Any) -> Recipe:
        _check(isinstance(body, Mapping), "recipe must be a map")
        _fields(
            body,
            "recipe",
            {"task", "loss"},
            frozenset(
                {"class_weights", "threshold", "bins", "huber_delta", "target_mean", "target_std", "hidden", "dropout"}
            ),
        )
        return cls(**body)


def recipe_from(body: Mapping[str, Any]) -> Recipe | None:
    """A request's optional ``recipe`` field, or ``None`` (classification with cross-entropy, as ever)."""
    return Recipe.from_body(body["recipe"]) if body.get("recipe") is not None else None


def recipe_field(recipe: Recipe | None) -> dict[str, Any]:
    """The ``recipe`` field of a request body; absent without a recipe, so a classic request reads as before."""
    return {"recipe": recipe.to_body()} if recipe is not None else {}
