"""The coordinator: sends the global model out, aggregates what comes back.

Usage::

    result = asyncio.run(Coordinator(CoordinatorConfig(training_rounds=5)).run())

The package's rooms: :mod:`.coordinator` (the facade), :mod:`.pool`
(connections, joining, selection, backoff), :mod:`.dispatch` (fit requests
and their plans), :mod:`.sync_rounds` and :mod:`.buffered_rounds` (the round
loops), :mod:`.private_rounds` (secure aggregation, differential privacy),
:mod:`.evaluation` and :mod:`.cross_site`, :mod:`.journal` (metrics,
registry, checkpoint, resume) and :mod:`.results`.
"""

from __future__ import annotations

from ..fold import mismatch as _mismatch
from .coordinator import Coordinator
from .dispatch import plan_seed
from .pool import Backoff as _Backoff
from .results import CENTRALIZED, FEDERATED, EvalRecord, RoundRecord, RunResult, SiteEvalRecord

__all__ = [
    "CENTRALIZED",
    "FEDERATED",
    "Coordinator",
    "EvalRecord",
    "RoundRecord",
    "RunResult",
    "SiteEvalRecord",
    "plan_seed",
    # Kept for one release: old private names that tests import.
    "_Backoff",
    "_mismatch",
]
