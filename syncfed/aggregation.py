"""Aggregation of worker updates into the next global model.

Pure numpy over ``(weights, num_examples)`` pairs: validate first, then
compute, one tensor at a time so temporaries stay the size of one tensor.
Updates may list their tensors in any order; the result follows the first.

- ``fedavg``: the example-weighted average of McMahan et al. 2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data".
- ``mean``: the unweighted average of the classic PySyft websocket demo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .exceptions import AggregationError, ConfigError
from .tensors import Weights

__all__ = ["Update", "AGGREGATORS", "fedavg", "mean", "get_aggregator"]

#: One worker's contribution: its weights and the number of examples behind them.
Update = tuple[Mapping[str, np.ndarray], int]


def _validate(updates: Sequence[Update]) -> None:
    if not updates:
        raise AggregationError("no updates to aggregate")
    first, _ = updates[0]
    names = list(first)
    for index, (weights, count) in enumerate(updates):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
            raise AggregationError(f"update {index} has example count {count!r}, expected a positive integer")
        if weights.keys() != first.keys():
            missing = sorted(set(names) - set(weights))
            extra = sorted(set(weights) - set(names))
            raise AggregationError(
                f"update {index} has different tensors than update 0 (missing {missing}, extra {extra})"
            )
        for name in names:
            if weights[name].shape != first[name].shape:
                raise AggregationError(
                    f"update {index} has tensor {name} of shape {weights[name].shape}, update 0 has {first[name].shape}"
                )
            if weights[name].dtype != first[name].dtype:
                raise AggregationError(
                    f"update {index} has tensor {name} of dtype {weights[name].dtype}, update 0 has {first[name].dtype}"
                )


def _average(updates: Sequence[Update], *, weighted: bool) -> Weights:
    """Average every tensor, weighting by example count or not.

    Accumulates in float64 and casts back to each tensor's dtype, rounding
    integer tensors (such as batch-norm counters).

    Raises:
        AggregationError: if there are no updates, or they disagree in tensor
            names or shapes, or an example count is not positive.
    """
    _validate(updates)
    factors = [float(count) if weighted else 1.0 for _, count in updates]
    total = sum(factors)
    first, _ = updates[0]
    result: Weights = {}
    for name, reference in first.items():
        accumulator = np.zeros(reference.shape, dtype=np.float64)
        for (weights, _), factor in zip(updates, factors, strict=True):
            accumulator += weights[name].astype(np.float64) * (factor / total)
        if not np.issubdtype(reference.dtype, np.floating):
            accumulator = np.rint(accumulator)
        result[name] = accumulator.astype(reference.dtype)
    return result


def fedavg(updates: Sequence[Update]) -> Weights:
    """Example-weighted average (FedAvg)."""
    return _average(updates, weighted=True)


def mean(updates: Sequence[Update]) -> Weights:
    """Unweighted average: every worker counts the same."""
    return _average(updates, weighted=False)


AGGREGATORS: dict[str, Callable[[Sequence[Update]], Weights]] = {"fedavg": fedavg, "mean": mean}


def get_aggregator(name: str) -> Callable[[Sequence[Update]], Weights]:
    """Look up an aggregation function by its command-line name."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ConfigError(f"aggregation {name!r} is not one of {', '.join(AGGREGATORS)}") from None
