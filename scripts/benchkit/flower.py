"""Flower, an optional extra: its server and clients as children of bench.py, and section 5.

flwr is imported only in those children, which run under ``--flower-python`` when given: it is never a
dependency of syncfed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from syncfed.config import CoordinatorConfig, WorkerConfig
from syncfed.coordinator import plan_seed
from syncfed.models import MODELS, get_weights, set_weights
from syncfed.protocol import TrainingPlan
from syncfed.training import evaluate, train
from syncfed.worker import load_shard

from .figures import Rounds, print_table
from .plan import CPU, LR, TRAINERS, Plan, initial_weights, recipe, tasks
from .processes import STARTUP_TIMEOUT, child, free_port, listening

__all__ = [
    "FLOWER_LIMIT",
    "FLOWER_ENV",
    "FLOWER_EVALUATION",
    "flower_server",
    "flower_evaluation",
    "flower_client",
    "flower_version",
    "flower_clients",
    "run_flower",
    "flower",
]

#: Flower's gRPC message limit on both sides: 512 MiB, as syncfed's default.
FLOWER_LIMIT = 512 * 2**20
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FLOWER_EVALUATION = "FLOWER-EVALUATION"  # the Flower server's line after each round's evaluation


def flower_server(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's legacy gRPC server with FedAvg over three clients, timing each round from send to aggregate."""
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    started: list[float] = []
    seconds: list[float] = []
    failures: list[int] = []

    class Timed(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            started.append(time.perf_counter())  # after sampling, which waits for clients to connect
            return instructions

        def aggregate_fit(self, server_round: int, results: Any, failed: Any) -> Any:
            aggregated = super().aggregate_fit(server_round, results, failed)
            seconds.append(time.perf_counter() - started[-1])
            failures.append(len(failed))
            return aggregated

    torch.set_num_threads(spec["threads"])  # its evaluation on one thread, as the syncfed evaluator's share
    weights = initial_weights(spec["model"])
    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=len(TRAINERS),
        min_available_clients=len(TRAINERS),
        initial_parameters=ndarrays_to_parameters(list(weights.values())),
        on_fit_config_fn=lambda server_round: {"round": server_round},
        evaluate_fn=flower_evaluation(spec["model"]) if spec["evaluate"] else None,
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{spec['port']}",
        config=fl.server.ServerConfig(num_rounds=spec["rounds"]),
        strategy=strategy,
        grpc_max_message_length=FLOWER_LIMIT,
    )
    return {"seconds": seconds, "failures": failures, "version": fl.__version__}


def flower_evaluation(model_name: str) -> Callable[[int, list[np.ndarray], Any], tuple[float, dict[str, float]] | None]:
    """Flower's server-side evaluation on the demo evaluator's test set, each round's accuracy printed at once."""
    model = MODELS[model_name]()
    names = list(model.state_dict())
    data = load_shard(WorkerConfig("testing", testing=True)).data

    def evaluate_fn(
        server_round: int, parameters: list[np.ndarray], config: Any
    ) -> tuple[float, dict[str, float]] | None:
        if server_round == 0:  # the initial model, which syncfed's runs do not evaluate either
            return None
        set_weights(model, dict(zip(names, parameters, strict=True)))
        outcome = evaluate(model, data, CoordinatorConfig.test_batch_size, CPU)
        print(f"{FLOWER_EVALUATION} {server_round} {outcome.correct} {outcome.num_examples}", flush=True)
        return outcome.loss, {"accuracy": outcome.correct / outcome.num_examples}

    return evaluate_fn


