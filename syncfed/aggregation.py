"""Aggregation of worker updates into the next global model.

Pure numpy over ``(weights, num_examples)`` pairs: validate first, then
compute, one tensor at a time so temporaries stay the size of one tensor
(robust rules stack one tensor across the workers, never the whole model).
Updates may list their tensors in any order; the result follows the first.

- ``fedavg``: the example-weighted average of McMahan et al. 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data".
- ``mean``: the unweighted average of the classic PySyft websocket demo.
- ``RunningMean``: both of them folded one update at a time, so a
  coordinator holds one update plus the accumulator, never the whole round.
- ``median`` and ``trimmed_mean``: the coordinate-wise rules of Yin et al.
  2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates"; ``krum_scores``: the scores of Krum (Blanchard et al. 2017,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent").
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import numpy as np

from .exceptions import AggregationError, ConfigError
from .tensors import Weights

__all__ = [
    "Update",
    "AGGREGATORS",
    "RunningMean",
    "fedavg",
    "mean",
    "median",
    "trimmed_mean",
    "krum_scores",
    "get_aggregator",
    "validate_updates",
    "check_tensors",
    "from_float64",
]

#: One worker's contribution: its weights and the number of examples behind them.
Update = tuple[Mapping[str, np.ndarray], int]


def check_tensors(
    weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, what: str, against: str
) -> None:
    """Check that ``weights`` has the tensor names, shapes and dtypes of ``reference``.

    ``what`` and ``against`` name the two in the message, such as "update 2"
    and "update 0". Only the shape and dtype of ``reference``'s arrays are read.

    Raises:
        AggregationError: naming the first tensor that differs and both its shapes or dtypes.
    """
    if weights.keys() != reference.keys():
        missing = sorted(set(reference) - set(weights))
        extra = sorted(set(weights) - set(reference))
        raise AggregationError(f"{what} has different tensors than {against} (missing {missing}, extra {extra})")
    for name, expected in reference.items():
        array = weights[name]
        if array.shape != expected.shape:
            raise AggregationError(f"{what} has tensor {name} of shape {array.shape}, {against} has {expected.shape}")
        if array.dtype != expected.dtype:
            raise AggregationError(f"{what} has tensor {name} of dtype {array.dtype}, {against} has {expected.dtype}")


def _check_count(index: int, count: object) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        raise AggregationError(f"update {index} has example count {count!r}, expected a positive integer")


def validate_updates(updates: Sequence[Update]) -> None:
    """Check that there are updates, with positive integer counts, that agree with update 0.

    Raises:
        AggregationError: if there are no updates, a count is not a positive
            integer, or an update differs from update 0 in tensor names, shapes or dtypes.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    first, _ = updates[0]
    for index, (weights, count) in enumerate(updates):
        _check_count(index, count)
        check_tensors(weights, first, what=f"update {index}", against="update 0")


