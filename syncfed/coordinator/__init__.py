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

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:  # the lazily loaded names, for type checkers (re-exported through __getattr__)
    from ..fold import mismatch as _mismatch
    from .coordinator import Coordinator
    from .dispatch import plan_seed
    from .pool import Backoff as _Backoff
    from .results import (
        CENTRALIZED,
        FEDERATED,
        EvalRecord,
        RoundRecord,
        RunResult,
        SiteEvalRecord,
    )

#: Each name, by the module it lives in. Loaded on first use: the rooms that need no model (a query round,
#: a proposal) are imported by ``python -m syncfed analytics`` without loading torch.
_HOMES: dict[str, str] = {
    "CENTRALIZED": ".results",
    "FEDERATED": ".results",
    "Coordinator": ".coordinator",
    "EvalRecord": ".results",
    "RoundRecord": ".results",
    "RunResult": ".results",
    "SiteEvalRecord": ".results",
    "plan_seed": ".dispatch",
    # Kept for one release: old private names that tests import.
    "_Backoff": ".pool:Backoff",
    "_mismatch": "..fold:mismatch",
}

__all__ = [
    "CENTRALIZED",
    "FEDERATED",
    "Coordinator",
    "EvalRecord",
    "RoundRecord",
    "RunResult",
    "SiteEvalRecord",
    "plan_seed",
    "_Backoff",
    "_mismatch",
]


__getattr__, __dir__ = lazy_names(globals(), _HOMES)
