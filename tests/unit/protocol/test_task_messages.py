"""The task on the wire: the recipe in requests, the local optimizer in the plan, the metric sums in eval results."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peer_bodies import built_and_decoded, envelope, pack

from syncfed.exceptions import LocalProtocolError, RemoteProtocolError
from syncfed.protocol import (
    LOSSES,
    MAX_CONFUSION_CLASSES,
    MAX_HIDDEN,
    MAX_HUBER_DELTA,
    MAX_ID,
    MAX_LOCAL_EPOCHS,
    MAX_PLAN_SIZE,
    MAX_SCORE_BINS,
    MAX_SHARD,
    MAX_WEIGHT_DECAY,
    MAX_WIDTH,
    METRICS,
    MIN_SCORE_BINS,
    OPTIMIZERS,
    REGRESSION_SUMS,
    TASK_KINDS,
    DataPlan,
    Describe,
    EvalResult,
    Evaluate,
    Fit,
    Message,
    Recipe,
    TrainingPlan,
    decode,
    encode,
    encode_fragments,
)
from syncfed.protocol.task_messages import MAX_USER_INT, MAX_USER_SUM_SIZE, MAX_USER_SUMS
from syncfed.tensors import encode_tensor, encode_weights

WEIGHTS = {"conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "fc.bias": np.zeros(2, np.float32)}
PLAN = TrainingPlan(round=3, batch_size=32, num_batches=10, lr=0.05, seed=7)
BELOW_ONE = math.nextafter(1.0, 0.0)
ABOVE_ONE = math.nextafter(1.0, 2.0)


def round_trip(message: Message) -> Message:
    return decode(encode(11, message)).message


def streamed_round_trip(message: Message) -> Message:
    """Through the streamed format, fragments of 64 bytes: every tensor leaves the header."""
    outgoing = encode_fragments(11, message, chunk_size=64)
    assert outgoing.streamed
    return decode(b"".join(bytes(fragment) for fragment in outgoing.fragments())).message


# Strategies ------------------------------------------------------------------

unit_open = st.floats(0, 1, exclude_min=True, exclude_max=True)
positive = st.floats(1e-6, 1e6)
finite = st.floats(-1e6, 1e6, allow_nan=False)
hidden = st.lists(st.integers(1, MAX_WIDTH), max_size=MAX_HIDDEN).map(tuple)
dropout = st.floats(0, 1, exclude_max=True)


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    task = draw(st.sampled_from([*TASK_KINDS, "mypkg.tasks:Task"]))
    shape = {"hidden": draw(hidden), "dropout": draw(dropout)}
    if task == "classification":
        return Recipe(task, class_weights=tuple(draw(st.lists(positive, max_size=6))), **shape)
    if task == "binary":
        bins = draw(st.integers(MIN_SCORE_BINS, MAX_SCORE_BINS))
        return Recipe(task, threshold=draw(unit_open), bins=bins, **shape)
    if task == "regression":
        loss = draw(st.sampled_from(LOSSES["regression"]))
        delta = draw(st.floats(1e-6, MAX_HUBER_DELTA)) if loss == "huber" else 1.0
        return Recipe(task, loss, huber_delta=delta, target_mean=draw(finite), target_std=draw(positive), **shape)
    # A user's own task may read any setting, and names its loss as it likes.
    return Recipe(task, draw(st.sampled_from(["", "focal"])), (2.0,), draw(unit_open), target_std=2.0, **shape)


def plan_for(recipe: Recipe) -> DataPlan:
    """A data plan whose label the recipe's task can learn."""
    if recipe.task == "regression":
        return DataPlan("arrays", (3,), None)
    if recipe.task == "binary":
        return DataPlan("arrays", (3,), ("no", "yes"))
    return DataPlan("arrays", (3,), tuple(f"c{i}" for i in range(len(recipe.class_weights) or 3)))


