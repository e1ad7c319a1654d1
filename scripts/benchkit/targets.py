"""Issues 9's and 20's targets, judged from one run's figures: each met or not, with its measured value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from syncfed.config import DEFAULT_RECEIVE_SLOTS

from .plan import Plan

__all__ = ["Target", "targets"]


@dataclass(frozen=True)
class Target:
    """One of issue 9's targets: the measured ``value`` against its ``limit``, and the verdict."""

    name: str
    value: float
    limit: float
    met: bool
    text: str


def targets(plan: Plan, results: Mapping[str, Any]) -> list[Target]:
    """Issues 9's and 20's targets, from this run's figures: each met or not, with its measured value."""
    found = []
    overhead_rows = {row["model"]: row for row in results.get("overhead", {}).get("rows", [])}
    for model, limit in (("digits-cnn", 1.3), (plan.mlp, 1.3)):
        if model in overhead_rows:
            ratio = overhead_rows[model]["ratio"]
            found.append(Target(f"{model} overhead", ratio, limit, ratio <= limit, f"{ratio:.2f}x the plain loop"))
    for row in results.get("flower", {}).get("rows", []):
        if row["model"] == plan.mlp and "flower_over_syncfed" in row:
            speedup = row["flower_over_syncfed"]
            found.append(Target(f"{plan.mlp} vs Flower", speedup, 5.0, speedup >= 5.0, f"{speedup:.2f}x faster"))
    for row in results.get("transfer", {}).get("rows", []):
        if row["model"] in ("mlp-10m", "mlp-100m"):
            share = row["of_socket"]
            found.append(
                Target(f"{row['model']} transfer", share, 0.5, share >= 0.5, f"{share:.0%} of the loopback socket")
            )
        if row["model"] == "mlp-10m":
            used = row["coordinator_cpu_s"]
            found.append(Target("coordinator CPU per 10M transfer round", used, 0.08, used <= 0.08, f"{used:.3f} s"))
    memory_rows = [  # the defaults: two receive slots, updates folded from their fragments
        row
        for row in results.get("memory", {}).get("rows", [])
        if row["receive_slots"] == DEFAULT_RECEIVE_SLOTS and row.get("fold", "fragments") == "fragments"
    ]
    if memory_rows and memory_rows[-1]["workers"] >= 30:
        row, fewest = memory_rows[-1], memory_rows[0]
        found.append(
            Target(
                f"coordinator memory, {row['workers']} workers",
                row["models"],
                4.0,
                row["models"] <= 4.0,
                f"{row['models']:.1f}x the model above baseline",
            )
        )
        # Flat: within half a model of the fewest workers' peak, about what the peaks vary between runs.
        growth = row["models"] - fewest["models"]
        found.append(
            Target(
                f"coordinator memory flat, {fewest['workers']} to {row['workers']} workers",
                growth,
                0.5,
                growth <= 0.5,
                f"{growth:+.1f} model sizes",
            )
        )
    scale_result = results.get("scale", {})
    scale_rows = scale_result.get("rows", [])
    if scale_rows and scale_rows[-1]["workers"] >= 100:
        # Roughly linear: the last step's cost per added worker at most twice the fitted slope.
        last = scale_rows[-1]["per_added_worker_s"]
        slope = scale_result["slope_s_per_worker"]
        ratio = last / slope if slope > 0 else math.inf
        found.append(
            Target(
                "100 workers, linear growth",
                ratio,
                2.0,
                ratio <= 2.0,
                f"completed; last step {last * 1000:.2f} ms per worker, fit {slope * 1000:.2f} ms",
            )
        )
    return found
