"""Sections 1 to 4: syncfed's overhead, transfer, scale and coordinator memory.

Each runs over the three workers started once for all four (``trio``), prints its table and returns its
figures.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np

from syncfed.config import DEFAULT_RECEIVE_SLOTS

from .figures import MB, print_table, steady
from .fleet import Fleet, fleet
from .limits import SOCKET
from .plan import Plan, model_bytes, tasks
from .processes import child
from .runs import max_difference, plain_loop, profiled, run_syncfed

__all__ = ["overhead", "transfer", "scale", "memory"]


async def overhead(plan: Plan, trio: Fleet, profile: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    profiles = {}
    for model, batches, rounds in tasks(plan):
        plain, plain_weights = plain_loop(model, batches, rounds, plan.threads)
        figures, weights = await run_syncfed(trio, model, batches, rounds)
        rows.append(
            {
                "model": model,
                "batches": batches,
                "rounds": rounds,
                "plain": plain.to_json(),
                "plain_s": plain.median,
                "syncfed": figures.to_json(),
                "syncfed_s": figures.median,
                "ratio": figures.median / plain.median,
                "cpu_ratio": figures.median_cpu / plain.median_cpu,
                "same_weights_max_abs_diff": max_difference(weights, plain_weights),
            }
        )
        if profile and model == plan.mlp:
            profiles.update(await profiled(plan, f"overhead {model}", model, batches, min(rounds, 3)))
    print_table(
        f"1. Overhead: median seconds per round, 3 workers ({trio.hosting}) against the plain loop;"
        " CPU: seconds of all processes, the coordinator's in brackets",
        [
            "model",
            "batches",
            "plain s",
            "syncfed s",
            "syncfed/plain",
            "plain CPU",
            "syncfed CPU",
            "CPU ratio",
            "same weights",
        ],
        [
            [
                r["model"],
                r["batches"],
                f"{r['plain_s']:.3f}",
                f"{r['syncfed_s']:.3f}",
                f"{r['ratio']:.2f}x",
                f"{r['plain']['median_cpu_s']:.2f}",
                f"{r['syncfed']['median_cpu_s']:.2f} ({steady(r['syncfed']['cpu']):.2f})",
                f"{r['cpu_ratio']:.2f}x",
                f"max |diff| {r['same_weights_max_abs_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    return {"hosting": trio.hosting, "rows": rows, "profiles": profiles}


async def transfer(plan: Plan, trio: Fleet, physical: Mapping[str, float], profile: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    profiles = {}
    for model, rounds in plan.transfer:
        figures, _ = await run_syncfed(trio, model, 0, rounds)
        size = model_bytes(model)
        moved = statistics.median(s + r for s, r in zip(figures.bytes_sent, figures.bytes_received, strict=True))
        rate = moved / figures.median / MB
        rows.append(
            {
                "model": model,
                "model_bytes": size,
                "rounds": figures.to_json(),
                "seconds": figures.median,
                "coordinator_cpu_s": steady(figures.cpu),
                "workers_cpu_s": steady(figures.workers_cpu),
                "framing_overhead": moved / (2 * len(trio.uris) * size) - 1,
                "MBps": rate,
                "of_socket": rate / physical[SOCKET],
            }
        )
        if profile and model == plan.transfer[-1][0]:
            profiles.update(await profiled(plan, f"transfer {model}", model, 0, min(rounds, 2)))
    print_table(
        f"2. Transfer: rounds of no training, 3 workers ({trio.hosting}); both directions' bytes over the round time",
        ["model", "MB per copy", "s per round", "MB/s", "of socket", "coordinator CPU s", "workers CPU s", "framing"],
        [
            [
                r["model"],
                f"{r['model_bytes'] / MB:.1f}",
                f"{r['seconds']:.3f}",
                f"{r['MBps']:.0f}",
                f"{r['of_socket']:.0%}",
                f"{r['coordinator_cpu_s']:.3f}",
                f"{r['workers_cpu_s']:.3f}",
                f"{r['framing_overhead']:+.4%}",
            ]
            for r in rows
        ],
    )
    return {"hosting": trio.hosting, "rows": rows, "profiles": profiles}


async def scale(plan: Plan, trio: Fleet) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for count in plan.scale_workers:
        async with contextlib.AsyncExitStack() as stack:
            workers = trio if count == len(trio.uris) else await stack.enter_async_context(fleet(count, plan))
            figures, _ = await run_syncfed(workers, "digits-cnn", 1, plan.scale_rounds)
        rows.append(
            {"workers": count, "hosting": workers.hosting, "rounds": figures.to_json(), "seconds": figures.median}
        )
    counts = np.array([r["workers"] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    slope, intercept = np.polyfit(counts, seconds, 1) if len(rows) > 1 else (0.0, float(seconds[0]))
    fitted = slope * counts + intercept
    spread = float(np.sum((seconds - seconds.mean()) ** 2))
    r2 = 1 - float(np.sum((seconds - fitted) ** 2)) / spread if spread > 0 else 1.0
    for previous, row in zip(rows, rows[1:], strict=False):
        row["per_added_worker_s"] = (row["seconds"] - previous["seconds"]) / (row["workers"] - previous["workers"])
    print_table(
        f"3. Scale: digits CNN, 1 batch, median seconds per round (linear fit: {slope * 1000:.2f} ms per worker,"
        f" R^2 {r2:.3f})",
        ["workers", "hosted as", "s per round", "s per added worker"],
        [
            [
                r["workers"],
                r["hosting"],
                f"{r['seconds']:.3f}",
                f"{r['per_added_worker_s']:.4f}" if "per_added_worker_s" in r else "",
            ]
            for r in rows
        ],
    )
    return {"rows": rows, "slope_s_per_worker": float(slope), "intercept_s": float(intercept), "r2": r2}


async def memory(plan: Plan, trio: Fleet) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    size = model_bytes(plan.memory_model)
    for count in plan.memory_workers:
        async with contextlib.AsyncExitStack() as stack:
            workers = trio if count == len(trio.uris) else await stack.enter_async_context(fleet(count, plan))
            runs = [(slots, True) for slots in plan.memory_slots]
            runs += [(DEFAULT_RECEIVE_SLOTS, False)] if plan.memory_whole else []
            for slots, fragments in runs:
                spec = {
                    "uris": workers.uris,
                    "model": plan.memory_model,
                    "batches": 0,
                    "rounds": plan.memory_rounds,
                    "receive_slots": slots,
                    "fold_fragments": fragments,
                }
                figures = await child("coordinator", spec)
                if figures["failed"]:
                    raise RuntimeError(f"memory, {count} workers, {slots} slots: failures {figures['failed']}")
                excess = figures["peak_rss"] - figures["baseline_rss"]
                rows.append(
                    {
                        "workers": count,
                        "receive_slots": slots,
                        "fold": "fragments" if fragments else "whole",
                        "hosting": workers.hosting,
                        **figures,
                        "excess": excess,
                        "models": excess / size,
                    }
                )
    print_table(
        f"4. Coordinator memory: {plan.memory_model} ({size / MB:.0f} MB), rounds of no training, coordinator alone"
        " in its process; receive slots 0 is no flow control; updates folded from their fragments as they arrive,"
        " or decoded whole first (--whole-updates)",
        [
            "workers",
            "receive slots",
            "updates",
            "hosted as",
            "baseline MB",
            "peak MB",
            "peak - baseline",
            "in model sizes",
        ],
        [
            [
                r["workers"],
                r["receive_slots"],
                r["fold"],
                r["hosting"],
                f"{r['baseline_rss'] / MB:.0f}",
                f"{r['peak_rss'] / MB:.0f}",
                f"{r['excess'] / MB:.0f} MB",
                f"{r['models']:.1f}x",
            ]
            for r in rows
        ],
    )
    return {"model": plan.memory_model, "model_bytes": size, "rows": rows}
