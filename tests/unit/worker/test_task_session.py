"""A worker's side of tasks through a LinkPair (a real worker in this event loop): refusals, sizing, step counts.

The end-to-end tests over worker processes and CSV tables are
tests/e2e/test_task_worker.py; here are the cases around them: recipes that
do not fit a bundled data set, one that does not fit a plan (refused when
read), SCAFFOLD with Adam, models sized by the recipe, a user model that
takes the schema, and local epochs counted in SCAFFOLD's K and DP-SGD's
accountant.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from linkpair import TINY, LinkPair, digits_weights
from peer_bodies import envelope

from syncfed.config import WorkerConfig
from syncfed.data.arrays import ArraySource
from syncfed.exceptions import RemoteError
from syncfed.models import get_weights
from syncfed.protocol import (
    DataPlan,
    Describe,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Hello,
    Message,
    ModelLayout,
    Recipe,
    TrainingPlan,
)
from syncfed.shaped_models import TabularMLP
from syncfed.training import ExampleAccountant
from syncfed.worker import SourceHolding, hold_source

T = TypeVar("T")

TEST_TIMEOUT = 60.0
FIT = TrainingPlan(round=1, batch_size=16, num_batches=2, lr=0.05, seed=3)
PLAN = DataPlan("arrays", (2,), ("a", "b", "z"))
CONTINUOUS = DataPlan("arrays", (2,), None)


def holding() -> SourceHolding:
    """40 examples of classes a and b; the plan's third class z is another site's."""
    x = np.arange(80, dtype=np.float32).reshape(40, 2)
    return hold_source(WorkerConfig("linked"), ArraySource(x, np.array(["a"] * 10 + ["b"] * 30)))


def continuous(x: np.ndarray, y: np.ndarray) -> SourceHolding:
    """Every example of a table with a continuous label ``y``."""
    return hold_source(WorkerConfig("linked", val_fraction=0), ArraySource(x, y))


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


async def answer(pair: LinkPair, request: Message) -> Message | tuple[str, str]:
    """The worker's reply to ``request``, or its refusal as (code, reason)."""
    await pair.client.request(Hello())
    try:
        return await pair.client.request(request)
    except RemoteError as exc:
        return exc.code, exc.reason


def test_recipes_a_bundled_data_set_cannot_serve_are_refused_with_one_line() -> None:
    plain, adam = FIT, TrainingPlan(round=1, batch_size=16, num_batches=2, lr=0.01, seed=3, optimizer="adam")
    zeros = {name: np.zeros_like(array) for name, array in digits_weights().items()}
    requests = [
        Fit("digits-cnn", digits_weights(), plain, recipe=Recipe("binary")),
        Evaluate("digits-cnn", digits_weights(), 16, recipe=Recipe("regression")),
        Fit("digits-cnn", digits_weights(), plain, recipe=Recipe("classification", class_weights=(1.0, 2.0))),
        Fit("digits-cnn", digits_weights(), plain, recipe=Recipe("mine.tasks:Task")),
        Fit("digits-cnn", digits_weights(), adam, control=zeros),
    ]

    async def scenario() -> list[Message | tuple[str, str]]:
        async with LinkPair() as pair:
            return [await answer(pair, request) for request in requests]

    assert run(scenario()) == [
        ("incompatible", "a binary task needs 2 classes, not 10"),
        ("incompatible", "a regression task needs a continuous label, not 10 classes"),
        ("incompatible", "class_weights has 2 weights for 10 classes"),
        ("incompatible", "task mine.tasks:Task is not one this worker was started with (--task)"),
        ("incompatible", "scaffold learns its control variates from sgd steps, not adam: use sgd"),
    ]


def test_a_recipe_sends_the_metric_sums_and_no_recipe_the_classic_reply() -> None:
    async def scenario() -> list[Message | tuple[str, str]]:
        async with LinkPair() as pair:
            return [
                await answer(pair, Evaluate("digits-cnn", digits_weights(), 16, recipe=Recipe())),
                await answer(pair, Evaluate("digits-cnn", digits_weights(), 16)),
            ]

    with_recipe, classic = run(scenario())
    assert isinstance(with_recipe, EvalResult) and isinstance(classic, EvalResult)
    assert classic.metrics is None and classic.class_counts is None
    assert with_recipe.metrics is not None and with_recipe.metrics["confusion"].shape == (10, 10)
    assert int(np.trace(with_recipe.metrics["confusion"])) == classic.correct
    assert with_recipe.metrics["confusion"].sum(axis=0).tolist() == list(classic.predictions)
    assert (with_recipe.loss, with_recipe.correct) == (classic.loss, classic.correct)


def test_a_recipe_that_does_not_fit_the_plan_is_refused_when_read() -> None:
    body = {"model": "mlp", "weights": {}, "batch_size": 16, "data": PLAN.to_body()}

    async def scenario() -> list[str]:
        async with LinkPair([holding()]) as pair, pair.raw() as peer:
            await peer.hello()
            reasons = []
            for request_id, recipe in enumerate((Recipe("binary"), Recipe("regression")), start=2):
                await peer.send(envelope("evaluate", {**body, "recipe": recipe.to_body()}, request_id))
                reasons.append(await peer.expect_error(request_id, "malformed"))
            return reasons

    assert run(scenario()) == [
        "a binary task needs 2 classes, not 3",
        "a regression task needs a continuous label, not 3 classes",
    ]


