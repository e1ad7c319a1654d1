"""When a worker that dials out tries again: exponential backoff with jitter, no I/O.

Workers restarted together (a coordinator's restart drops them all at once)
would otherwise knock in lockstep; each delay is drawn from the upper half
of its step ("equal jitter"), so they spread out but never retry early.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .exceptions import ConfigError

__all__ = ["Redial"]


@dataclass
class Redial:
    """Delays between dial attempts: ``first``, doubling to ``cap``, each times a uniform draw in [0.5, 1]."""

    first: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ConfigError(f"redial delays must satisfy 0 < first <= cap, not first {self.first} and cap {self.cap}")

    def next_delay(self) -> float:
        """Count a failed attempt; the seconds to wait before the next one."""
        step = min(self.first * 2.0 ** min(self.failures, 64), self.cap)
        self.failures += 1
        return step * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """A connection was made: the next loss starts over from ``first``."""
        self.failures = 0
