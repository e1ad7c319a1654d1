"""What a benchmark run measures (the full suite or ``QUICK``) and the recipe every run trains with.

One place for both, so that syncfed, the plain loop and Flower do exactly the same work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from syncfed.config import DEFAULT_RECEIVE_SLOTS, CoordinatorConfig
from syncfed.models import MODELS, get_weights
from syncfed.tensors import Weights

__all__ = [
    "TRAINERS",
    "BATCH_SIZE",
    "SEED",
    "LR",
    "CPU",
    "HOSTED_PING_TIMEOUT",
    "Plan",
    "FULL",
    "QUICK",
    "model_bytes",
    "initial_weights",
    "recipe",
    "tasks",
]

TRAINERS = ("alice", "bob", "charlie")
#: The recipe every run shares: the demo's batch size and seed, a learning rate the MLPs train with.
BATCH_SIZE, SEED, LR = 32, 1, 0.05
#: Every run trains on the CPU: syncfed's workers, the plain loop and Flower's clients.
CPU = torch.device("cpu")

# Timeouts
HOSTED_PING_TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    """What one run measures: the full suite, or the small ``QUICK`` one."""

    cnn_batches: int = 10
    cnn_rounds: int = 12
    mlp: str = "mlp-10m"
    mlp_rounds: int = 8
    transfer: tuple[tuple[str, int], ...] = (("mlp-1m", 10), ("mlp-10m", 6), ("mlp-100m", 3))
    scale_workers: tuple[int, ...] = (3, 10, 30, 100)
    scale_rounds: int = 5
    memory_model: str = "mlp-10m"
    memory_workers: tuple[int, ...] = (3, 10, 30)
    memory_slots: tuple[int, ...] = (0, DEFAULT_RECEIVE_SLOTS)  # no flow control, then the default
    memory_whole: bool = True  # also a run that decodes each update whole (--whole-updates) at the default slots
    memory_rounds: int = 3
    copy_bytes: int = 400 * 10**6
    socket_bytes: int = 2**30
    websocket_bytes: int = 100 * 10**6
    max_processes: int = 10  # more workers than this run as asyncio servers in a few processes
    per_host: int = 25
    threads: int = 1  # torch threads of each worker, each Flower client and the plain loop
    walkthrough_rounds: int = 40  # the demo's
    accuracy_rounds: int = 80  # at most, each mode: a run stops once it reaches the target
    flower_python: str | None = None  # the interpreter of Flower's processes (a venv with flwr); None: this one


FULL = Plan()
QUICK = Plan(
    cnn_batches=2,
    cnn_rounds=3,
    mlp="mlp-1m",
    mlp_rounds=3,
    transfer=(("mlp-1m", 3),),
    scale_workers=(3, 4),
    scale_rounds=3,
    memory_model="mlp-1m",
    memory_workers=(3,),
    memory_slots=(DEFAULT_RECEIVE_SLOTS,),
    memory_rounds=2,
    copy_bytes=40 * 10**6,
    socket_bytes=100 * 10**6,
    websocket_bytes=20 * 10**6,
    max_processes=0,  # one host process for all: fewer imports of torch, and hosting gets tested
    per_host=4,
    walkthrough_rounds=3,
    accuracy_rounds=3,
)


def model_bytes(name: str) -> int:
    """Bytes of a registered model's state: what one copy on the wire carries, before framing."""
    return sum(array.nbytes for array in initial_weights(name).values())


def initial_weights(name: str) -> Weights:
    """The weights every run starts from, as the coordinator draws them."""
    torch.manual_seed(SEED)
    return get_weights(MODELS[name]())


def recipe(workers: Mapping[str, str], model: str, batches: int, rounds: int) -> CoordinatorConfig:
    """The coordinator's settings for one benchmark run; the plain loop and Flower read lr from it too."""
    return CoordinatorConfig(
        workers=dict(workers),
        evaluator={},
        model=model,
        training_rounds=rounds,
        federate_after_n_batches=batches,
        batch_size=BATCH_SIZE,
        lr=LR,
        seed=SEED,
        eval_every=rounds,
        # Pings every second as by default; a pong may be late behind the messages of the
        # 24 other workers of a host process (this is a benchmark, not a liveness test).
        ping_timeout=HOSTED_PING_TIMEOUT,
    )


def tasks(plan: Plan) -> list[tuple[str, int, int]]:
    """The overhead section's tasks, which Flower runs too: (model, local batches, rounds)."""
    return [("digits-cnn", plan.cnn_batches, plan.cnn_rounds), (plan.mlp, 1, plan.mlp_rounds)]