def from_float64(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to a tensor's dtype, rounding integer tensors (batch-norm counters) to nearest."""
    if not np.issubdtype(dtype, np.floating):
        values = np.rint(values)
    return values.astype(dtype)


#: Elements folded at a time: the two float64 scratch blocks (512 KiB each) stay in cache.
_BLOCK = 1 << 16


class RunningMean:
    """The (example-weighted) mean of updates, folded in one at a time as they arrive.

    Keeps ``sum(count * weights)`` in float64 and divides once in
    :meth:`result`, so at most one update plus the accumulator is in memory::

        running = RunningMean(origin=global_weights)
        for weights, num_examples in arriving_updates:
            running.add(weights, num_examples)
        new_global = running.result()

    With ``origin`` (the model the updates started from) it sums
    ``count * (weights - origin)`` instead and adds ``origin`` back at the
    end. The differences are small, so their float64 sum is exact to far
    below float32's precision, and the mean no longer depends on the order
    the updates arrived in: a run gives the same weights bit for bit however
    its workers' replies race.
    """

    def __init__(
        self,
        *,
        weighted: bool = True,
        origin: Mapping[str, np.ndarray] | None = None,
        spare: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """``spare``: float64 arrays from :meth:`release` (last round's sums), zeroed and used as sums
        where the shapes agree: fresh ones cost a page fault per page (clearing the pages was an
        eighth of the coordinator's CPU in rounds of mlp-10m)."""
        self.weighted = weighted
        self.origin = origin
        #: Updates folded in so far.
        self.count = 0
        #: Examples behind them (counted whether or not the mean is weighted).
        self.total = 0
        # Update 0's names, shapes and dtypes, as zero-stride arrays that hold none of its memory.
        self._template: dict[str, np.ndarray] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._spare = dict(spare or {})
        self._lock = threading.Lock()  # parts of updates may be added from the event loop and a fold thread

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Fold one update in; a rejected update leaves the mean unchanged.

        Raises:
            AggregationError: if ``num_examples`` is not a positive integer, or
                the update differs from the first one in tensor names, shapes or dtypes.
        """
        _check_count(self.count, num_examples)
        self.check(weights)
        self.start(weights)
        factor = self.factor(num_examples)
        # In blocks, through one small float64 scratch that stays in cache: a whole-tensor
        # float64 temporary would cost a model-sized allocation and most of the fold's time.
        scratch = self.scratch()
        for name in self._sums:
            self.add_part(name, 0, np.ravel(weights[name]), factor, scratch)
        self.count_in(num_examples)

    def check(self, weights: Mapping[str, np.ndarray]) -> None:
        """Check an update's tensor names, shapes and dtypes against update 0's (or the origin's, before it).

        Raises:
            AggregationError: naming the first tensor that differs.
        """
        if self._template:
            check_tensors(weights, self._template, what=f"update {self.count}", against="update 0")
        elif self.origin is not None:
            check_tensors(weights, self.origin, what="update 0", against="the origin")

    def start(self, like: Mapping[str, np.ndarray]) -> None:
        """Make the sums, shaped as ``like`` (a checked update), unless they exist."""
        with self._lock:
            if self._template:
                return
            self._template = {
                name: np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape) for name, array in like.items()
            }
            spare, self._spare = self._spare, {}
            self._sums = {name: _zeros(spare.get(name), array.shape) for name, array in like.items()}

    @staticmethod
    def scratch() -> np.ndarray:
        """Two float64 block buffers for :meth:`add_part` (one pair per thread that adds)."""
        return np.empty((2, _BLOCK), dtype=np.float64)

    def factor(self, num_examples: int) -> float:
        """What an update of ``num_examples`` examples is multiplied by in the sums."""
        return float(num_examples) if self.weighted else 1.0

    def add_part(
        self, name: str, start: int, values: np.ndarray, factor: float, scratch: np.ndarray, *, finite: bool = False
    ) -> int:
        """Add ``factor * values`` (less the origin's) into tensor ``name``'s flat sums from element ``start``.

        Parts of one update may arrive in any order and interleave with other
        updates' (a streamed reply folded fragment by fragment, see
        :mod:`syncfed.absorption`); the update counts once :meth:`count_in`
        runs. ``scratch``: the caller's :meth:`scratch`, so that callers in two
        threads never share one. The sums are written under a lock, a block at
        a time.

        ``finite``: check each block before adding it, and stop before the
        first that holds a NaN or an infinity. The check is the block's sum,
        taken while the block is in cache: about a third of the cost of scanning
        ``values`` beforehand, and not BLAS, whose threads spin on the other
        core. The sum is finite exactly when every value is, as long as the
        scaled differences stay below 1e303: float32's are far below, and a
        float64 model that comes near its range only gets a false alarm (a
        poisoned fold, folded again whole). Returns the elements added:
        ``values.size`` unless a block was not finite.
        """
        flat = self._sums[name].reshape(-1)
        origin = None if self.origin is None else np.ravel(self.origin[name])
        with np.errstate(over="ignore", invalid="ignore"):  # a check that overflows, or meets inf - inf, answers
            for first in range(0, values.size, _BLOCK):
                last = min(first + _BLOCK, values.size)
                # Widened by plain copies, then float64 arithmetic: the same values as a mixed-dtype
                # ufunc, without its buffered casts (a fifth of the fold's time).
                part, other = scratch[0, : last - first], scratch[1, : last - first]
                where = slice(start + first, start + last)
                part[...] = values[first:last]
                if origin is not None:
                    other[...] = origin[where]
                    part -= other
                part *= factor
                if finite and not np.isfinite(np.add.reduce(part)):
                    return first
                with self._lock:
                    flat[where] += part
        return values.size

    def count_in(self, num_examples: int) -> None:
        """Count an update whose every part was added."""
        self.count += 1
        self.total += int(num_examples)

    def release(self) -> dict[str, np.ndarray]:
        """Hand the float64 sums over for another mean to reuse (``spare``); this one is emptied."""
        sums, self._sums, self._template, self.count, self.total = self._sums, {}, {}, 0, 0
        return sums

    def result(self) -> Weights:
        """The mean so far, in the first update's tensor order and dtypes; the accumulator is kept.

        Raises:
            AggregationError: if no update was added.
        """
        if not self.count:
            raise AggregationError("no updates to aggregate")
        divisor = self.total if self.weighted else self.count
        # In blocks, as in add: whole-tensor float64 temporaries would be the coordinator's memory peak.
        scratch = np.empty(_BLOCK, dtype=np.float64)
        mean: Weights = {}
        for name, total in self._sums.items():
            dtype = self._template[name].dtype
            result = mean[name] = np.empty(total.shape, dtype=dtype)
            flat, out = total.reshape(-1), result.reshape(-1)
            origin = None if self.origin is None else np.ravel(self.origin[name])
            for start in range(0, flat.size, _BLOCK):
                stop = min(start + _BLOCK, flat.size)
                part = scratch[: stop - start]
                np.divide(flat[start:stop], divisor, out=part)
                if origin is not None:
                    np.add(part, origin[start:stop], out=part)
                if not np.issubdtype(dtype, np.floating):
                    np.rint(part, out=part)  # as from_float64
                np.copyto(out[start:stop], part, casting="unsafe")
        return mean


def _zeros(spare: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of zeros of ``shape``: ``spare`` zeroed in place when it has that shape."""
    if spare is None or spare.shape != shape or spare.dtype != np.float64:
        return np.zeros(shape, dtype=np.float64)
    spare.fill(0.0)
    return spare


def _average(updates: Sequence[Update], *, weighted: bool) -> Weights:
    """Average every tensor, weighting by example count or not.

    Raises:
        AggregationError: if there are no updates, or they disagree in tensor
            names, shapes or dtypes, or an example count is not positive.
    """
    running = RunningMean(weighted=weighted)
    for weights, count in updates:
        running.add(weights, count)
    return running.result()


def fedavg(updates: Sequence[Update]) -> Weights:
    """Example-weighted average (FedAvg)."""
    return _average(updates, weighted=True)


def mean(updates: Sequence[Update]) -> Weights:
    """Unweighted average: every worker counts the same."""
    return _average(updates, weighted=False)


def _stack(updates: Sequence[Update], name: str) -> np.ndarray:
    """One tensor of every update as rows of a float64 matrix (workers x elements)."""
    stacked = np.empty((len(updates), updates[0][0][name].size), dtype=np.float64)
    for row, (weights, _) in zip(stacked, updates, strict=True):
        row[...] = weights[name].reshape(-1)
    return stacked


def median(updates: Sequence[Update]) -> Weights:
    """Coordinate-wise median, unweighted (Yin et al. 2018).

    Raises:
        AggregationError: as :func:`validate_updates`.
    """
    validate_updates(updates)
    return {
        name: from_float64(np.median(_stack(updates, name), axis=0).reshape(reference.shape), reference.dtype)
        for name, reference in updates[0][0].items()
    }


def trimmed_mean(updates: Sequence[Update], trim_ratio: float) -> Weights:
    """Coordinate-wise trimmed mean, unweighted (Yin et al. 2018).

    Drops the ``floor(trim_ratio * n)`` largest and smallest values of every
    coordinate and averages the rest. ``trim_ratio`` is in [0, 0.5), so more
    than zero values always remain. The ratio is read as the decimal it prints
    as and the floor is taken exactly: 0.3 of 10 trims 3, as scipy and Flower
    do, although the binary value of 0.3 times 10 is a hair under 3.

    Raises:
        ConfigError: if ``trim_ratio`` is not in [0, 0.5).
        AggregationError: as :func:`validate_updates`.
    """
    if not 0 <= trim_ratio < 0.5:
        raise ConfigError(f"trim ratio {trim_ratio!r} is not in [0, 0.5)")
    validate_updates(updates)
    count = len(updates)
    trimmed = math.floor(Fraction(str(trim_ratio)) * count)
    result: Weights = {}
    for name, reference in updates[0][0].items():
        stacked = _stack(updates, name)
        stacked.sort(axis=0)
        kept = stacked[trimmed : count - trimmed].mean(axis=0)
        result[name] = from_float64(kept.reshape(reference.shape), reference.dtype)
    return result


def krum_scores(updates: Sequence[Update], byzantine_f: int) -> np.ndarray:
    """Krum's score of every update: the sum of its squared L2 distances to its ``n - f - 2`` nearest others.

    Distances are over the whole model, accumulated tensor by tensor. Only
    floating-point tensors count: integer buffers (batch-norm counters) track
    how many batches a worker ran, not where its model is. Blanchard et al.
    2017 guarantee robustness for ``n >= 2f + 3``; the scores only need
    ``n >= f + 3`` (one neighbour each).

    Raises:
        ConfigError: if ``byzantine_f`` is negative.
        AggregationError: if there are fewer than ``f + 3`` updates, or as :func:`validate_updates`.
    """
    if byzantine_f < 0:
        raise ConfigError(f"byzantine_f {byzantine_f!r} is negative")
    validate_updates(updates)
    count = len(updates)
    if count < byzantine_f + 3:
        raise AggregationError(
            f"krum with byzantine_f {byzantine_f} needs at least {byzantine_f + 3} updates, got {count}"
        )
    distances = np.zeros((count, count))
    for name, reference in updates[0][0].items():
        if not np.issubdtype(reference.dtype, np.floating):
            continue
        stacked = _stack(updates, name)
        # Centring keeps distances but removes the common part of the models,
        # whose size would otherwise swamp their small differences in the Gram matrix.
        stacked -= stacked.mean(axis=0)
        gram = stacked @ stacked.T
        norms = np.diag(gram)
        distances += norms[:, None] + norms[None, :] - 2 * gram
    np.maximum(distances, 0.0, out=distances)
    others = distances[~np.eye(count, dtype=bool)].reshape(count, count - 1)
    scores: np.ndarray = np.sort(others, axis=1)[:, : count - byzantine_f - 2].sum(axis=1)
    return scores


AGGREGATORS: dict[str, Callable[[Sequence[Update]], Weights]] = {"fedavg": fedavg, "mean": mean}


def get_aggregator(name: str) -> Callable[[Sequence[Update]], Weights]:
    """Look up an aggregation function by its command-line name."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ConfigError(f"aggregation {name!r} is not one of {', '.join(AGGREGATORS)}") from None
