"""Evaluation during a run: the central evaluator's rounds, and federated evaluation at the sites.

On an evaluation round the evaluator scores the federated model (and each
contributor's own, when individual updates are not private); with
``--federated-eval`` every training worker also scores the global model on
its own validation split, reported per site and as the weighted average.
A lost evaluator or site skips its score, never the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..config import CoordinatorConfig
from ..evaluation import VALIDATION, Cell, Readout, headline, is_regression, result_json
from ..exceptions import ProtocolError, RemoteError, WorkerUnavailable
from ..net.link import WorkerLink
from ..partition import group_label
from ..protocol import EvalResult, Evaluate
from ..tensors import Weights
from .journal import Journal
from .pool import Pool
from .results import CENTRALIZED, EvalRecord, RunResult, SiteEvalRecord

__all__ = ["Evaluation", "eval_event", "recall_line", "score_line"]


def score_line(reply: EvalResult) -> str:
    """How the console shows one score: its loss, and its accuracy where there is one (not for a regression)."""
    if is_regression(reply):
        return f"Average loss: {reply.loss:.4f} ({reply.num_examples} examples)"
    return f"Average loss: {reply.loss:.4f}, Accuracy: {reply.correct}/{reply.num_examples} ({reply.accuracy:.2%})"


def eval_event(
    round_number: int, model: str, reply: EvalResult, classes: Sequence[str] | None, readout: Readout | None = None
) -> dict[str, Any]:
    """The metrics file's ``eval`` event of the evaluator's score of ``model``: accuracy where it applies,
    then the task's metrics from the reply's sums (``syncfed.metrics.report``) as ``readout`` shows them."""
    names = classes if classes is not None and len(classes) == len(reply.predictions) else ()
    figures = result_json(reply, names, readout or Readout())
    event: dict[str, Any] = {"event": "eval", "round": round_number, "model": model}
    if "accuracy" in figures:
        event["accuracy"] = figures.pop("accuracy")
    event |= {"loss": figures.pop("loss"), "n": figures.pop("n")}
    if "correct" in figures:
        event["correct"] = figures.pop("correct")
    event["predictions"] = list(reply.predictions)
    return event | figures


def recall_line(reply: EvalResult, classes: Sequence[str] | None) -> str:
    """Per-class recall as the console shows it ("Recall per class: NORMAL 91.2%, PNEUMONIA 96.0%"), or ""
    when the reply has no per-class counts; a class absent from the scored data shows as "-"."""
    recall = reply.recall
    if recall is None:
        return ""
    names = classes if classes is not None and len(classes) == len(recall) else [str(c) for c in range(len(recall))]
    return "Recall per class: " + ", ".join(
        f"{name} {'-' if share is None else f'{share:.1%}'}" for name, share in zip(names, recall, strict=True)
    )


class Evaluation:
    """Scores models on the evaluator's test data and on the sites' validation splits."""

    def __init__(
        self, config: CoordinatorConfig, pool: Pool, journal: Journal, *, report: Callable[[str], None]
    ) -> None:
        self.config = config
        self.pool = pool
        self.journal = journal
        self.report = report
        self.readout = Readout()  # the run's, once its task is agreed (task_setup.task_readout)

    async def evaluate_round(
        self,
        round_number: int,
        result: RunResult,
        updates: Mapping[str, Weights],
        evaluator: WorkerLink,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        """Score each contributing worker's model (unless ``--eval-global-only``) and the global one; a lost
        evaluator skips this evaluation."""
        global_name = result.global_model
        # A centralized run's one worker trained the global model itself: its update would be scored twice.
        scored = updates if global_name != CENTRALIZED and self.config.score_updates else {}
        candidates = {**scored, global_name: result.weights}
        batch, key = self.config.test_batch_size, self.config.dataset_key
        await self.pool.rejoin([evaluator])
        try:
            replies = await asyncio.gather(
                *(
                    evaluator.request(
                        Evaluate(
                            self.pool.model_name,
                            weights,
                            batch,
                            dataset_key=key,
                            data=self.pool.plan,
                            recipe=self.pool.recipe,
                        )
                    )
                    for weights in candidates.values()
                )
            )
        except (WorkerUnavailable, RemoteError, ProtocolError) as exc:
            if isinstance(exc, WorkerUnavailable):
                self.pool.back_off(evaluator)
            await evaluator.close()
            self._skipped(round_number, str(exc))
            return
        num_classes = self.pool.num_classes
        scores = [reply for reply in replies if isinstance(reply, EvalResult)]
        if any(len(score.predictions) != num_classes for score in scores):
            self._skipped(round_number, f"the evaluator's predictions do not have {num_classes} classes")
            return
        self.report(f"Evaluation at {self.config.step} {round_number}/{self.config.training_rounds}:")
        for name, reply in zip(candidates, scores, strict=True):
            result.evaluations.append(EvalRecord(round_number, name, reply))
            label = f"{global_name.capitalize()} model" if name == global_name else f"Model update {name}"
            shares = ", ".join(
                f"{group_label(held)}: {sum(reply.predictions[c] for c in held) / reply.num_examples:.0%}"
                for held in groups.values()
            )
            if groups:
                self.report(f"{label}: Percentage numbers {shares}")
            self.report(f"{label}: {score_line(reply)}")
            figures = headline(reply, self.readout)
            if figures and name == global_name:
                self.report(f"{label}: {figures}")
            recall = recall_line(reply, self.pool.plan.classes if self.pool.plan is not None else None)
            if recall and name == global_name:
                self.report(f"{label}: {recall}")
            classes = self.pool.plan.classes if self.pool.plan is not None else None
            self.journal.write(eval_event(round_number, name, reply, classes, self.readout))

    async def score(self, link: WorkerLink, weights: Weights, split: str | None) -> Cell:
        """``link``'s score of ``weights`` on its own data, or on its validation split, or why there is none.

        A failure is handled as in training (a late worker is dropped and
        rejoins later) and its reason returned, so one site cannot stop the others.
        """
        if not self.pool.ready(link):
            return f"not connected ({link.closed_reason})"
        pool = self.pool
        request = Evaluate(
            pool.model_name,
            weights,
            self.config.test_batch_size,
            split,
            self.config.dataset_key,
            pool.plan,
            pool.recipe,
        )
        try:
            reply = await link.request(request)
        except (WorkerUnavailable, RemoteError, ProtocolError) as exc:
            return str(await self.pool.failure(link, exc))
        assert isinstance(reply, EvalResult)
        if len(reply.predictions) != self.pool.num_classes:
            return f"its predictions do not have {self.pool.num_classes} classes"
        return reply

    async def federated_eval(self, round_number: int, result: RunResult, trainers: Sequence[WorkerLink]) -> None:
        """Federated evaluation: every training worker scores the global model on its own validation split, at once.

        Reported per site and as the example-weighted average, beside the
        central evaluator's score of the same model when there is one.
        """
        outcomes = await asyncio.gather(*(self.score(link, result.weights, VALIDATION) for link in trainers))
        named = dict(zip((link.name for link in trainers), outcomes, strict=True))
        record = SiteEvalRecord(
            round_number,
            {name: outcome for name, outcome in named.items() if isinstance(outcome, EvalResult)},
            {name: outcome for name, outcome in named.items() if isinstance(outcome, str)},
        )
        result.site_evaluations.append(record)
        central = next(
            (
                entry.result
                for entry in result.evaluations
                if entry.round == round_number and entry.model == result.global_model
            ),
            None,
        )
        at = f"{self.config.step} {round_number}/{self.config.training_rounds}"
        self.report(f"Federated evaluation at {at} (validation splits):")
        names = self.pool.plan.classes if self.pool.plan is not None and self.pool.plan.classes is not None else ()
        secure = self.config.secure_agg  # each site's figures and size stay private: the average only
        for name, reply in record.sites.items() if not secure else ():
            self.report(f"Site {name}: {score_line(reply)}")
        for name, reason in record.failed.items():
            self.report(f"Site {name}: not evaluated ({reason})")
        event: dict[str, Any] = {
            "event": "federated_eval",
            "round": round_number,
            "sites": (
                {name: result_json(reply, names, self.readout) for name, reply in record.sites.items()}
                if not secure
                else {}
            ),
            "failed": record.failed,
        }
        if record.sites:
            average = record.average
            beside = (
                f"; central evaluator: {central.accuracy:.2%}"
                if central is not None and not is_regression(central)
                else ""
            )
            self.report(f"Weighted average over {len(record.sites)} sites: {score_line(average)}{beside}")
            figures = headline(average, self.readout)
            if figures:
                self.report(f"Weighted average over {len(record.sites)} sites: {figures}")
            recall = recall_line(average, self.pool.plan.classes if self.pool.plan is not None else None)
            if recall:
                self.report(f"Weighted average over {len(record.sites)} sites: {recall}")
            event["average"] = result_json(average, names, self.readout)
        if central is not None:
            event["central"] = result_json(central, names, self.readout)
        self.journal.write(event)

    def _skipped(self, round_number: int, reason: str) -> None:
        self.report(f"Evaluation at {self.config.step} {round_number} skipped: {reason}")
        self.journal.write({"event": "eval_skipped", "round": round_number, "reason": reason})
