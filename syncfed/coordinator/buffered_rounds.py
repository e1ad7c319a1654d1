"""Asynchronous training (``--mode async``, FedBuff, Nguyen et al. 2022): workers never wait for each other.

Every worker trains in a loop of its own: each time one returns an update it
gets the newest global model at once, and the coordinator applies the
updates in buffers of ``buffer_size``, discounted by their staleness; each
applied buffer is a new global version. A slow site only contributes
staler updates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import CoordinatorConfig
from ..exceptions import ProtocolError, QuorumNotMet, RemoteError, WorkerTimeout, WorkerUnavailable
from ..failure import Failure
from ..finite import finite_model
from ..fold import invalid_update
from ..net.link import WorkerLink
from ..protocol import FitResult
from ..staleness import UpdateBuffer, staleness_weight
from ..strategies import MeanStrategy
from ..tensors import Weights
from .context import RunContext
from .dispatch import as_received, plan_seed
from .journal import round_event
from .pool import traffic
from .results import RoundRecord, RunResult

__all__ = ["BufferedRounds", "async_settings_line"]

logger = logging.getLogger("syncfed.coordinator")


def async_settings_line(config: CoordinatorConfig) -> str:
    """The start line of an asynchronous run: what makes a version, and how stale updates count."""
    s, a, b = "its staleness s", f"{config.staleness_a:g}", config.staleness_b
    discount = {
        "constant": f"each counted in full whatever {s}",
        "polynomial": f"each weighted (1+s)^-{a} by {s}",
        "hinge": f"each weighted 1 up to staleness {b}, then 1/({a}(s-{b})+1) by {s}",
    }[config.staleness_weight]
    limit = "" if config.max_staleness is None else f"; updates staler than {config.max_staleness} are discarded"
    size = "each update makes" if config.buffer_size == 1 else f"every {config.buffer_size} updates make"
    return (
        f"Asynchronous mode (FedBuff): {len(config.workers)} workers train without waiting for each other,"
        f" each from the newest global version; {size} the next version, {discount}"
        f" (the versions published since it started){limit}"
    )


@dataclass
class GlobalVersion:
    """The newest global version, shared by the workers' training loops."""

    version: int
    weights: Weights