def layout(reply: Message | tuple[str, str]) -> dict[str, tuple[int, ...]]:
    assert isinstance(reply, ModelLayout), reply
    return {name: shape for name, _, shape in reply.tensors}


def test_describe_sizes_a_model_from_the_plan_and_the_recipe() -> None:
    two = DataPlan("arrays", (2,), ("a", "b"))

    async def scenario() -> list[Message | tuple[str, str]]:
        async with LinkPair([holding()]) as pair:
            return [
                await answer(pair, Describe("mlp", PLAN)),
                await answer(pair, Describe("mlp", PLAN, Recipe(hidden=(5,)))),
                await answer(pair, Describe("mlp", two, Recipe("binary", hidden=(7,)))),
                await answer(pair, Describe("linear", two, Recipe("binary", hidden=(7,)))),
            ]

    default, hidden, binary, linear = run(scenario())
    assert layout(default)["head.6.weight"] == (3, 32)
    assert layout(hidden) == {
        "head.0.weight": (5, 2),
        "head.0.bias": (5,),
        "head.3.weight": (3, 5),
        "head.3.bias": (3,),
    }
    assert layout(binary)["head.3.weight"] == (1, 7)
    assert linear == (
        "incompatible",
        "model 'linear' does not suit the data plan: cannot build the model:"
        " linear has no hidden layers to size, not (7,)",
    )


def test_a_user_model_that_takes_the_schema_is_sized_from_the_plan_and_recipe() -> None:
    regression = continuous(np.arange(40, dtype=np.float32).reshape(20, 2), np.linspace(0.5, 9.5, 20))
    model = "user_models:SchemaNet"

    async def scenario() -> list[Message | tuple[str, str]]:
        async with LinkPair([holding()], models=(model,)) as classes, LinkPair([regression], models=(model,)) as y:
            return [
                await answer(classes, Describe(model, PLAN)),
                await answer(y, Describe(model, CONTINUOUS, Recipe("regression"))),
                await answer(classes, Describe(model)),
            ]

    three, one, unplanned = run(scenario())
    assert layout(three) == {"fc.weight": (3, 2), "fc.bias": (3,)}
    assert layout(one) == {"fc.weight": (1, 2), "fc.bias": (1,)}
    assert unplanned[0] == "incompatible"


def scaffold_fit(**settings: Any) -> tuple[dict[str, np.ndarray], FitResult]:
    """A SCAFFOLD fit of two local epochs on the tiny digits, from fresh weights and a zero server variate."""
    start = digits_weights()
    control = {name: np.zeros_like(array) for name, array in start.items()}
    plan = TrainingPlan(round=1, batch_size=16, num_batches=0, lr=0.05, seed=3, local_epochs=2)

    async def scenario() -> Message | tuple[str, str]:
        async with LinkPair(**settings) as pair:
            return await answer(pair, Fit("digits-cnn", start, plan, control=control))

    reply = run(scenario())
    assert isinstance(reply, FitResult), reply
    return start, reply


def test_local_epochs_count_their_batches_in_scaffolds_k() -> None:
    start, reply = scaffold_fit()
    steps = 2 * math.ceil(TINY / 16)
    assert reply.control_delta is not None
    for name, delta in reply.control_delta.items():
        expected = (start[name] - reply.weights[name]) / (steps * 0.05)
        np.testing.assert_allclose(delta, expected.astype(delta.dtype), rtol=1e-6, atol=1e-9)
    assert any(np.any(delta) for delta in reply.control_delta.values())


def test_local_epochs_count_their_batches_in_the_dp_sgd_accountant() -> None:
    pytest.importorskip("opacus")
    _, reply = scaffold_fit(dp_sgd_noise_multiplier=1.0)
    accountant = ExampleAccountant(1.0, 1e-5)
    accountant.step(16 / TINY, 2 * math.ceil(TINY / 16))
    assert reply.dp_epsilon == pytest.approx(accountant.epsilon())


def test_regression_trains_and_evaluates_over_a_continuous_label() -> None:
    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    recipe = Recipe("regression", target_mean=0.25, target_std=2.0)
    start = get_weights(TabularMLP((2,), 1))

    async def scenario() -> list[Message | tuple[str, str]]:
        async with LinkPair([continuous(x, x[:, 0] * 2.0 + 0.25)]) as pair:
            fitted = await answer(pair, Fit("mlp", start, FIT, data=CONTINUOUS, recipe=recipe))
            return [fitted, await answer(pair, Evaluate("mlp", start, 16, data=CONTINUOUS, recipe=recipe))]

    fitted, scored = run(scenario())
    assert isinstance(fitted, FitResult) and fitted.num_examples == 40
    assert isinstance(scored, EvalResult) and scored.metrics is not None
    assert scored.metrics["regression"][0] == 40 and scored.predictions == (40,) and scored.correct == 0
