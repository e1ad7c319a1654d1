"""Federated normalisation's queries wait ``statistics_timeout``, not the evaluation replies' ``request_timeout``.

Each statistics query reads a site's whole data (an image folder once per
channel, twice under secure aggregation), so it has a timeout of its own.
Real workers in this event loop answer; a link that records each request's
timeout shows which one every plain and secure request went under.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
import pytest
from linkpair import LinkPair
from units import MS

from syncfed.config import CoordinatorConfig, WorkerConfig
from syncfed.coordinator.data_statistics import agree_statistics
from syncfed.data.arrays import ArraySource
from syncfed.net.link import WorkerLink
from syncfed.protocol import DataPlan, Hello, Info, Message
from syncfed.worker import hold_source

TEST_TIMEOUT = 60_000 * MS
STATISTICS_TIMEOUT = 1234.0
PLAN = DataPlan("arrays", (2,), ("a", "b"))


class Recorded:
    """A worker link that records the timeout of every request it sends."""

    def __init__(self, link: WorkerLink) -> None:
        self.link = link
        self.timeouts: list[float | None] = []

    @property
    def name(self) -> str:
        return self.link.name

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        self.timeouts.append(timeout)
        return await self.link.request(message, timeout=timeout)


def site(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(3.0, 2.0, (40, 2)).astype(np.float32), np.resize(np.array(["a", "b"]), 40)


def agreed(secure_agg: bool) -> tuple[DataPlan, list[Recorded], np.ndarray]:
    """The plan three sites agree on, their recorded links, and their pooled inputs."""
    sites = [site(seed) for seed in range(3)]

    async def scenario() -> tuple[DataPlan, list[Recorded]]:
        async with AsyncExitStack() as stack:
            links, infos = {}, {}
            for index, (x, y) in enumerate(sites):
                name = f"site{index}"
                holding = hold_source(WorkerConfig(name, val_fraction=0), ArraySource(x, y))
                pair = await stack.enter_async_context(LinkPair([holding], worker_id=name))
                info = await pair.client.request(Hello())
                assert isinstance(info, Info)
                links[name], infos[name] = Recorded(pair.client), info
            config = CoordinatorConfig(
                workers={name: "ws://unused" for name in links},
                secure_agg=secure_agg,
                request_timeout=1.0,
                statistics_timeout=STATISTICS_TIMEOUT,
            )
            trainers: Any = links  # Recorded stands in for WorkerLink
            async with asyncio.timeout(TEST_TIMEOUT):
                plan = await agree_statistics(config, PLAN, trainers, infos, report=lambda line: None)
            return plan, list(links.values())

    plan, recorded = asyncio.run(scenario())
    return plan, recorded, np.concatenate([x for x, _ in sites])


@pytest.mark.parametrize("secure_agg", [False, True], ids=["plain", "secure"])
def test_statistics_queries_wait_the_statistics_timeout(secure_agg: bool) -> None:
    plan, recorded, pooled = agreed(secure_agg)
    for link in recorded:
        assert link.timeouts and set(link.timeouts) == {STATISTICS_TIMEOUT}
    np.testing.assert_allclose(plan.mean, pooled.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(plan.std, pooled.std(axis=0), rtol=1e-4)
