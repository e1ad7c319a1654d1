"""The runs the sections time: syncfed's coordinator, the plain loop that bounds it, and profiled runs.

The coordinator runs in this process, or alone in a child of its own when its memory is measured.
"""

from __future__ import annotations

import asyncio
import cProfile
import ctypes
import dataclasses
import gc
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from syncfed.aggregation import fedavg
from syncfed.cli.allocator import keep_freed_memory
from syncfed.config import WorkerConfig
from syncfed.coordinator import Coordinator, plan_seed
from syncfed.models import MODELS, get_weights, set_weights
from syncfed.protocol import TrainingPlan
from syncfed.tensors import Weights
from syncfed.training import train
from syncfed.worker import load_shard

from .figures import Rounds, cpu_seconds, reset_peak, resident, top_lines
from .fleet import Fleet, hosts, worker_ids
from .plan import CPU, TRAINERS, Plan, initial_weights, recipe

__all__ = ["run_syncfed", "plain_loop", "max_difference", "coordinator_process", "profiled"]


async def run_syncfed(
    workers: Fleet, model: str, batches: int, rounds: int, *, profiler: cProfile.Profile | None = None
) -> tuple[Rounds, Weights]:
    """Run the coordinator in this process; its figures per round and the final weights."""
    events: list[Mapping[str, Any]] = []
    marks = [(time.process_time(), cpu_seconds(workers.pids))]

    def listen(event: Mapping[str, Any]) -> None:
        events.append(event)
        if event.get("event") == "round":
            marks.append((time.process_time(), cpu_seconds(workers.pids)))

    coordinator = Coordinator(recipe(workers.uris, model, batches, rounds), report=lambda _: None, listeners=[listen])
    if profiler is not None:
        profiler.enable()
    try:
        result = await coordinator.run()
    finally:
        if profiler is not None:
            profiler.disable()
    done = [event for event in events if event.get("event") == "round"]
    failed = [event["failed"] for event in done if event["failed"]]
    if len(done) != rounds or failed:
        raise RuntimeError(f"{model}: {len(done)} of {rounds} rounds, failures {failed}")
    return Rounds.of(done, marks), result.weights


def plain_loop(model: str, batches: int, rounds: int, threads: int) -> tuple[Rounds, Weights]:
    """The physical lower bound: the three workers' SGD steps one after another, then FedAvg; no communication.

    Same data, seeds and steps as syncfed's workers (``Worker._fit``), so it ends at the same weights.
    """
    torch.set_num_threads(threads)
    config = recipe({"plain": "ws://unused"}, model, batches, rounds)
    shards = [load_shard(WorkerConfig(name)).data for name in TRAINERS]
    weights = initial_weights(model)
    network = MODELS[model]()
    seconds, cpu = [], []
    for round_number in range(1, rounds + 1):
        started, used = time.perf_counter(), time.process_time()
        updates = []
        for index, data in enumerate(shards):
            seed = plan_seed(config.seed, round_number, index)
            plan = TrainingPlan(round_number, config.batch_size, batches, config.learning_rate(round_number), seed)
            set_weights(network, weights)
            torch.manual_seed(seed)
            train(network, data, plan, CPU)
            updates.append((get_weights(network), len(data)))
        weights = fedavg(updates)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    return Rounds(seconds, cpu=cpu), weights


def max_difference(a: Weights, b: Weights) -> float:
    return max(float(np.max(np.abs(a[name].astype(np.float64) - b[name]), initial=0.0)) for name in a)


def coordinator_process(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The memory section's coordinator, alone in its process: its rounds, and resident set before and at peak.

    The baseline is taken after the imports and the model's creation (as the
    coordinator creates it), the peak from then on.
    """
    kept = keep_freed_memory()  # as the coordinator's programs do
    weights = initial_weights(spec["model"])
    if kept:  # what glibc keeps of the model's creation is memory free for the rounds, not the baseline's
        ctypes.CDLL(None).malloc_trim(0)
    baseline, _ = resident()
    del weights
    gc.collect()
    reset_peak()
    samples: list[int] = []
    events: list[Mapping[str, Any]] = []

    def listen(event: Mapping[str, Any]) -> None:
        events.append(event)
        if event.get("event") == "round":
            samples.append(resident()[0])

    config = recipe(spec["uris"], spec["model"], spec["batches"], spec["rounds"])
    config = dataclasses.replace(config, receive_slots=spec["receive_slots"], fold_fragments=spec["fold_fragments"])
    asyncio.run(Coordinator(config, report=lambda _: None, listeners=[listen]).run())
    return {
        "baseline_rss": baseline,
        "peak_rss": resident()[1],
        "rss_after_rounds": samples,
        "rounds": Rounds.of([event for event in events if event.get("event") == "round"]).to_json(),
        "failed": [event["failed"] for event in events if event.get("event") == "round" and event["failed"]],
    }


async def profiled(plan: Plan, name: str, model: str, batches: int, rounds: int) -> dict[str, list[str]]:
    """A short extra run under cProfile: the coordinator (in this process) and worker alice (hosted alone).

    Each worker runs alone in a host process, as a worker process would;
    alice's host writes its profile when stopped.
    """
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "alice.prof"
        async with hosts([[worker] for worker in worker_ids(len(TRAINERS))], plan.threads, profile=path) as workers:
            await run_syncfed(workers, model, batches, rounds, profiler=profiler)
        return {f"the coordinator, {name}": top_lines(profiler), f"worker alice, {name}": top_lines(path)}