@st.composite
def plans(draw: st.DrawFn) -> TrainingPlan:
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    epochs = draw(st.none() | st.integers(1, MAX_LOCAL_EPOCHS))
    return TrainingPlan(
        round=draw(st.integers(1, MAX_ID)),
        batch_size=draw(st.integers(1, MAX_PLAN_SIZE)),
        num_batches=0 if epochs else draw(st.integers(0, MAX_PLAN_SIZE)),
        lr=draw(positive),
        seed=draw(st.integers(0, 2**63 - 1)),
        mu=draw(st.sampled_from([0.0, 0.01])),
        optimizer=optimizer,
        momentum=draw(st.floats(0, 1, exclude_max=True)) if optimizer == "sgd" else 0.0,
        weight_decay=draw(st.floats(0, MAX_WEIGHT_DECAY)),
        grad_clip=draw(st.none() | positive),
        local_epochs=epochs,
        keep_state=draw(st.booleans()),
    )


def confusion_of(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return confusion


@st.composite
def scored(draw: st.DrawFn) -> EvalResult:
    """An evaluation of each task, its sums computed from examples drawn here."""
    task = draw(st.sampled_from(TASK_KINDS))
    n = draw(st.integers(1, 100))
    loss = draw(st.floats(0, 100))
    if task == "regression":
        y = np.array(draw(st.lists(finite, min_size=n, max_size=n)))
        error = np.array(draw(st.lists(finite, min_size=n, max_size=n))) - y
        sums = np.array([n, error.sum(), np.abs(error).sum(), (error**2).sum(), y.sum(), (y**2).sum()])
        return EvalResult(loss, 0, n, (n,), metrics={"regression": sums})
    classes = 2 if task == "binary" else draw(st.integers(1, 6))
    labels = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    if task == "binary":
        scores = np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
        predicted = (scores > 0.5).astype(np.int64)
    else:
        predicted = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    confusion = confusion_of(labels, predicted, classes)
    metrics = {"confusion": confusion}
    if task == "binary":
        bins = draw(st.integers(MIN_SCORE_BINS, MIN_SCORE_BINS + 100))
        histogram = np.zeros((2, bins), np.int64)
        np.add.at(histogram, (labels, np.minimum((scores * bins).astype(np.int64), bins - 1)), 1)
        metrics["scores"] = histogram
        negatives, positives = confusion.sum(axis=1)
        if negatives and positives and draw(st.booleans()):
            metrics["auc"] = np.array([draw(st.floats(0, 1))])
        if positives and draw(st.booleans()):
            metrics["pr_auc"] = np.array([draw(st.floats(0, 1))])
    per_class: tuple[Any, ...] = ()
    if draw(st.booleans()):
        per_class = (tuple(confusion.sum(axis=1).tolist()), tuple(np.diagonal(confusion).tolist()))
    predictions = tuple(confusion.sum(axis=0).tolist())
    return EvalResult(loss, int(np.trace(confusion)), n, predictions, *per_class, metrics=metrics)


# Round trips -----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(recipes(), st.booleans())
def test_a_recipe_round_trips_in_fit_evaluate_and_describe(recipe: Recipe, with_data: bool) -> None:
    data = plan_for(recipe) if with_data else None
    for message in (
        Fit("mlp", WEIGHTS, PLAN, data=data, recipe=recipe),
        Evaluate("mlp", WEIGHTS, 64, data=data, recipe=recipe),
        Describe("mlp", data, recipe),
    ):
        decoded = round_trip(message)
        assert decoded == message
        assert decoded.recipe == recipe  # type: ignore[attr-defined]
    assert Recipe.from_body(recipe.to_body()) == recipe


def test_equality_includes_the_recipe() -> None:
    binary = Recipe("binary")
    assert Fit("m", WEIGHTS, PLAN, recipe=binary) != Fit("m", WEIGHTS, PLAN)
    assert Evaluate("m", WEIGHTS, 8, recipe=binary) != Evaluate("m", WEIGHTS, 8, recipe=Recipe("binary", bins=2000))
    assert Describe("m", recipe=binary) != Describe("m")
    assert Fit("m", WEIGHTS, PLAN, recipe=binary) == Fit("m", WEIGHTS, PLAN, recipe=Recipe("binary", "bce"))


def test_a_built_in_task_takes_its_default_loss() -> None:
    assert [Recipe(task).loss for task in TASK_KINDS] == ["cross_entropy", "bce", "mse"]
    assert Recipe("mypkg.tasks:Task").loss == ""
    assert Recipe("regression").to_body() == {"task": "regression", "loss": "mse"}


@settings(max_examples=200, deadline=None)
@given(plans())
def test_a_plan_with_every_optimizer_setting_round_trips(plan: TrainingPlan) -> None:
    fit = Fit("mlp", WEIGHTS, plan)
    decoded = round_trip(fit)
    assert decoded == fit
    assert isinstance(decoded, Fit) and decoded.plan == plan


@settings(max_examples=200, deadline=None)
@given(scored())
def test_an_eval_result_with_metrics_round_trips(result: EvalResult) -> None:
    decoded = round_trip(result)
    assert decoded == result
    assert isinstance(decoded, EvalResult) and decoded.metrics is not None and result.metrics is not None
    for name, array in result.metrics.items():
        assert decoded.metrics[name].dtype == array.dtype and np.array_equal(decoded.metrics[name], array)


def test_metrics_round_trip_streamed() -> None:
    confusion = np.diag(np.arange(1, 41, dtype=np.int64))
    result = EvalResult(
        0.5, int(confusion.sum()), int(confusion.sum()), tuple(range(1, 41)), metrics={"confusion": confusion}
    )
    assert streamed_round_trip(result) == result


def test_equality_includes_the_metrics() -> None:
    one = EvalResult(0.5, 1, 1, (1,), metrics={"confusion": np.ones((1, 1), np.int64)})
    assert one == EvalResult(0.5, 1, 1, (1,), metrics={"confusion": np.ones((1, 1), np.int64)})
    assert one != EvalResult(0.5, 1, 1, (1,))


# The classic messages, byte for byte --------------------------------------------

#: sha256 of each message encoded with id 11 by main before issue 17 (syncfed at 533a62e).
BEFORE = {
    "fit": "6583336b3f87d75860795337bb47927a5b2dc8da6a029667522eea800204b7f8",
    "fit with every old option": "c97809580de841acf888d0463fdc4f612ee131eb88c0084119edf81ec9883526",
    "evaluate": "a2a0567bbde4d0808dd5e8a8cff31d7339184f18c986bc6c1e6f04cd8453be82",
    "describe": "3f0946ffd5959a1e2a5414ace77e5de02a59a7e13dd159391d70eee7320191d3",
    "eval_result": "3214b138b411d7a704fbe379314f5734a1cd1b899390e3b79de472979b60411e",
}


def test_messages_without_the_new_fields_encode_as_before() -> None:
    old_plan = TrainingPlan(2, 8, 0, 0.1, 1, mu=0.01, delta=True, compress="int8", clip=1.0, noise_std=0.1, hold=True)
    messages = {
        "fit": Fit("digits-cnn", WEIGHTS, PLAN),
        "fit with every old option": Fit("mlp", WEIGHTS, old_plan, control=WEIGHTS, dataset_key="k"),
        "evaluate": Evaluate("digits-cnn", WEIGHTS, 128, split="validation"),
        "describe": Describe("digits-cnn"),
        "eval_result": EvalResult(0.25, 3, 4, (1, 3), (2, 2), (1, 2)),
    }
    assert {name: hashlib.sha256(encode(11, m)).hexdigest() for name, m in messages.items()} == BEFORE


def test_a_default_plan_has_only_the_old_fields() -> None:
    body = {"round": 3, "batch_size": 32, "num_batches": 10, "lr": 0.05, "seed": 7}
    assert PLAN.to_body() == body
    assert encode(11, Fit("m", WEIGHTS, PLAN)) == pack(
        {"v": 1, "id": 11, "kind": "fit", "body": {"model": "m", "weights": encode_weights(WEIGHTS), "plan": body}}
    )
    explicit = TrainingPlan(3, 32, 10, 0.05, 7, optimizer="sgd", momentum=0.0, weight_decay=0, keep_state=False)
    assert explicit.to_body() == body


# Validation: each rule at its limit, and one past it ------------------------------


def fit_body(**plan: object) -> dict[str, object]:
    return {
        "model": "m",
        "weights": {},
        "plan": {"round": 1, "batch_size": 8, "num_batches": 0, "lr": 0.1, "seed": 0, **plan},
    }


def plan_with(**changes: object) -> Callable[[], TrainingPlan]:
    return lambda: TrainingPlan(**{"round": 1, "batch_size": 8, "num_batches": 0, "lr": 0.1, "seed": 0, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "adamw"},
        {"momentum": 0.0},
        {"momentum": BELOW_ONE},
        {"weight_decay": MAX_WEIGHT_DECAY},
        {"weight_decay": 0},
        {"grad_clip": 5e-324},
        {"local_epochs": 1},
        {"local_epochs": MAX_LOCAL_EPOCHS},
        {"keep_state": True, "optimizer": "adam", "weight_decay": 0.01},
    ],
)
def test_plan_settings_at_their_limits_decode(changes: dict[str, object]) -> None:
    assert decode(envelope("fit", fit_body(**changes))).message == Fit("m", {}, plan_with(**changes)())


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, adamw, not 'rmsprop'"),
        ({"momentum": 1.0}, "momentum must be a number from 0 to below 1, not 1.0"),
        ({"momentum": -5e-324}, "momentum must be a number from 0 to below 1, not -5e-324"),
        ({"momentum": 0.9, "optimizer": "adam"}, "momentum goes with sgd, not adam"),
        ({"weight_decay": ABOVE_ONE}, f"weight_decay must be a number from 0 to 1.0, not {ABOVE_ONE}"),
        ({"weight_decay": -5e-324}, "weight_decay must be a number from 0 to 1.0, not -5e-324"),
        ({"grad_clip": 0.0}, "grad_clip must be a positive finite number, not 0.0"),
        ({"grad_clip": math.inf}, "grad_clip must be a positive finite number, not inf"),
        ({"local_epochs": 0}, "local_epochs must be an integer from 1 to 1000, not 0"),
        ({"local_epochs": MAX_LOCAL_EPOCHS + 1}, "local_epochs must be an integer from 1 to 1000, not 1001"),
        ({"local_epochs": 2.0}, "local_epochs must be an integer from 1 to 1000, not 2.0"),
        ({"local_epochs": 2, "num_batches": 1}, "num_batches must be 0 with local_epochs, not 1"),
        ({"keep_state": 1}, "keep_state must be true or false, not 1"),
    ],
)
def test_plan_settings_past_their_limits_are_refused(changes: dict[str, object], reason: str) -> None:
    built_and_decoded(plan_with(**changes), "fit", fit_body(**changes), reason)


