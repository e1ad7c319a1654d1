"""Requests over a worker's own data through a LinkPair (a real worker in this event loop): the data plan decides.

The end-to-end tests over a worker process are tests/e2e/test_own_data_worker.py;
here are the cases around them: queries, the validation split, a bundled
data set's worker that gets a plan, and what hello lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from linkpair import MS, LinkPair, digits_weights

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
    Hello,
    Info,
    Message,
    Query,
    QueryResult,
    TrainingPlan,
)
from syncfed.shaped_models import TabularMLP
from syncfed.worker import SourceHolding, hold_source

T = TypeVar("T")

TEST_TIMEOUT = 60_000 * MS
PLAN = DataPlan("arrays", (2,), ("a", "b", "z"))
FIT = TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.05, seed=3)
NO_PLAN = "this worker holds its own data (arrays): requests need the federation's data plan; see docs/data.md"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


def holding(**settings: Any) -> SourceHolding:
    """40 examples of classes a (10) and b (30); the plan's third class z is another site's."""
    x = np.arange(80, dtype=np.float32).reshape(40, 2)
    y = np.array(["a"] * 10 + ["b"] * 30)
    return hold_source(WorkerConfig("linked", **settings), ArraySource(x, y))


def weights(plan: DataPlan = PLAN) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return get_weights(TabularMLP(plan.input_shape, plan.num_classes))


async def ask(pair: LinkPair, request: Message) -> Message:
    await pair.client.request(Hello())
    return await pair.client.request(request)


async def refusal(pair: LinkPair, request: Message) -> tuple[str, str]:
    with pytest.raises(RemoteError) as error:
        await ask(pair, request)
    return error.value.code, error.value.reason


def test_queries_over_own_data_need_the_plan_and_count_its_classes() -> None:
    async def scenario() -> tuple[Message, tuple[str, str], tuple[str, str]]:
        async with LinkPair([holding(val_fraction=0)]) as pair:
            answered = await ask(pair, Query("label-histogram", data=PLAN))
            return answered, await refusal(pair, Query("label-histogram")), await refusal(pair, Describe("mlp"))

    answered, unplanned, undescribed = run(scenario())
    assert isinstance(answered, QueryResult) and answered.tensors["labels"].tolist() == [10, 30, 0]
    assert unplanned == undescribed == ("incompatible", NO_PLAN)


def test_the_validation_split_is_scored_as_the_plan_says() -> None:
    async def scenario() -> Message:
        async with LinkPair([holding(val_fraction=0.25)]) as pair:
            return await ask(pair, Evaluate("mlp", weights(), 16, split="validation", data=PLAN))

    scored = run(scenario())
    assert isinstance(scored, EvalResult) and scored.num_examples == 10
    assert scored.class_counts is not None and len(scored.class_counts) == 3 and scored.class_counts[2] == 0


def test_a_continuous_plan_over_class_labels_is_refused_for_training() -> None:
    """Regression trains now (tests/e2e/test_task_worker.py); a plan whose label this site's data lacks does not."""
    continuous = DataPlan("arrays", (2,), None)

    async def scenario() -> tuple[str, str]:
        async with LinkPair([holding()]) as pair:
            return await refusal(pair, Fit("mlp", weights(continuous), FIT, data=continuous))

    assert run(scenario()) == ("incompatible", "arrays: this site's label has classes, the plan's is continuous")


def test_a_bundled_data_sets_worker_refuses_a_plan_and_answers_as_before() -> None:
    bundled = "this worker holds digits, not own data: requests carry no data plan"

    async def scenario() -> tuple[Info, list[tuple[str, str]], Message]:
        async with LinkPair() as pair:
            info = await pair.client.request(Hello())
            assert isinstance(info, Info)
            refused = [
                await refusal(pair, Fit("digits-cnn", digits_weights(), FIT, data=PLAN)),
                await refusal(pair, Evaluate("digits-cnn", digits_weights(), 16, data=PLAN)),
                await refusal(pair, Query("label-histogram", data=PLAN)),
                await refusal(pair, Describe("digits-cnn", PLAN)),
            ]
            return info, refused, await ask(pair, Evaluate("digits-cnn", digits_weights(), 16))

    info, refused, scored = run(scenario())
    assert info.models == ("mnist-cnn", "digits-cnn") and info.schema is None
    assert refused == [("incompatible", bundled)] * 4
    assert isinstance(scored, EvalResult) and scored.class_counts is None and "class_counts" not in scored.to_body()
