"""Staleness weighting and the update buffer of asynchronous federated learning.

In asynchronous FL a worker trains from some global version and, by the time
its update arrives, the coordinator may have published newer ones: the
update's staleness is the number of versions published since its base.
FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization") discounts
stale updates by a staleness function; FedBuff (Nguyen et al. 2022,
"Federated Learning with Buffered Asynchronous Aggregation") sums ``size``
discounted deltas (update minus base model) in a buffer and applies their
mean as one server step. Pure numpy: the coordinator owns the clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np

from .aggregation import check_tensors, from_float64
from .exceptions import AggregationError, ConfigError
from .tensors import Weights

__all__ = ["STALENESS_POLICIES", "UpdateBuffer", "staleness_weight"]

#: Names of the staleness functions of :func:`staleness_weight`.
STALENESS_POLICIES: Final = ("constant", "polynomial", "hinge")


def _check_staleness(staleness: object) -> None:
    if isinstance(staleness, bool) or not isinstance(staleness, (int, np.integer)) or staleness < 0:
        raise ConfigError(f"staleness {staleness!r} is not a non-negative integer")


def staleness_weight(policy: str, staleness: int, *, a: float = 0.5, b: int = 4) -> float:
    """How much an update ``staleness`` versions old counts, in (0, 1] (Xie et al. 2019).

    - ``constant``: 1.
    - ``polynomial``: ``(1 + staleness) ** -a``; ``a`` = 0.5 is FedBuff's ``1 / sqrt(1 + staleness)``.
    - ``hinge``: 1 up to ``b`` versions old, then ``1 / (a * (staleness - b) + 1)``.

    Raises:
        ConfigError: if the policy is unknown, ``staleness`` or ``b`` is not a
            non-negative integer, or ``a`` is not a finite number >= 0.
    """
    if policy not in STALENESS_POLICIES:
        raise ConfigError(f"staleness policy {policy!r} is not one of {', '.join(STALENESS_POLICIES)}")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 <= a < math.inf):
        raise ConfigError(f"staleness parameter a is {a!r}, expected a number >= 0")
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ConfigError(f"staleness parameter b is {b!r}, expected an integer >= 0")
    _check_staleness(staleness)
    if policy == "polynomial":
        return float((1 + staleness) ** -a)
    if policy == "hinge" and staleness > b:
        return 1.0 / (a * (staleness - b) + 1.0)
    return 1.0


class UpdateBuffer:
    """Sums staleness-weighted deltas until ``size`` of them are in, then applies their mean (FedBuff).

    One float64 sum per tensor, not a list of deltas. :meth:`apply` returns
    ``x + server_lr * sum(weight_i * delta_i) / count`` and empties the
    buffer. Integer tensors (batch-norm counters) get ``x`` plus their plain
    mean delta, rounded: they are bookkeeping, neither weighted nor scaled.
    With ``server_lr`` 1 the result is a mean model that a
    :class:`~syncfed.strategies.MeanStrategy` can take as its ``mean``::

        buffer = UpdateBuffer(3, max_staleness=10)
        if buffer.add(delta, staleness) and buffer.full:
            stalenesses = buffer.stalenesses
            new_global = strategy.step(global_weights, buffer.apply(global_weights))

    Raises:
        ConfigError: on construction, if ``size`` is not a positive integer,
            ``server_lr`` not a positive number, ``max_staleness`` negative, or
            as :func:`staleness_weight`.
    """

    def __init__(
        self,
        size: int,
        *,
        server_lr: float = 1.0,
        policy: str = "polynomial",
        a: float = 0.5,
        b: int = 4,
        max_staleness: int | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"buffer size {size!r} is not a positive integer")
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not 0 < server_lr < math.inf:
            raise ConfigError(f"server_lr {server_lr!r} is not a positive number")
        staleness_weight(policy, 0, a=a, b=b)  # checks the policy and its parameters
        if max_staleness is not None:
            _check_staleness(max_staleness)
        self.size = size
        self.server_lr = float(server_lr)
        self.policy = policy
        self.a = a
        self.b = b
        #: Updates more than this many versions old are discarded; None keeps every one.
        self.max_staleness = max_staleness
        self._stalenesses: list[int] = []
        # The first delta's names, shapes and dtypes, as zero-stride arrays that hold none of its memory.
        self._template: dict[str, np.ndarray] = {}
        self._sums: dict[str, np.ndarray] = {}

    @property
    def count(self) -> int:
        """Deltas in the buffer."""
        return len(self._stalenesses)

    @property
    def full(self) -> bool:
        """Whether the buffer holds ``size`` deltas and must be applied before the next one."""
        return self.count >= self.size

    @property
    def stalenesses(self) -> tuple[int, ...]:
        """The staleness of every delta in the buffer, in arrival order (read it before :meth:`apply`)."""
        return tuple(self._stalenesses)

    def add(self, delta: Mapping[str, np.ndarray], staleness: int) -> bool:
        """Fold ``delta`` in, weighted by its staleness; False (and nothing kept) if it is too stale.

        Raises:
            ConfigError: if the buffer is full or ``staleness`` is not a non-negative integer.
            AggregationError: if ``delta`` differs from the first delta in the buffer in
                tensor names, shapes or dtypes (the buffer is left as it was).
        """
        if self.full:
            raise ConfigError(f"update buffer holds {self.count} of {self.size} updates; apply it before adding more")
        weight = staleness_weight(self.policy, staleness, a=self.a, b=self.b)
        if self.max_staleness is not None and staleness > self.max_staleness:
            return False
        if self.count:
            check_tensors(delta, self._template, what=f"delta {self.count}", against="delta 0 in the buffer")
        else:
            self._template = {
                name: np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape) for name, array in delta.items()
            }
            self._sums = {name: np.zeros(array.shape, dtype=np.float64) for name, array in delta.items()}
        for name, total in self._sums.items():
            floating = np.issubdtype(self._template[name].dtype, np.floating)
            total += np.multiply(delta[name], weight if floating else 1.0, dtype=np.float64)
        self._stalenesses.append(int(staleness))
        return True

    def apply(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        """The global model plus ``server_lr`` times the mean weighted delta; empties the buffer.

        Works on a buffer that is not yet full too (such as at the end of a run).

        Raises:
            AggregationError: if the buffer is empty or its deltas do not fit
                ``global_weights`` (the buffer is then kept).
        """
        if not self.count:
            raise AggregationError("the update buffer is empty")
        check_tensors(self._template, global_weights, what="the buffer", against="the global model")
        result: Weights = {}
        for name, x in global_weights.items():
            step = self._sums[name] / self.count
            if np.issubdtype(x.dtype, np.floating):
                step *= self.server_lr
            else:
                step = np.rint(step)
            result[name] = from_float64(x.astype(np.float64) + step, x.dtype)
        self._stalenesses, self._template, self._sums = [], {}, {}
        return result