def describe_body(recipe: dict[str, object], data: DataPlan | None = None) -> dict[str, object]:
    return {"model": "m", "recipe": recipe, **({"data": data.to_body()} if data is not None else {})}


@pytest.mark.parametrize(
    "recipe",
    [
        {"task": "binary", "loss": "bce", "bins": MIN_SCORE_BINS, "threshold": 5e-324},
        {"task": "binary", "loss": "bce", "bins": MAX_SCORE_BINS, "threshold": BELOW_ONE},
        {"task": "regression", "loss": "huber", "huber_delta": 0.5, "target_std": 5e-324, "target_mean": -3.5},
        {"task": "regression", "loss": "huber", "huber_delta": MAX_HUBER_DELTA},
        {"task": "classification", "loss": "cross_entropy", "hidden": [MAX_WIDTH] * MAX_HIDDEN},
        {"task": "classification", "loss": "cross_entropy", "dropout": BELOW_ONE, "class_weights": [0.5, 2]},
        {"task": "mypkg.tasks:Task", "loss": "", "threshold": 0.2, "class_weights": [1.0]},
    ],
)
def test_recipes_at_their_limits_decode(recipe: dict[str, Any]) -> None:
    decoded = decode(envelope("describe", describe_body(recipe))).message
    assert isinstance(decoded, Describe) and decoded.recipe == Recipe(**recipe)


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        ({"task": "ranking"}, "task must be one of classification, binary, regression or mypkg.tasks:Task"),
        ({"task": "binary", "loss": "mse"}, "loss of a binary task must be one of bce, not 'mse'"),
        ({"task": "binary", "bins": MIN_SCORE_BINS - 1}, "bins must be an integer from 1000 to 65536, not 999"),
        ({"task": "binary", "bins": MAX_SCORE_BINS + 1}, "bins must be an integer from 1000 to 65536, not 65537"),
        ({"task": "binary", "threshold": 1.0}, "threshold must be a number strictly between 0 and 1, not 1.0"),
        ({"task": "binary", "threshold": 0}, "threshold must be a number strictly between 0 and 1, not 0"),
        ({"task": "regression", "target_std": 0.0}, "target_std must be a positive finite number, not 0.0"),
        (
            {"task": "regression", "loss": "huber", "huber_delta": 1000.0000000000001},
            "huber_delta must be a number above 0 and at most 1000, not 1000.0000000000001",
        ),
        (
            {"task": "regression", "loss": "huber", "huber_delta": 0.0},
            "huber_delta must be a number above 0 and at most 1000, not 0.0",
        ),
        ({"hidden": [MAX_WIDTH + 1]}, "hidden must be at most 16 layer widths from 1 to 65536, not [65537]"),
        (
            {"hidden": [1] * (MAX_HIDDEN + 1)},
            "hidden must be at most 16 layer widths from 1 to 65536, not [1, 1, 1, 1, 1, 1, 1, 1, ...]",
        ),
        ({"dropout": 1.0}, "dropout must be a number from 0 to below 1, not 1.0"),
        ({"class_weights": [1.0, 0.0]}, "class_weights must be at most 100000 positive finite numbers"),
        # A built-in task refuses what only another task reads.
        ({"task": "binary", "class_weights": [1.0, 2.0]}, "class_weights go with a classification task, not binary"),
        ({"threshold": 0.3}, "threshold goes with a binary task, not classification"),
        ({"task": "regression", "bins": 2000}, "bins goes with a binary task, not regression"),
        ({"task": "binary", "target_mean": 1.0}, "target_mean goes with a regression task, not binary"),
        ({"target_std": 2.0}, "target_std goes with a regression task, not classification"),
        ({"task": "regression", "huber_delta": 2.0}, "huber_delta goes with the huber loss, not mse"),
    ],
)
def test_recipes_past_their_limits_are_refused(recipe: dict[str, Any], reason: str) -> None:
    built_and_decoded(
        lambda: Recipe(**recipe), "describe", describe_body({"task": "classification", "loss": "", **recipe}), reason
    )