class BufferedRounds:
    """Versions from buffers of asynchronous updates, each one recorded like a synchronous round."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        streamed = context.strategy.streamed()
        # The config refuses --mode async for a strategy that needs every update at once.
        assert streamed is not None, "--mode async needs a mean-based strategy"
        self.strategy: MeanStrategy = streamed

    async def run(self, start: int, result: RunResult, groups: Mapping[str, Sequence[int]]) -> None:
        """Versions ``start`` to ``training_rounds``, each from a buffer of updates (FedBuff).

        Every worker loops on its own (:meth:`_train_continuously`) and hands
        its updates to a queue; this loop folds them into the buffer, discounted
        by staleness (the versions published since the worker's base model),
        and publishes a version whenever the buffer is full.
        """
        context, config = self.context, self.context.config
        trainers, evaluator = context.pool.trainers, context.pool.evaluator
        context.report(async_settings_line(config))
        buffer = UpdateBuffer(
            config.buffer_size,
            policy=config.staleness_weight,
            a=config.staleness_a,
            b=config.staleness_b,
            max_staleness=config.max_staleness,
        )
        state = GlobalVersion(version=start - 1, weights=result.weights)
        queue: asyncio.Queue[tuple[str, int, FitResult]] = asyncio.Queue()
        loops = [
            asyncio.create_task(self._train_continuously(index, link, state, queue))
            for index, link in enumerate(trainers)
        ]
        try:
            started = time.perf_counter()
            before = traffic(trainers)
            contributors: list[str] = []
            updates: list[dict[str, Any]] = []  # each folded update, in order: a worker may send two to a version
            losses: dict[str, float] = {}
            failed: dict[str, Failure] = {}
            discarded = 0
            while state.version < config.training_rounds:
                try:
                    async with asyncio.timeout(config.round_timeout):
                        name, base, reply = await queue.get()
                except TimeoutError:
                    raise QuorumNotMet(
                        f"version {state.version + 1}: no worker returned an update within {config.round_timeout:g} s"
                    ) from None
                reason = invalid_update(reply, state.weights, context.pool.num_examples.get(name, 0))
                if reason is not None:
                    context.report(f"Update of {name} dropped: {reason}")
                    failed[name] = Failure("invalid update", reason)
                    continue
                staleness = state.version - base
                if not buffer.add(reply.weights, staleness):
                    discarded += 1
                    logger.info("%s: update %d versions old discarded", name, staleness)
                    continue
                contributors.append(name)
                losses[name] = reply.loss
                weight = staleness_weight(
                    config.staleness_weight, staleness, a=config.staleness_a, b=config.staleness_b
                )
                updates.append({"worker": name, "staleness": staleness, "weight": weight, "loss": reply.loss})
                if not buffer.full:
                    continue
                stalenesses = buffer.stalenesses
                mean = buffer.apply(state.weights)
                self.strategy.note_failures(state.version + 1, failed)
                state.weights = result.weights = finite_model(
                    self.strategy.step(state.weights, mean, participants=len(contributors), num_workers=len(trainers)),
                    state.version + 1,
                )
                state.version += 1
                record = RoundRecord(
                    state.version,
                    tuple(contributors),
                    time.perf_counter() - started,
                    config.learning_rate(state.version),
                    losses,
                    {name: str(failure) for name, failure in failed.items()},
                )
                result.rounds.append(record)
                after = traffic(trainers)
                context.journal.write(
                    round_event(
                        record,
                        mode="async",
                        figures={"train_loss": losses},
                        strategy=self.strategy.name,
                        details={
                            "staleness": {
                                "mean": float(np.mean(stalenesses)),
                                "max": int(max(stalenesses)),
                                "values": [int(s) for s in stalenesses],
                            },
                            "discarded": discarded,
                            "updates": updates,
                        },
                        traffic=(after[0] - before[0], after[1] - before[1]),
                        privacy={},
                    )
                )
                if config.is_eval_round(state.version):
                    if evaluator is not None:
                        await context.evaluation.evaluate_round(state.version, result, {}, evaluator, groups)
                    if config.federated_eval:
                        await context.evaluation.federated_eval(state.version, result, trainers)
                await context.journal.version_done(state.version, result)
                started = time.perf_counter()
                before = traffic(trainers)
                contributors, updates, losses, failed, discarded = [], [], {}, {}, 0
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _train_continuously(
        self,
        index: int,
        link: WorkerLink,
        state: GlobalVersion,
        queue: asyncio.Queue[tuple[str, int, FitResult]],
    ) -> None:
        """Train ``link`` from the newest global model, again and again, until cancelled.

        A worker that fails is dropped and retried with the usual backoff; its
        in-flight work is lost, the others go on.
        """
        context, config, pool = self.context, self.context.config, self.context.pool
        for task_number in itertools.count():
            if not pool.ready(link):
                await pool.rejoin([link])
                if not pool.ready(link):
                    await pool.wait_for_backoff(link)
                    continue
            base, weights = state.version, state.weights
            fit = context.dispatch.fit(
                base + 1,
                plan_seed(config.seed, task_number, index),
                config.learning_rate(base + 1),
                weights,
                context.strategy.needs(weights),
                delta=True,
            )
            try:
                reply = await context.dispatch.train(link, fit, as_received)
            except (WorkerTimeout, WorkerUnavailable, RemoteError, ProtocolError) as exc:
                failure = await pool.failure(link, exc)
                context.report(f"Worker {link.name}: update lost ({failure}); it will be retried")
                context.journal.write({"event": "worker_failed", "worker": link.name, "reason": str(failure)})
                if link.connected:  # an error reply: back off too, never retry in a tight loop
                    pool.back_off(link)
                await pool.wait_for_backoff(link)
                continue
            pool.succeeded(link)
            if (
                config.cross_site_validation
                and invalid_update(reply, weights, pool.num_examples.get(link.name, 0)) is None
            ):
                # The worker's local model: its base plus the update it returned.
                context.local_models[link.name] = {name: weights[name] + delta for name, delta in reply.weights.items()}
            await queue.put((link.name, base, reply))
