"""Synchronous rounds: every round waits for its workers, under a deadline, then aggregates.

Each round: select the round's workers (all, or a seeded sample) → send the
model and a training plan to them at once → fold each update in as it
arrives (:mod:`syncfed.fold`) → aggregate → evaluate (on evaluation rounds)
→ record the metrics, the registry and the checkpoint. A round that fewer
than the quorum contribute to is retried, up to ``max_round_retries`` times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..disclosure import losses_text, round_figures
from ..exceptions import QuorumNotMet
from ..failure import Failure
from ..finite import finite_model
from ..fold import Fold, StreamingFold
from ..net.link import WorkerLink
from ..strategies import WorkerNeeds
from ..tensors import Weights
from .context import RunContext
from .dispatch import plan_seed
from .journal import round_event
from .pool import traffic
from .private_rounds import PrivateRounds
from .results import RoundRecord, RunResult

__all__ = ["SyncRounds"]

logger = logging.getLogger("syncfed.coordinator")


class SyncRounds:
    """The synchronous round loop, plain or private (secure aggregation, differential privacy)."""

    def __init__(self, context: RunContext, private: PrivateRounds | None) -> None:
        self.context = context
        self.private = private
        self._spare: dict[str, np.ndarray] = {}  # the last fold's sums, reused: fresh ones cost page faults
        self._whole: set[str] = set()  # workers whose updates are decoded whole: each poisoned a fold

    async def run(self, start: int, result: RunResult, groups: Mapping[str, Sequence[int]]) -> None:
        """Rounds ``start`` to ``training_rounds``: train, evaluate, record."""
        context, config = self.context, self.context.config
        trainers, evaluator = context.pool.trainers, context.pool.evaluator
        for round_number in range(start, config.training_rounds + 1):
            if self.private is not None and self.private.exhausted(round_number):  # --dp-target-epsilon
                break
            last = self.private is not None and self.private.over_budget(round_number + 1)
            evaluating = config.is_eval_round(round_number) or last
            keep = (evaluator is not None and evaluating and config.score_updates) or config.cross_site_validation
            updates = await self.train_round(round_number, result, trainers, keep=keep)
            if config.cross_site_validation:
                context.local_models.update(updates)
            if evaluator is not None and evaluating:
                await context.evaluation.evaluate_round(round_number, result, updates, evaluator, groups)
            if config.federated_eval and evaluating:
                await context.evaluation.federated_eval(round_number, result, trainers)
            await context.journal.version_done(round_number, result)

    async def train_round(
        self, round_number: int, result: RunResult, trainers: Sequence[WorkerLink], *, keep: bool
    ) -> dict[str, Weights]:
        """One round: select, dispatch and fold (until a quorum), aggregate, record.

        Returns each contributor's weights when ``keep`` (for the evaluator), else nothing: a
        streaming strategy has folded them into its sums and let them go.
        """
        started = time.perf_counter()
        before = traffic(trainers)
        fold, failures, selected = await self._gather(round_number, result.weights, trainers, keep=keep)
        self.context.strategy.note_failures(round_number, failures)
        result.weights = finite_model(fold.aggregate(len(trainers)), round_number)
        if isinstance(fold, StreamingFold):
            self._spare = fold.release()
        contributors = [link.name for link in trainers if link.name in fold.losses]  # in the workers' order
        record = RoundRecord(
            round_number,
            tuple(contributors),
            time.perf_counter() - started,
            self.context.config.learning_rate(round_number),
            {name: fold.losses[name] for name in contributors},
            {name: str(failure) for name, failure in failures.items()},
        )
        result.rounds.append(record)
        self._record(record, fold, trainers, selected, before)
        return {name: fold.kept[name] for name in contributors if name in fold.kept}

    async def _gather(
        self, round_number: int, weights: Weights, trainers: Sequence[WorkerLink], *, keep: bool
    ) -> tuple[Fold, dict[str, Failure], list[WorkerLink]]:
        """Select the round's workers and fold their updates, retrying while fewer than the quorum contribute.

        Raises:
            QuorumNotMet: the quorum was not met after ``max_round_retries`` retries.
        """
        config, pool = self.context.config, self.context.pool
        attempts = config.max_round_retries + 1
        wanted = config.sample_size(len(trainers))
        quorum = min(config.quorum, wanted)
        of = f"{wanted} selected workers" if wanted < len(trainers) else f"{len(trainers)} workers"
        for attempt in range(1, attempts + 1):
            await pool.rejoin(trainers)
            selected = pool.select(round_number, trainers)
            failures = {
                link.name: Failure("not connected", link.closed_reason) for link in trainers if not pool.ready(link)
            }
            fold, lost = await self._dispatch(round_number, weights, trainers, selected, keep=keep)
            failures |= lost
            if len(fold.losses) >= quorum:
                return fold, failures, selected
            summary = "; ".join(f"{name}: {failure}" for name, failure in failures.items())
            self.context.journal.write(
                {
                    "event": "round_retry",
                    "round": round_number,
                    "attempt": attempt,
                    "failed": {name: str(failure) for name, failure in failures.items()},
                }
            )
            if attempt == attempts:
                raise QuorumNotMet(
                    f"round {round_number}: {len(fold.losses)} of {of} contributed,"
                    f" quorum is {quorum}, after {attempts} attempts ({summary})"
                )
            self.context.report(
                f"Round {round_number}: {len(fold.losses)} of {of} contributed,"
                f" quorum is {quorum} ({summary}); retrying ({attempt}/{config.max_round_retries})"
            )
            await pool.wait_for_retry(trainers)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _dispatch(
        self,
        round_number: int,
        weights: Weights,
        trainers: Sequence[WorkerLink],
        selected: Sequence[WorkerLink],
        *,
        keep: bool,
    ) -> tuple[Fold, dict[str, Failure]]:
        """Send the round's requests to ``selected`` and fold the replies: plainly, or through a private round.

        A plain fold from fragments that a reply poisoned (it broke off after
        part of it was folded, see :mod:`syncfed.absorption`) is thrown away,
        and the round's workers train again, their updates folded whole. The
        updates of the workers that poisoned it are decoded whole for the rest
        of the run, so that each costs the run at most one retraining.
        """
        context, config = self.context, self.context.config
        needs = context.strategy.needs(weights)
        if self.private is not None:  # secure aggregation and differential privacy
            lr = config.learning_rate(round_number)
            return await self.private.collect(
                selected,
                lambda link: context.dispatch.in_round(
                    context.dispatch.fit(
                        round_number,
                        plan_seed(config.seed, round_number, trainers.index(link)),
                        lr,
                        weights,
                        needs,
                        delta=True,
                    ),
                    link,
                    len(selected),
                ),
                weights,
                context.pool.num_examples,
                context.pool.failure,
            )
        fold, lost = await self._plain(
            round_number, weights, needs, trainers, selected, keep=keep, fragments=config.fold_fragments
        )
        if not fold.poisoned:
            return fold, lost
        poisoned = {name: str(lost.get(name, "abandoned")) for name in fold.poisoned}
        self._spare = fold.release()
        self._whole.update(poisoned)
        self.context.journal.write({"event": "round_refold", "round": round_number, "poisoned": poisoned})
        self.context.report(
            f"Round {round_number}: a streamed update broke off after part of it was folded"
            f" ({'; '.join(f'{name}: {why}' for name, why in poisoned.items())});"
            " training the round again, folding whole updates; theirs are decoded whole from now on"
        )
        return await self._plain(round_number, weights, needs, trainers, selected, keep=keep, fragments=False)

    async def _plain(
        self,
        round_number: int,
        weights: Weights,
        needs: WorkerNeeds,
        trainers: Sequence[WorkerLink],
        selected: Sequence[WorkerLink],
        *,
        keep: bool,
        fragments: bool,
    ) -> tuple[StreamingFold, dict[str, Failure]]:
        """A plain round's requests and fold (``fragments``: streamed updates folded as they arrive)."""
        context, config = self.context, self.context.config
        fold = StreamingFold(
            context.strategy,
            weights,
            keep=keep,
            delta=config.compress != "none",
            held=context.pool.num_examples,
            control=needs.control,
            spare=self._spare,
            fragments=fragments,
            whole=self._whole,
        )
        self._spare = {}
        lost = await context.dispatch.collect_updates(round_number, weights, needs, trainers, selected, fold)
        return fold, lost

    def _record(
        self,
        record: RoundRecord,
        fold: Fold,
        trainers: Sequence[WorkerLink],
        selected: Sequence[WorkerLink],
        before: tuple[int, int],
    ) -> None:
        """Report the round on the console and the log, and write its metrics event."""
        config, strategy = self.context.config, self.context.strategy
        if record.failed:
            dropped = "; ".join(f"{name} ({reason})" for name, reason in record.failed.items())
            self.context.report(
                f"Round {record.round}: aggregated {len(fold.losses)} of {len(trainers)} workers; dropped {dropped}"
            )
        logger.info(
            "round %d/%d: %.2f s, lr %.4f, training loss %s",
            record.round,
            config.training_rounds,
            record.seconds,
            record.lr,
            losses_text(record.train_loss, secure=config.secure_agg),
        )
        contributors = record.workers
        figures: dict[str, Any] = {
            **round_figures(
                record.train_loss,
                {name: fold.examples[name] for name in contributors},
                secure=config.secure_agg,
                total=fold.total_examples,
            ),
            **(
                {"compression_error": {name: fold.compression_errors[name] for name in contributors}}
                if config.compress != "none"
                else {}
            ),
            # Each --dp-sgd worker's own example-level epsilon so far, at its own delta.
            **({"dp_epsilon": dict(fold.dp_epsilons)} if fold.dp_epsilons else {}),
        }
        after = traffic(trainers)
        self.context.journal.write(
            round_event(
                record,
                mode=None,
                figures=figures,
                strategy=strategy.name,
                details={"selected": [link.name for link in selected]} if len(selected) < len(trainers) else {},
                traffic=(after[0] - before[0], after[1] - before[1]),
                privacy=self.private.metrics(record.round) if self.private is not None else {},
            )
        )