TWO = DataPlan("arrays", (3,), ("no", "yes"))
THREE = DataPlan("arrays", (3,), ("a", "b", "c"))
CONTINUOUS = DataPlan("arrays", (3,), None)


@pytest.mark.parametrize(
    ("recipe", "data", "reason"),
    [
        (Recipe("regression"), THREE, "a regression task needs a continuous label, not 3 classes"),
        (Recipe("binary"), THREE, "a binary task needs 2 classes, not 3"),
        (Recipe("binary"), CONTINUOUS, "a binary task needs classes, not a continuous label"),
        (Recipe("classification"), CONTINUOUS, "a classification task needs classes, not a continuous label"),
        (Recipe(class_weights=(1.0, 2.0)), THREE, "class_weights has 2 weights for 3 classes"),
    ],
)
def test_a_recipe_must_fit_the_agreed_label(recipe: Recipe, data: DataPlan, reason: str) -> None:
    body = describe_body(recipe.to_body(), data)
    built_and_decoded(lambda: Describe("m", data, recipe), "describe", body, reason)
    with pytest.raises(LocalProtocolError, match=reason):
        Fit("m", {}, PLAN, data=data, recipe=recipe)
    with pytest.raises(LocalProtocolError, match=reason):
        Evaluate("m", {}, 8, data=data, recipe=recipe)


