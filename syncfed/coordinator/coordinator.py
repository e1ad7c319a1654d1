"""The coordinator: sends the global model out, aggregates what comes back.

Usage::

    result = asyncio.run(Coordinator(CoordinatorConfig(training_rounds=5)).run())

A run: greet and check the workers (:mod:`.pool`, :mod:`syncfed.compatibility`)
→ propose the job's terms to them (:mod:`.proposal`) → start fresh or resume
from the checkpoint (:mod:`.journal`) → the rounds, synchronous
(:mod:`.sync_rounds`) or asynchronous (:mod:`.buffered_rounds`)
→ cross-site validation (:mod:`.cross_site`) → save the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..checkpoint import save_weights
from ..compatibility import chosen_data
from ..config import CoordinatorConfig
from ..disclosure import held_classes
from ..net.link import WorkerLink
from ..protocol import Info
from ..strategies import Strategy, make_strategy
from .buffered_rounds import BufferedRounds
from .context import RunContext
from .cross_site import cross_site_validation
from .data_statistics import agree_statistics
from .dispatch import Dispatch
from .evaluation import Evaluation
from .journal import Journal
from .pool import Pool, worker_links
from .private_rounds import PrivateRounds
from .proposal import agree, refused_event, training_terms
from .results import RunResult
from .sync_rounds import SyncRounds
from .task_setup import agree_task, task_readout

__all__ = ["Coordinator", "prediction_groups"]


def prediction_groups(config: CoordinatorConfig, infos: Mapping[str, Info]) -> dict[str, list[int]]:
    """Each trainer's classes, for the classic demo's "Percentage numbers" line: shown only when the
    trainers hold disjoint groups of classes (alice 0-3, bob 4-6, charlie 7-9), and never under
    --secure-agg or for a withheld histogram, which keep a site's classes private. One group (a
    centralized run) would always read 100%."""
    groups = {
        name: held_classes(info)
        for name, info in infos.items()
        if name in config.workers and not config.secure_agg and info.histogram is not None
    }
    held = [label for classes in groups.values() for label in classes]
    return groups if len(groups) > 1 and len(held) == len(set(held)) else {}


class Coordinator:
    """Runs federated training as configured; see the module docstring."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        report: Callable[[str], None] = print,
        listeners: Sequence[Callable[[Mapping[str, Any]], None]] = (),
        links: Mapping[str, WorkerLink] | None = None,
    ) -> None:
        """``report`` gets the human-readable lines; ``listeners`` get every metrics event as it happens.

        ``links``: connections to the config's workers that someone else keeps (the job service), which the run
        uses and leaves open; by default the run makes its own, and its own listener, and closes them at the end.
        """
        self.config = config
        self.report = report
        self.listeners = tuple(listeners)
        self.strategy: Strategy = make_strategy(config.strategy, **config.strategy_settings)
        if links is None:
            pool = Pool(config, worker_links(config), report=report)
        else:
            pool = Pool(
                config,
                {name: links[name] for name in {**config.workers, **config.evaluator}},
                report=report,
                owned=False,
            )
        journal = Journal(config, self.strategy, report=report, listeners=self.listeners)
        self._context = RunContext(
            config,
            self.strategy,
            pool,
            Dispatch(config, pool),
            journal,
            Evaluation(config, pool, journal, report=report),
            report,
        )
        # Secure aggregation and differential privacy; it needs each worker's example count.
        self._private = PrivateRounds(config, self.strategy, report=report) if config.private else None

    @property
    def run_id(self) -> str:
        """The run's name in the model registry (kept across ``--resume``)."""
        return self._context.journal.run_id

    async def run(self) -> RunResult:
        """Connect, check the workers, train for the configured rounds, save.

        Raises:
            WorkerUnavailable: fewer workers than the quorum, or no evaluator, at the start (or
                that accept the job's terms: the reason names the refusals).
            IncompatibleWorkers: workers disagree with each other or with the model.
            QuorumNotMet: a round could not gather the quorum within its retries.
            CheckpointError: the checkpoint cannot be resumed.
        """
        config, context = self.config, self._context
        pool, journal = context.pool, context.journal
        try:
            infos = await pool.start()
            assert pool.reference is not None
            result, start = journal.initial_state(pool.model_name, pool.reference, pool.plan, pool.recipe)
            # Before any query or training: the sites whose policy refuses the job leave the run.
            terms = training_terms(config, pool.model_name, journal.run_id)
            links = [*pool.trainers, *([pool.evaluator] if pool.evaluator is not None else [])]
            await agree(links, terms, self._refused, timeout=config.connect_timeout, report=self.report)
            ready = {link.name: link for link in pool.trainers if pool.ready(link)}
            if pool.plan is not None:
                pool.plan = journal.resumed_plan() or await agree_statistics(
                    config, pool.plan, ready, infos, report=self.report
                )
                journal.use_plan(pool.plan)
            pool.recipe = journal.resumed_recipe() or await agree_task(
                config, pool.recipe, pool.plan, ready, infos, report=self.report
            )
            journal.use_recipe(pool.recipe)
            context.evaluation.readout = result.readout = task_readout(
                config, pool.recipe, pool.plan, pool.num_classes, report=self.report
            )
            groups = prediction_groups(config, infos) if pool.plan is None else {}
            journal.open_metrics(result)
            rounds = BufferedRounds(context) if config.mode == "async" else SyncRounds(context, self._private)
            await rounds.run(start, result, groups)
            await journal.finish(result)
            if config.cross_site_validation:
                await cross_site_validation(context, result)
        finally:
            await pool.close()
            journal.close()
        if config.save_model is not None:
            plan = {"data_plan": json.dumps(pool.plan.to_json())} if pool.plan is not None else {}
            recipe = {"recipe": json.dumps(pool.recipe.to_body())} if pool.recipe is not None else {}
            save_weights(config.save_model, result.weights, {"format": "pt", "model": result.model, **plan, **recipe})
            self.report(f"Saved the {result.global_model} model to {config.save_model}")
        return result

    async def _refused(self, refusals: Mapping[str, str]) -> int:
        """Record the sites that refused the job and take them out of the run; how many training sites remain."""
        for name, reason in refusals.items():
            self._context.journal.write(refused_event(name, reason))
        await self._context.pool.exclude(refusals)
        return len(self._context.pool.trainers)

    def _chosen_data(self, name: str, info: Info) -> Info:
        """Kept for one release: :func:`syncfed.compatibility.chosen_data` with this run's config."""
        return chosen_data(self.config, name, info)
