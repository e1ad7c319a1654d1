"""Why a worker did not contribute to a round: a kind and a reason, as data.

A request can fail in a few distinct ways, and the coordinator acts on each
differently (a late worker is closed, a lost one backed off); a strategy may
weigh them too (see :meth:`syncfed.strategies.Strategy.note_failures`, after
Flower's ``aggregate_fit(results, failures)``). Keeping the kind apart from the
reason spares everyone parsing a sentence. The text of a failure, in metrics
and on the console, is ``str(failure)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Failure", "FailureKind"]

FailureKind = Literal[
    "timeout",  # no reply within the deadline: the worker is closed and rejoins later
    "unavailable",  # the connection is lost or refused: the worker is backed off
    "not connected",  # the worker was not connected when the round started
    "error reply",  # the worker answered with an error message (code: reason)
    "invalid reply",  # the worker's reply broke the protocol: the worker is closed
    "invalid update",  # a valid reply whose update cannot be aggregated
    "round",  # the round as a whole failed for this worker (secure aggregation aborted, no sum)
]

#: How each kind reads: the text the metrics file has always carried.
_TEXT: dict[str, str] = {
    "timeout": "timeout: {}",
    "unavailable": "{}",
    "not connected": "not connected ({})",
    "error reply": "error reply: {}",
    "invalid reply": "invalid reply: {}",
    "invalid update": "invalid update: {}",
    "round": "{}",
}


@dataclass(frozen=True)
class Failure:
    """One worker's failure in one request: what kind, and the reason in words."""

    kind: FailureKind
    reason: str

    def __str__(self) -> str:
        return _TEXT[self.kind].format(self.reason)