def test_a_recipe_that_fits_its_label_and_a_user_task_with_any_label_build() -> None:
    for recipe, data in [
        (Recipe("binary"), TWO),
        (Recipe("classification", class_weights=(1, 2, 3)), THREE),
        (Recipe("regression", "mae"), CONTINUOUS),
        (Recipe("mypkg.tasks:Task"), CONTINUOUS),
        (Recipe("mypkg.tasks:Task"), THREE),
    ]:
        assert round_trip(Fit("m", {}, PLAN, data=data, recipe=recipe)) == Fit("m", {}, PLAN, data=data, recipe=recipe)


def result_body(
    metrics: dict[str, np.ndarray],
    correct: int,
    num_examples: int,
    predictions: list[int],
    per_class: tuple[list[int], list[int]] | None = None,
) -> dict[str, object]:
    counts = {"class_counts": per_class[0], "class_correct": per_class[1]} if per_class else {}
    return {
        "loss": 0.5,
        "correct": correct,
        "num_examples": num_examples,
        "predictions": predictions,
        **counts,
        "metrics": encode_weights(metrics),
    }


def refused_result(
    metrics: dict[str, np.ndarray],
    correct: int,
    num_examples: int,
    predictions: list[int],
    reason: str,
    per_class: tuple[list[int], list[int]] | None = None,
) -> None:
    counts = per_class or (None, None)
    built_and_decoded(
        lambda: EvalResult(0.5, correct, num_examples, tuple(predictions), *counts, metrics=metrics),  # type: ignore[arg-type]
        "eval_result",
        result_body(metrics, correct, num_examples, predictions, per_class),
        reason,
    )


