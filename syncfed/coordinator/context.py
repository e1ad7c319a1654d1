"""What the parts of a run share: its settings, strategy, workers, requests, record and evaluation.

One small object the facade builds and hands to the round loops, instead of
state spread over one large class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import CoordinatorConfig
from ..strategies import Strategy
from ..tensors import Weights
from .dispatch import Dispatch
from .evaluation import Evaluation
from .journal import Journal
from .pool import Pool

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """The run's collaborators, and each trainer's latest local model (for cross-site validation only)."""

    config: CoordinatorConfig
    strategy: Strategy
    pool: Pool
    dispatch: Dispatch
    journal: Journal
    evaluation: Evaluation
    report: Callable[[str], None]
    local_models: dict[str, Weights] = field(default_factory=dict)
