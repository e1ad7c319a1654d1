"""What a run produces: the final global weights and the records of its rounds and evaluations.

Pure data, returned by :meth:`~syncfed.coordinator.Coordinator.run`; the
metrics file says the same, as JSON lines (see :mod:`.journal`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation import CrossSiteMatrix, Readout, pool
from ..protocol import EvalResult
from ..tensors import Weights

__all__ = ["CENTRALIZED", "FEDERATED", "EvalRecord", "RoundRecord", "RunResult", "SiteEvalRecord"]

#: The name of the aggregated model, beside the workers' names, in evaluations.
FEDERATED = "federated"
#: Its name in a centralized baseline, where one worker holds all the training data: nothing was federated.
CENTRALIZED = "centralized"


@dataclass(frozen=True)
class EvalRecord:
    """The evaluator's verdict on one model at one round."""

    round: int
    model: str  # "federated" (or "centralized") or a worker id
    result: EvalResult


@dataclass(frozen=True)
class RoundRecord:
    """One round (or asynchronous version): who contributed, how long it took, and who failed why."""

    round: int
    workers: tuple[str, ...]
    seconds: float
    lr: float
    train_loss: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why it did not contribute


@dataclass(frozen=True)
class SiteEvalRecord:
    """Federated evaluation at one round: the global model scored by each training worker on its validation split."""

    round: int
    sites: dict[str, EvalResult]
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why it has no score

    @property
    def average(self) -> EvalResult:
        """The example-weighted average over the sites that answered (AggregationError when none did)."""
        return pool(self.sites.values())


@dataclass
class RunResult:
    """What a run produced: the final global weights and its history."""

    model: str
    weights: Weights
    first_round: int = 1  # later than 1 when the run was resumed from a checkpoint
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluations: list[EvalRecord] = field(default_factory=list)
    site_evaluations: list[SiteEvalRecord] = field(default_factory=list)  # with --federated-eval
    cross_site: CrossSiteMatrix | None = None  # with --cross-site-validation
    global_model: str = FEDERATED  # the global model's name in evaluations: CENTRALIZED in a centralized run
    readout: Readout = field(default_factory=Readout)  # how the run shows its scores: units, a user task's figures

    def accuracy(self, round_number: int, model: str | None = None) -> float:
        """The evaluator's accuracy of ``model`` (the global model by default) at ``round_number``."""
        model = self.global_model if model is None else model
        for record in self.evaluations:
            if record.round == round_number and record.model == model:
                return record.result.accuracy
        raise KeyError(f"no evaluation of {model} at round {round_number}")