def accepted_result(
    metrics: dict[str, np.ndarray], correct: int, num_examples: int, predictions: list[int]
) -> EvalResult:
    decoded = decode(envelope("eval_result", result_body(metrics, correct, num_examples, predictions))).message
    assert decoded == EvalResult(0.5, correct, num_examples, tuple(predictions), metrics=metrics)
    assert isinstance(decoded, EvalResult)
    return decoded


I64 = np.int64
#: A binary site of 3 negatives and 2 positives: 2 true negatives, 1 true positive.
BINARY = np.array([[2, 1], [1, 1]], I64)


def scores(bins: int = MIN_SCORE_BINS, negatives: int = 3, positives: int = 2) -> np.ndarray:
    histogram = np.zeros((2, bins), I64)
    histogram[:, -1] = negatives, positives
    return histogram


NAMES = (
    "confusion (classification); confusion, scores and optionally auc, pr_auc (binary); regression (regression);"
    " user.<name> (a user task)"
)


def test_metric_names_must_be_one_tasks() -> None:
    for metrics, shown in [
        ({}, "[]"),
        ({"roc": np.zeros(1)}, "['roc']"),
        ({"confusion": BINARY, "auc": np.array([0.5])}, "['auc', 'confusion']"),
        ({"scores": scores()}, "['scores']"),
        ({"confusion": BINARY, "regression": np.zeros(6)}, "['confusion', 'regression']"),
    ]:
        refused_result(metrics, 3, 5, [3, 2], f"metrics {shown} are not a task's: {NAMES}")


