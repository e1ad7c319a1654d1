"""What a run's outputs say about each worker: under secure aggregation, totals only.

With ``--secure-agg`` the coordinator is to learn the sum of the updates, not
who holds what. Its metrics file, log lines, model registry and TensorBoard
scalars travel further than the coordinator process, so under secure
aggregation they carry totals only: the examples summed and the mean training
loss, never one worker's example count, class histogram or loss. What the
coordinator process itself still receives is listed in ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .partition import group_label
from .protocol import Info

__all__ = ["held_classes", "holdings", "losses_text", "round_figures"]


def held_classes(info: Info) -> list[int]:
    """The classes a worker says it holds; none when it withholds its histogram."""
    return [label for label, count in enumerate(info.histogram or ()) if count > 0]


def holdings(info: Info, *, secure: bool) -> str:
    """How the coordinator's log describes a worker's data, after "<worker> holds"."""
    if secure or info.histogram is None:
        return f"data set {info.dataset} (its size and classes are not logged under --secure-agg or when withheld)"
    if info.schema is not None and info.schema.classes is not None:
        named = ", ".join(info.schema.classes[label] for label in held_classes(info))
        return f"{info.num_examples} examples of its own {info.dataset} (classes {named})"
    return f"{info.num_examples} examples of {info.dataset} (classes {group_label(held_classes(info))})"


def losses_text(losses: Mapping[str, float], *, secure: bool) -> str:
    """The training losses of a round for a log line: each worker's, or their mean under secure aggregation."""
    if secure:
        return f"mean {_mean(losses):.4f} over {len(losses)} workers"
    return ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items())


def round_figures(
    losses: Mapping[str, float], examples: Mapping[str, int], *, secure: bool, total: int | None
) -> dict[str, Any]:
    """The loss and example fields of a round's metrics event.

    ``total``: the example count a secure round's unmasked sum holds (None
    when it sums equal weights). Without secure aggregation: per worker.
    """
    if not secure:
        return {"train_loss": dict(losses), "num_examples": dict(examples)}
    return {"train_loss_mean": _mean(losses), **({"total_examples": total} if total is not None else {})}


def _mean(losses: Mapping[str, float]) -> float:
    return math.fsum(losses.values()) / len(losses) if losses else math.nan
