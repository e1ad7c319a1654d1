"""The messages of training and evaluation: a round's plan, fit and its result, held updates, evaluate.

A fit request carries the weights and a :class:`TrainingPlan`; the reply is
the trained weights (or update), or, when the plan holds it, a token the
coordinator fetches when it has room (flow control).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

from ..compression import COMPRESSIONS
from ..exceptions import describe
from ..tensors import Weights, decode_weights, encode_weights
from .base import (
    MAX_ID,
    MAX_PLAN_SIZE,
    MAX_SHARD,
    Message,
    _check,
    _check_counts,
    _check_name,
    _check_weights,
    _fields,
    _is_int,
    _is_number,
    _optional_weights_equal,
    _weights_equal,
)
from .data_messages import DataPlan, plan_field, plan_from
from .task_messages import Recipe, check_metrics, check_recipe, metrics_field, metrics_from, recipe_field, recipe_from
from .terms import Terms, terms_field, terms_from

__all__ = [
    "COMPRESSIONS",
    "EVAL_SPLITS",
    "OPTIMIZERS",
    "MAX_WEIGHT_DECAY",
    "MAX_LOCAL_EPOCHS",
    "TrainingPlan",
    "Fit",
    "FitResult",
    "FitHeld",
    "Fetch",
    "Evaluate",
    "EvalResult",
]


#: What an evaluation may ask a worker to score on instead of its own data: its held-out validation split.
EVAL_SPLITS: Final = ("validation",)
#: The optimizers a worker trains with; the first is the default, today's plain SGD.
OPTIMIZERS: Final = ("sgd", "adam", "adamw")
#: The largest weight decay a plan may ask for: past 1, one step would more than erase the weights.
MAX_WEIGHT_DECAY: Final = 1.0
#: The most passes over its shard a worker may be asked to make in one round.
MAX_LOCAL_EPOCHS: Final = 1000


def _check_optional_name(value: Any, what: str) -> None:
    if value is not None:
        _check_name(value, what)


@dataclass(frozen=True)
class TrainingPlan:
    """How a worker trains in one round: an optimizer over ``num_batches`` batches, or ``local_epochs`` passes.

    Zero batches send the weights straight back: a round of pure transfer,
    for benchmarks and link checks.

    ``optimizer`` is one of :data:`OPTIMIZERS`, plain SGD by default (today's
    ``torch.optim.SGD(params, lr)``); ``momentum`` is SGD's alone (Adam keeps
    moments of its own), ``weight_decay`` is SGD's and Adam's L2 term or
    AdamW's decoupled decay, and ``grad_clip`` bounds each step's gradient L2
    norm. With ``local_epochs`` the worker makes that many passes over its
    shard (``ceil(n / batch_size)`` batches each) instead, and ``num_batches``
    must be 0, so a plan never says two things. ``keep_state`` keeps the
    optimizer's state (momentum, Adam moments) per worker and model from one
    round to the next; by default each round starts afresh.

    ``mu`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` to the
    loss (Li et al. 2020). With ``delta`` the worker sends back its update
    ``w - w_global`` instead of ``w``: asynchronous rounds need it (the
    coordinator has moved on from the worker's base model) and it compresses
    far better. ``compress`` names the encoding of the reply's tensors.

    Differential privacy (DP-FedAvg, McMahan et al. 2018): with ``clip`` the
    worker sends only its float tensors' update, scaled down to L2 norm at
    most ``clip``, plus Gaussian noise of standard deviation ``noise_std``
    per value (its share of distributed noise; 0 in central mode).

    With ``hold`` the worker keeps its reply and answers :class:`FitHeld`;
    the coordinator takes the update with :class:`Fetch` when it has room for
    it. This is flow control: the coordinator bounds how many updates it
    receives at once without leaving any connection unread.
    """

    round: int
    batch_size: int
    num_batches: int
    lr: float
    seed: int
    mu: float = 0.0
    delta: bool = False
    compress: str = "none"
    clip: float | None = None
    noise_std: float = 0.0
    hold: bool = False
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    local_epochs: int | None = None
    keep_state: bool = False

    def __post_init__(self) -> None:
        _check(_is_int(self.round) and 1 <= self.round <= MAX_ID, "round must be a positive integer")
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            f"batch_size must be an integer from 1 to 1000000, not {describe(self.batch_size)}",
        )
        _check(
            _is_int(self.num_batches) and 0 <= self.num_batches <= MAX_PLAN_SIZE,
            f"num_batches must be an integer from 0 to 1000000, not {describe(self.num_batches)}",
        )
        _check(_is_number(self.lr) and self.lr > 0, f"lr must be a positive finite number, not {describe(self.lr)}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed must be a non-negative 63-bit integer")
        _check(
            _is_number(self.mu) and self.mu >= 0, f"mu must be a non-negative finite number, not {describe(self.mu)}"
        )
        _check(type(self.delta) is bool, f"delta must be true or false, not {describe(self.delta)}")
        _check(
            self.compress in COMPRESSIONS,
            f"compress must be one of {', '.join(COMPRESSIONS)}, not {describe(self.compress)}",
        )
        _check(
            self.clip is None or (_is_number(self.clip) and self.clip > 0),
            f"clip must be a positive finite number, not {describe(self.clip)}",
        )
        _check(
            _is_number(self.noise_std) and self.noise_std >= 0,
            f"noise_std must be a non-negative finite number, not {describe(self.noise_std)}",
        )
        _check(type(self.hold) is bool, f"hold must be true or false, not {describe(self.hold)}")
        _check(self.clip is None or self.delta, "clip needs delta: it bounds the update, not the weights")
        _check(self.clip is not None or not self.noise_std, "noise_std needs clip: the noise is scaled to the clip")
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """The local optimizer's settings: each bounded, and none that the chosen optimizer would ignore."""
        _check(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {describe(self.optimizer)}",
        )
        _check(
            _is_number(self.momentum) and 0 <= self.momentum < 1,
            f"momentum must be a number from 0 to below 1, not {describe(self.momentum)}",
        )
        _check(not self.momentum or self.optimizer == "sgd", f"momentum goes with sgd, not {self.optimizer}")
        _check(
            _is_number(self.weight_decay) and 0 <= self.weight_decay <= MAX_WEIGHT_DECAY,
            f"weight_decay must be a number from 0 to {MAX_WEIGHT_DECAY}, not {describe(self.weight_decay)}",
        )
        _check(
            self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
            f"grad_clip must be a positive finite number, not {describe(self.grad_clip)}",
        )
        _check(
            self.local_epochs is None or (_is_int(self.local_epochs) and 1 <= self.local_epochs <= MAX_LOCAL_EPOCHS),
            f"local_epochs must be an integer from 1 to {MAX_LOCAL_EPOCHS}, not {describe(self.local_epochs)}",
        )
        _check(
            self.local_epochs is None or self.num_batches == 0,
            f"num_batches must be 0 with local_epochs, not {describe(self.num_batches)}",
        )
        _check(type(self.keep_state) is bool, f"keep_state must be true or false, not {describe(self.keep_state)}")

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "lr": float(self.lr),
            "seed": self.seed,
            # Defaults stay off the wire, so a plain FedAvg plan reads the same to any version-1 peer.
            **({"mu": float(self.mu)} if self.mu else {}),
            **({"delta": True} if self.delta else {}),
            **({"compress": self.compress} if self.compress != "none" else {}),
            **({"clip": float(self.clip)} if self.clip is not None else {}),
            **({"noise_std": float(self.noise_std)} if self.noise_std else {}),
            **({"hold": True} if self.hold else {}),
            **({"optimizer": self.optimizer} if self.optimizer != "sgd" else {}),
            **({"momentum": float(self.momentum)} if self.momentum else {}),
            **({"weight_decay": float(self.weight_decay)} if self.weight_decay else {}),
            **({"grad_clip": float(self.grad_clip)} if self.grad_clip is not None else {}),
            **({"local_epochs": self.local_epochs} if self.local_epochs is not None else {}),
            **({"keep_state": True} if self.keep_state else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> TrainingPlan:
        _check(isinstance(body, Mapping), "plan must be a map")
        _fields(
            body,
            "plan",
            {"round", "batch_size", "num_batches", "lr", "seed"},
            frozenset(
                {"mu", "delta", "compress", "clip", "noise_std", "hold"}
                | {"optimizer", "momentum", "weight_decay", "grad_clip", "local_epochs", "keep_state"}
            ),
        )
        return cls(**body)


@dataclass(frozen=True, eq=False)
class Fit(Message):
    """Train the named model, starting from ``weights``, on the worker's shard.

    ``control`` is SCAFFOLD's server control variate (Karimireddy et al.
    2020): with it, the worker corrects each gradient by ``control - c_i``
    and returns how its own variate ``c_i`` moved.
    """

    kind: ClassVar[str] = "fit"
    model: str
    weights: Weights
    plan: TrainingPlan
    control: Weights | None = None
    dataset_key: str | None = None  # which named data set to train on; None: the worker's default
    data: DataPlan | None = None  # what the federation agreed about its own data; None: a bundled data set
    recipe: Recipe | None = None  # the task; None: classification with cross-entropy
    terms: Terms | None = None  # the job this fit belongs to, for a site's policy (syncfed.policy)

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(isinstance(self.plan, TrainingPlan), "plan must be a TrainingPlan")
        _check(self.terms is None or isinstance(self.terms, Terms), "terms must be Terms")
        if self.control is not None:
            _check_weights(self.control)
        _check_optional_name(self.dataset_key, "dataset_key")
        _check(self.data is None or isinstance(self.data, DataPlan), "data must be a DataPlan")
        check_recipe(self.recipe, self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fit):
            return NotImplemented
        return (
            self.model == other.model
            and self.plan == other.plan
            and self.dataset_key == other.dataset_key
            and self.data == other.data
            and self.recipe == other.recipe
            and self.terms == other.terms
            and _weights_equal(self.weights, other.weights)
            and _optional_weights_equal(self.control, other.control)
        )

    def to_body(self) -> dict[str, Any]:
        body = {"model": self.model, "weights": encode_weights(self.weights), "plan": self.plan.to_body()}
        if self.control is not None:
            body["control"] = encode_weights(self.control)
        if self.dataset_key is not None:
            body["dataset_key"] = self.dataset_key
        return {**body, **plan_field(self.data), **recipe_field(self.recipe), **terms_field(self.terms)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Fit:
        _fields(
            body,
            cls.kind,
            {"model", "weights", "plan"},
            frozenset({"control", "dataset_key", "data", "recipe", "terms"}),
        )
        control = decode_weights(body["control"]) if "control" in body else None
        return cls(
            body["model"],
            decode_weights(body["weights"]),
            TrainingPlan.from_body(body["plan"]),
            control,
            body.get("dataset_key"),
            plan_from(body),
            recipe_from(body),
            terms_from(body),
        )


@dataclass(frozen=True, eq=False)
class FitResult(Message):
    """A worker's trained weights (or update, when the plan asked for a delta), its example count and loss.

    ``control_delta`` is how the worker's SCAFFOLD control variate moved,
    when the request carried a server control variate. ``dp_epsilon`` is the
    epsilon a worker that trains with example-level DP-SGD has spent on its
    examples so far, at its own delta; ``None`` (and off the wire) without.
    """

    kind: ClassVar[str] = "fit_result"
    weights: Weights
    num_examples: int
    loss: float
    seconds: float = 0.0
    control_delta: Weights | None = None
    compression_error: float = 0.0  # relative L2 error the reply's compression put into its tensors
    dp_epsilon: float | None = None

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        _check(
            _is_int(self.num_examples) and 0 < self.num_examples <= MAX_SHARD,
            f"num_examples must be a positive integer up to {MAX_SHARD}, not {describe(self.num_examples)}",
        )
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_number(self.seconds) and self.seconds >= 0, "seconds must be a non-negative number")
        if self.control_delta is not None:
            _check_weights(self.control_delta)
        _check(
            _is_number(self.compression_error) and self.compression_error >= 0,
            "compression_error must be a non-negative number",
        )
        _check(
            self.dp_epsilon is None or (_is_number(self.dp_epsilon) and self.dp_epsilon >= 0),
            "dp_epsilon must be a non-negative number",
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FitResult):
            return NotImplemented
        return (
            (self.num_examples, self.loss, self.seconds) == (other.num_examples, other.loss, other.seconds)
            and _weights_equal(self.weights, other.weights)
            and _optional_weights_equal(self.control_delta, other.control_delta)
        )

    def to_body(self) -> dict[str, Any]:
        body = {
            "weights": encode_weights(self.weights),
            "num_examples": self.num_examples,
            "loss": float(self.loss),
            "seconds": float(self.seconds),
        }
        if self.control_delta is not None:
            body["control_delta"] = encode_weights(self.control_delta)
        if self.compression_error:
            body["compression_error"] = float(self.compression_error)
        if self.dp_epsilon is not None:
            body["dp_epsilon"] = float(self.dp_epsilon)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FitResult:
        _fields(
            body,
            cls.kind,
            {"weights", "num_examples", "loss", "seconds"},
            frozenset({"control_delta", "compression_error", "dp_epsilon"}),
        )
        control_delta = decode_weights(body["control_delta"]) if "control_delta" in body else None
        return cls(
            decode_weights(body["weights"]),
            body["num_examples"],
            body["loss"],
            body["seconds"],
            control_delta,
            body.get("compression_error", 0.0),
            body.get("dp_epsilon"),
        )


@dataclass(frozen=True)
class _Token(Message):
    """A message whose body is one token: the handle of an update a worker holds (flow control)."""

    token: int

    def __post_init__(self) -> None:
        _check(
            _is_int(self.token) and 1 <= self.token <= MAX_ID,
            f"token must be a positive integer, not {describe(self.token)}",
        )

    def to_body(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        _fields(body, cls.kind, {"token"})
        return cls(body["token"])


@dataclass(frozen=True)
class FitHeld(_Token):
    """The answer to a fit whose plan holds the reply: the worker trained and keeps the update under ``token``."""

    kind: ClassVar[str] = "fit_held"


@dataclass(frozen=True)
class Fetch(_Token):
    """Send the update held under ``token`` (see :class:`FitHeld`); answered with :class:`FitResult`."""

    kind: ClassVar[str] = "fetch"


@dataclass(frozen=True, eq=False)
class Evaluate(Message):
    """Evaluate the named model with ``weights`` on the worker's data.

    By default a worker scores on the examples it holds (the evaluator's test
    set, a trainer's training shard); ``split="validation"`` asks a trainer
    for its held-out validation split instead (federated evaluation).
    ``dataset_key`` picks one of its named data sets.
    """

    kind: ClassVar[str] = "evaluate"
    model: str
    weights: Weights
    batch_size: int
    split: str | None = None
    dataset_key: str | None = None
    data: DataPlan | None = None  # as in :class:`Fit`
    recipe: Recipe | None = None  # as in :class:`Fit`
    terms: Terms | None = None  # as in :class:`Fit`

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            "batch_size must be an integer from 1 to 1000000",
        )
        _check(
            self.split is None or self.split in EVAL_SPLITS,
            f"split must be one of {', '.join(EVAL_SPLITS)}, not {describe(self.split)}",
        )
        _check_optional_name(self.dataset_key, "dataset_key")
        _check(self.data is None or isinstance(self.data, DataPlan), "data must be a DataPlan")
        check_recipe(self.recipe, self.data)
        _check(self.terms is None or isinstance(self.terms, Terms), "terms must be Terms")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Evaluate):
            return NotImplemented
        return (self.model, self.batch_size, self.split, self.dataset_key, self.data, self.recipe, self.terms) == (
            other.model,
            other.batch_size,
            other.split,
            other.dataset_key,
            other.data,
            other.recipe,
            other.terms,
        ) and _weights_equal(self.weights, other.weights)

    def to_body(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": encode_weights(self.weights),
            "batch_size": self.batch_size,
            **({"split": self.split} if self.split is not None else {}),
            **({"dataset_key": self.dataset_key} if self.dataset_key is not None else {}),
            **plan_field(self.data),
            **recipe_field(self.recipe),
            **terms_field(self.terms),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Evaluate:
        _fields(
            body,
            cls.kind,
            {"model", "weights", "batch_size"},
            frozenset({"split", "dataset_key", "data", "recipe", "terms"}),
        )
        return cls(
            body["model"],
            decode_weights(body["weights"]),
            body["batch_size"],
            body.get("split"),
            body.get("dataset_key"),
            plan_from(body),
            recipe_from(body),
            terms_from(body),
        )


@dataclass(frozen=True, eq=False)
class EvalResult(Message):
    """Mean loss per example, number correct, and the histogram of predicted classes.

    ``class_counts`` and ``class_correct`` (optional, together) give per true
    class its examples and those predicted right: per-class recall.
    ``metrics`` holds the task's metric sums (:data:`~syncfed.protocol.task_messages.METRICS`),
    which add up across sites; a regression result has ``correct`` 0 and one
    "class" in ``predictions``.
    """

    kind: ClassVar[str] = "eval_result"
    loss: float
    correct: int
    num_examples: int
    predictions: tuple[int, ...]
    class_counts: tuple[int, ...] | None = None
    class_correct: tuple[int, ...] | None = None
    metrics: Weights | None = None

    def __post_init__(self) -> None:
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_int(self.num_examples) and self.num_examples > 0, "num_examples must be a positive integer")
        _check(
            _is_int(self.correct) and 0 <= self.correct <= self.num_examples,
            "correct must be an integer from 0 to num_examples",
        )
        _check_counts(self.predictions, "predictions")
        _check(sum(self.predictions) == self.num_examples, "predictions must sum to num_examples")
        object.__setattr__(self, "predictions", tuple(self.predictions))
        _check(
            (self.class_counts is None) == (self.class_correct is None),
            "class_counts and class_correct go together",
        )
        if self.class_counts is not None and self.class_correct is not None:
            _check_counts(self.class_counts, "class_counts")
            _check_counts(self.class_correct, "class_correct")
            _check(
                len(self.class_counts) == len(self.class_correct) == len(self.predictions),
                "class_counts and class_correct must have one entry per class of predictions",
            )
            _check(sum(self.class_counts) == self.num_examples, "class_counts must sum to num_examples")
            _check(sum(self.class_correct) == self.correct, "class_correct must sum to correct")
            _check(
                all(c <= n for c, n in zip(self.class_correct, self.class_counts, strict=True)),
                "class_correct must not exceed class_counts",
            )
            object.__setattr__(self, "class_counts", tuple(self.class_counts))
            object.__setattr__(self, "class_correct", tuple(self.class_correct))
        if self.metrics is not None:
            per_class = None if self.class_counts is None else (self.class_counts, self.class_correct or ())
            check_metrics(self.metrics, self.num_examples, self.correct, self.predictions, per_class)
            object.__setattr__(self, "metrics", dict(self.metrics))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvalResult):
            return NotImplemented
        fields = (self.loss, self.correct, self.num_examples, self.predictions, self.class_counts, self.class_correct)
        return fields == (
            other.loss,
            other.correct,
            other.num_examples,
            other.predictions,
            other.class_counts,
            other.class_correct,
        ) and _optional_weights_equal(self.metrics, other.metrics)

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_examples

    def to_body(self) -> dict[str, Any]:
        return {
            "loss": float(self.loss),
            "correct": self.correct,
            "num_examples": self.num_examples,
            "predictions": list(self.predictions),
            **(
                {"class_counts": list(self.class_counts), "class_correct": list(self.class_correct)}
                if self.class_counts is not None and self.class_correct is not None
                else {}
            ),
            **metrics_field(self.metrics),
        }

    @property
    def recall(self) -> tuple[float | None, ...] | None:
        """Per class, the share of its examples predicted right (``None`` for a class with none here)."""
        if self.class_counts is None or self.class_correct is None:
            return None
        return tuple(c / n if n else None for c, n in zip(self.class_correct, self.class_counts, strict=True))

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> EvalResult:
        _fields(
            body,
            cls.kind,
            {"loss", "correct", "num_examples", "predictions"},
            frozenset({"class_counts", "class_correct", "metrics"}),
        )
        return cls(**{**body, "metrics": metrics_from(body)})