def test_a_user_tasks_own_sums_at_their_limits_are_accepted_alone_or_beside_built_in_ones() -> None:
    own = {f"user.s{i}": np.zeros(1, I64) for i in range(MAX_USER_SUMS - 2)}
    own["user.a" + "b" * 31] = np.full(MAX_USER_SUM_SIZE, -1.5e300)
    own["user.counts"] = np.array([-MAX_USER_INT, MAX_USER_INT], I64).reshape(2, 1)
    result = accepted_result(own, 0, 5, [5])  # what it predicts is the task's affair
    assert result.metrics is not None and set(result.metrics) == set(own)
    accepted_result({**own, "confusion": BINARY}, 3, 5, [3, 2])


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        (
            {f"user.s{i}": np.zeros(1, I64) for i in range(MAX_USER_SUMS + 1)},
            f"{MAX_USER_SUMS + 1} user sums exceed limit of {MAX_USER_SUMS}",
        ),
        ({"user.Brier": np.zeros(1)}, "user sum name 'user.Brier' must look like user.name_2"),
        ({"user.": np.zeros(1)}, "user sum name 'user.' must look like user.name_2"),
        ({"user.a" + "b" * 32: np.zeros(1)}, f"user sum name 'user.a{'b' * 32}' must look like user.name_2"),
        ({"user.x": np.zeros(1, np.float32)}, "user sum user.x must be int64 or float64, not float32"),
        ({"user.x": np.zeros(1, np.int32)}, "user sum user.x must be int64 or float64, not int32"),
        (
            {"user.x": np.zeros(MAX_USER_SUM_SIZE + 1)},
            f"user sum user.x of {MAX_USER_SUM_SIZE + 1} elements exceeds limit of {MAX_USER_SUM_SIZE} elements",
        ),
        ({"user.x": np.array([1.0, math.inf])}, "user sum user.x must be finite"),
        ({"user.x": np.array([math.nan])}, "user sum user.x must be finite"),
        ({"user.x": np.array([MAX_USER_INT + 1], I64)}, "user sum user.x must lie within +-2**42"),
        ({"user.x": np.array([np.iinfo(I64).min], I64)}, "user sum user.x must lie within +-2**42"),
        # Built-in sums beside a user task's own are checked as ever.
        ({"user.x": np.zeros(1), "confusion": BINARY}, "confusion's diagonal must sum to correct"),
        ({"user.x": np.zeros(1), "scores": scores()}, f"metrics ['scores'] are not a task's: {NAMES}"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_user_tasks_own_sums_past_their_limits_are_refused(metrics: dict[str, np.ndarray], reason: str) -> None:
    refused_result(metrics, 2, 5, [3, 2], reason)


def test_metric_dtypes_are_fixed() -> None:
    refused_result({"confusion": BINARY.astype(np.int32)}, 3, 5, [3, 2], "metric confusion must be int64, not int32")
    refused_result(
        {"confusion": BINARY, "scores": scores(), "auc": np.array([0.5], np.float32)},
        3,
        5,
        [3, 2],
        "metric auc must be float64, not float32",
    )


def test_a_confusion_matrix_at_and_past_its_class_limit() -> None:
    classes = MAX_CONFUSION_CLASSES
    confusion = np.eye(classes, dtype=I64)
    result = accepted_result({"confusion": confusion}, classes, classes, [1] * classes)
    assert result.metrics is not None and result.metrics["confusion"].shape == (classes, classes)
    reason = "a confusion matrix of 1025 classes exceeds limit of 1024 classes"
    refused_result({"confusion": np.eye(2, dtype=I64)}, 2, 2, [1, 1] + [0] * (classes - 1), reason)


def test_confusion_must_agree_with_the_counts() -> None:
    bad_shape = "confusion must have shape (2, 2), a row and a column per class, not (2, 3)"
    refused_result({"confusion": np.zeros((2, 3), I64)}, 0, 5, [3, 2], bad_shape)
    counts = f"confusion must hold counts from 0 to {MAX_SHARD}"
    refused_result({"confusion": np.array([[4, -1], [1, 1]], I64)}, 3, 5, [3, 2], counts)
    past = np.array([[MAX_SHARD + 1, 0], [0, 0]], I64)
    refused_result({"confusion": past}, MAX_SHARD + 1, MAX_SHARD + 1, [MAX_SHARD + 1, 0], counts)
    at = np.array([[MAX_SHARD, 0], [0, 0]], I64)
    accepted_result({"confusion": at}, MAX_SHARD, MAX_SHARD, [MAX_SHARD, 0])
    columns = "confusion's columns must sum to predictions"
    refused_result({"confusion": BINARY}, 3, 5, [2, 3], columns)
    refused_result({"confusion": BINARY}, 2, 5, [3, 2], "confusion's diagonal must sum to correct")
    rows = "confusion's rows must sum to class_counts"
    refused_result({"confusion": BINARY}, 3, 5, [3, 2], rows, ([2, 3], [1, 2]))
    diagonal = "confusion's diagonal must be class_correct"
    refused_result({"confusion": BINARY}, 3, 5, [3, 2], diagonal, ([3, 2], [1, 2]))


def test_score_histograms_at_and_past_their_limits() -> None:
    for bins in (MIN_SCORE_BINS, MAX_SCORE_BINS):
        accepted_result({"confusion": BINARY, "scores": scores(bins)}, 3, 5, [3, 2])
    for bins in (MIN_SCORE_BINS - 1, MAX_SCORE_BINS + 1):
        reason = f"scores must have shape (2, bins) with bins from 1000 to 65536, not (2, {bins})"
        refused_result({"confusion": BINARY, "scores": scores(bins)}, 3, 5, [3, 2], reason)
    reason = "scores must have shape (2, bins) with bins from 1000 to 65536, not (3, 1000)"
    refused_result({"confusion": BINARY, "scores": np.zeros((3, 1000), I64)}, 3, 5, [3, 2], reason)
    rows = "scores' rows must sum to confusion's rows"
    refused_result({"confusion": BINARY, "scores": scores(negatives=2, positives=3)}, 3, 5, [3, 2], rows)
    three = np.eye(3, dtype=I64)
    reason = "a binary result has 2 classes, not 3"
    refused_result({"confusion": three, "scores": scores(1000, 1, 1)}, 3, 3, [1, 1, 1], reason)


def test_site_aucs_at_and_past_their_limits() -> None:
    base = {"confusion": BINARY, "scores": scores()}
    accepted_result({**base, "auc": np.array([0.0]), "pr_auc": np.array([1.0])}, 3, 5, [3, 2])
    for value, shown in [(ABOVE_ONE, f"[{ABOVE_ONE}]"), (-5e-324, "[-5e-324]"), (math.nan, "[nan]")]:
        refused_result(
            {**base, "auc": np.array([value])}, 3, 5, [3, 2], f"auc must be one number from 0 to 1, not {shown}"
        )
    reason = "pr_auc must be one number from 0 to 1, not [0.5, 0.5]"
    refused_result({**base, "pr_auc": np.array([0.5, 0.5])}, 3, 5, [3, 2], reason)
    negatives_only = {"confusion": np.array([[3, 2], [0, 0]], I64), "scores": scores(1000, 5, 0)}
    refused_result({**negatives_only, "auc": np.array([0.5])}, 3, 5, [3, 2], "auc needs examples of both classes")
    refused_result({**negatives_only, "pr_auc": np.array([0.5])}, 3, 5, [3, 2], "pr_auc needs a positive example")
    accepted_result(negatives_only, 3, 5, [3, 2])  # a single-class site still sends its histograms


def regression(**changes: float) -> np.ndarray:
    sums = dict(zip(REGRESSION_SUMS, [4.0, -1.5, 2.5, 3.25, 10.0, 30.0], strict=True))
    return np.array(list({**sums, **changes}.values()))


def test_regression_sums_must_agree_with_the_result() -> None:
    accepted_result({"regression": regression()}, 0, 4, [4])
    accepted_result({"regression": regression(abs_error=0.0, squared_error=0.0, y_squared=0.0)}, 0, 4, [4])
    reason = "regression must have shape (6,): n, error, abs_error, squared_error, y, y_squared; not (5,)"
    refused_result({"regression": regression()[:5]}, 0, 4, [4], reason)
    refused_result({"regression": regression(n=3.0)}, 0, 4, [4], "regression n of 3.0 differs from num_examples 4")
    refused_result({"regression": regression(y=math.inf)}, 0, 4, [4], "regression sums must be finite")
    negative = "regression sums of absolute errors, squared errors and squared targets must be non-negative"
    for name in ("abs_error", "squared_error", "y_squared"):
        refused_result({"regression": regression(**{name: -5e-324})}, 0, 4, [4], negative)
    shape = "a regression result has correct 0 and predictions [num_examples]"
    refused_result({"regression": regression()}, 1, 4, [4], shape)
    refused_result({"regression": regression()}, 0, 4, [3, 1], shape)


def test_peer_metrics_must_be_exact_tensors() -> None:
    body = result_body({"regression": regression()}, 0, 4, [4])
    body["metrics"] = {"regression": encode_tensor(regression(), compression="fp16")}
    with pytest.raises(RemoteProtocolError) as raised:
        decode(envelope("eval_result", body, 42))
    reason = "metrics must be a map of tensors without an encoding: they are exact sums"
    assert (str(raised.value), raised.value.code) == (reason, "malformed")
    limit = len(METRICS) + MAX_USER_SUMS  # the built-in sums and a user task's own
    body["metrics"] = {f"user.s{i}": encode_tensor(np.zeros(1)) for i in range(limit + 1)}
    with pytest.raises(RemoteProtocolError) as raised:
        decode(envelope("eval_result", body, 42))
    reason = f"weights with {limit + 1} tensors exceed limit of {limit} tensors"
    assert (str(raised.value), raised.value.code) == (reason, "bad_tensor")