def flower_client(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Flower client doing exactly the local work of the syncfed worker of the same name."""
    import flwr as fl

    torch.set_num_threads(spec["threads"])
    name, index, batches = spec["name"], spec["index"], spec["batches"]
    config = dataclasses.replace(recipe({name: "ws://unused"}, spec["model"], batches, spec["rounds"]), lr=spec["lr"])
    data = load_shard(WorkerConfig(name)).data
    model = MODELS[spec["model"]]()
    names = list(model.state_dict())

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return list(get_weights(model).values())

        def fit(self, parameters: list[np.ndarray], settings: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            round_number = int(settings["round"])
            seed = plan_seed(config.seed, round_number, index)
            plan = TrainingPlan(round_number, config.batch_size, batches, config.learning_rate(round_number), seed)
            set_weights(model, dict(zip(names, parameters, strict=True)))
            torch.manual_seed(seed)
            train(model, data, plan, CPU)
            return list(get_weights(model).values()), len(data), {}

    fl.client.start_client(
        server_address=f"127.0.0.1:{spec['port']}",
        client=Client().to_client(),
        grpc_max_message_length=FLOWER_LIMIT,
        insecure=True,
        transport="grpc-bidi",
    )
    return {}


@functools.cache
def flower_version(python: str | None) -> str | None:
    """Flower's version under ``python`` (this interpreter when None); None where it is not installed.

    Asked once per run, for the Flower and the accuracy sections alike.

    Raises:
        RuntimeError: if ``python`` is named but flwr does not import under it.
    """
    if python is None:
        try:
            import flwr
        except ImportError:
            return None
        return str(flwr.__version__)
    probe = subprocess.run(
        [python, "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        env={**os.environ, **FLOWER_ENV},
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"--flower-python {python}: flwr does not import: {last}")
    return probe.stdout.strip()


def flower_clients(spec: Mapping[str, Any], python: str | None) -> list[asyncio.Task[dict[str, Any]]]:
    """The three Flower clients, each a process of its own, as the syncfed trainers of the same names."""
    return [
        asyncio.create_task(
            child("flower-client", {**spec, "name": name, "index": index}, env=FLOWER_ENV, python=python)
        )
        for index, name in enumerate(TRAINERS)
    ]


async def run_flower(model: str, batches: int, rounds: int, plan: Plan) -> Rounds:
    """Flower's server and three clients, each a process of its own, on a free 127.0.0.1 port."""
    port = free_port()
    spec = {
        "model": model,
        "batches": batches,
        "rounds": rounds,
        "port": port,
        "threads": plan.threads,
        "lr": LR,
        "evaluate": False,
    }
    server = asyncio.create_task(child("flower-server", spec, env=FLOWER_ENV, python=plan.flower_python))
    await listening(port, server.done)
    clients = flower_clients(spec, plan.flower_python)
    try:
        figures = await server
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
    if len(figures["seconds"]) != rounds or any(figures["failures"]):
        raise RuntimeError(f"flower {model}: rounds {figures['seconds']}, failures {figures['failures']}")
    return Rounds(figures["seconds"])


async def flower(plan: Plan, results: Mapping[str, Any]) -> dict[str, Any]:
    version = flower_version(plan.flower_python)
    if version is None:
        print("\n5. Flower: skipped (install flwr in another venv and pass --flower-python to compare)")
        return {"skipped": "flwr is not installed"}
    syncfed = {row["model"]: row["syncfed_s"] for row in results.get("overhead", {}).get("rows", [])}
    rows: list[dict[str, Any]] = []
    for model, batches, rounds in tasks(plan):
        figures = await run_flower(model, batches, rounds, plan)
        row: dict[str, Any] = {
            "model": model,
            "batches": batches,
            "rounds": figures.to_json(),
            "flower_s": figures.median,
        }
        if model in syncfed:
            row["syncfed_s"] = syncfed[model]
            row["flower_over_syncfed"] = figures.median / syncfed[model]
        rows.append(row)
    print_table(
        f"5. Flower {version} legacy gRPC (start_server/start_client, 3 client processes): median s per round",
        ["model", "batches", "Flower s", "syncfed s", "Flower/syncfed"],
        [
            [
                r["model"],
                r["batches"],
                f"{r['flower_s']:.4f}",
                f"{r['syncfed_s']:.4f}" if "syncfed_s" in r else "-",
                f"{r['flower_over_syncfed']:.2f}x" if "syncfed_s" in r else "-",
            ]
            for r in rows
        ],
    )
    return {"version": version, "rows": rows}
