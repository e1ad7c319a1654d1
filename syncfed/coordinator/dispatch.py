"""Training requests: the plan each worker trains by, and receiving its update under the round's limits.

With receive slots (flow control), a worker holds its finished update until
the coordinator has room for it, so at most K updates are in memory at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from ..absorption import FragmentRoute
from ..config import CoordinatorConfig
from ..failure import Failure
from ..fold import StreamingFold
from ..net.link import WorkerLink
from ..protocol import Fetch, Fit, FitHeld, FitResult, TrainingPlan
from ..strategies import WorkerNeeds
from ..tensors import Weights
from .pool import Pool

__all__ = ["Dispatch", "as_received", "plan_seed"]

_T = TypeVar("_T")


def plan_seed(seed: int, round_number: int, worker_index: int) -> int:
    """An independent, reproducible seed per run, round and worker."""
    state = np.random.SeedSequence([seed, round_number, worker_index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def as_received(reply: FitResult) -> FitResult:
    """Take a reply as it is (asynchronous mode buffers updates rather than folding them as they come)."""
    return reply


class Dispatch:
    """Builds the fit requests of a run and sends them, each under the round timeout."""

    def __init__(self, config: CoordinatorConfig, pool: Pool) -> None:
        self.config = config
        self.pool = pool
        # Flow control: updates received at once, so the peak holds a few updates however many workers finish.
        self._slots = asyncio.Semaphore(config.receive_slots) if config.receive_slots else None
        self._folding = asyncio.Lock()  # one fold at a time, in arrival order (asyncio.Lock is fair)

    def fit(self, version: int, seed: int, lr: float, weights: Weights, needs: WorkerNeeds, *, delta: bool) -> Fit:
        """The request that trains one worker from ``weights``, with what the strategy ``needs``."""
        config = self.config
        plan = TrainingPlan(
            round=version,
            batch_size=config.batch_size,
            num_batches=config.federate_after_n_batches if config.local_epochs is None else 0,
            lr=lr,
            seed=seed,
            mu=needs.mu,
            delta=delta or config.compress != "none",
            compress=config.compress,
            optimizer=config.optimizer,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            grad_clip=config.grad_clip,
            local_epochs=config.local_epochs,
            keep_state=config.keep_optimizer_state,
        )
        pool = self.pool
        return Fit(pool.model_name, weights, plan, needs.control, config.dataset_key, pool.plan, pool.recipe)

    @staticmethod
    def in_round(fit: Fit, link: WorkerLink, sites: int) -> Fit:
        """``fit`` declaring the job's terms with the ``sites`` its synchronous round trains, so that each site
        checks its ``min_other_sites`` and its share of distributed noise against the round, not the whole job."""
        if link.terms is None:
            return fit
        return dataclasses.replace(fit, terms=dataclasses.replace(link.terms, sites=sites))

    async def train(
        self, link: WorkerLink, fit: Fit, take: Callable[[FitResult], _T], route: FragmentRoute | None = None
    ) -> _T:
        """``take`` of ``link``'s reply to ``fit``: with receive slots, held at the worker until one is free.

        The slot is taken only for the transfer and ``take`` (the fold), never
        while the worker trains, so at most K updates are in memory at once;
        a worker waiting for a slot keeps answering pings and is not taken for
        frozen. Training and the transfer each have the round timeout.
        ``route``: where the reply may be folded as its fragments arrive; it is
        closed when the request is over, so nothing of a late reply comes after.
        """
        timeout = self.config.round_timeout
        try:
            if self._slots is None:
                reply = await link.request(fit, timeout=timeout, route=route)
                assert isinstance(reply, FitResult)  # request() checked the reply's kind
                return await self._fold(take, reply)
            held = await link.request(
                dataclasses.replace(fit, plan=dataclasses.replace(fit.plan, hold=True)), timeout=timeout
            )
            assert isinstance(held, FitHeld)
            async with self._slots:
                reply = await link.request(Fetch(held.token), timeout=timeout, route=route)
                assert isinstance(reply, FitResult)
                return await self._fold(take, reply)
        finally:
            if route is not None:
                route.close()

    async def _fold(self, take: Callable[[FitResult], _T], reply: FitResult) -> _T:
        """``take(reply)`` in a thread, one at a time: numpy releases the GIL, so the event loop keeps
        reading the other workers' replies (and answering pings) on the second core meanwhile."""
        async with self._folding:
            work = asyncio.ensure_future(asyncio.to_thread(take, reply))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])  # a thread cannot be stopped: the next fold waits for this one
                raise

    async def collect_updates(
        self,
        round_number: int,
        weights: Weights,
        needs: WorkerNeeds,
        trainers: Sequence[WorkerLink],
        selected: Sequence[WorkerLink],
        fold: StreamingFold,
    ) -> dict[str, Failure]:
        """Send the round's plans to the selected workers at once; fold each update in as it arrives.

        Returns why each selected worker that did not contribute failed.
        """
        lr = self.config.learning_rate(round_number)
        index = {link.name: position for position, link in enumerate(trainers)}
        pending = {
            asyncio.ensure_future(
                self.train(
                    link,
                    self.in_round(
                        self.fit(
                            round_number,
                            plan_seed(self.config.seed, round_number, index[link.name]),
                            lr,
                            weights,
                            needs,
                            delta=False,
                        ),
                        link,
                        len(selected),
                    ),
                    functools.partial(fold.add, link.name),
                    fold.route(link.name),
                )
            ): link
            for link in selected
        }
        failures: dict[str, Failure] = {}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    link = pending.pop(task)
                    error = task.exception()
                    if error is not None:
                        failures[link.name] = await self.pool.failure(link, error)
                        continue
                    verdict = task.result()  # the fold's verdict on the update
                    if verdict is not None:
                        failures[link.name] = verdict
        finally:
            for task in pending:
                task.cancel()
        return failures
