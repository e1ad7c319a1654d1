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

import importlib
from typing import TYPE_CHECKING, Any

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

#: Each name, by the module it lives in and its name there. Loaded on first use: the rooms that need no model
#: (a query round, a proposal) are imported by ``python -m syncfed analytics`` without loading torch.
_HOMES: dict[str, tuple[str, str]] = {
    "CENTRALIZED": (".results", "CENTRALIZED"),
    "FEDERATED": (".results", "FEDERATED"),
    "Coordinator": (".coordinator", "Coordinator"),
    "EvalRecord": (".results", "EvalRecord"),
    "RoundRecord": (".results", "RoundRecord"),
    "RunResult": (".results", "RunResult"),
    "SiteEvalRecord": (".results", "SiteEvalRecord"),
    "plan_seed": (".dispatch", "plan_seed"),
    # Kept for one release: old private names that tests import.
    "_Backoff": (".pool", "Backoff"),
    "_mismatch": ("..fold", "mismatch"),
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = home
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
