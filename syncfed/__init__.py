"""syncfed: federated learning over asyncio websockets.

Workers keep their data; a coordinator sends them the model and a training
plan, aggregates their updates and has an evaluator score the result.

The names below are the stable API for embedding syncfed in Python (see
``docs/api.md``)::

    from syncfed import Coordinator, CoordinatorConfig

    config = CoordinatorConfig(workers={"alice": "ws://127.0.0.1:8777"}, evaluator={}, training_rounds=5)
    result = await Coordinator(config).run()  # inside a coroutine, or through asyncio.run

They are loaded on first use, so that ``import syncfed.tensors`` (or any
other pure module) does not start the networking layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import SyncfedError
from .protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from .config import CoordinatorConfig, WorkerConfig
    from .coordinator import Coordinator, RunResult
    from .datasets import Dataset, load_dataset
    from .strategies import (
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedProx,
        FedYogi,
        Krum,
        Mean,
        MeanStrategy,
        Median,
        MultiKrum,
        Scaffold,
        Strategy,
        TrimmedMean,
        make_strategy,
    )
    from .worker import Holding, load_holdings, run_worker

__all__ = [
    "__version__",
    "PROTOCOL_VERSION",
    "SyncfedError",
    # Running a worker
    "WorkerConfig",
    "run_worker",
    "load_holdings",
    "Holding",
    "Dataset",
    "load_dataset",
    # Running a coordinator
    "CoordinatorConfig",
    "Coordinator",
    "RunResult",
    # Strategies
    "Strategy",
    "MeanStrategy",
    "make_strategy",
    "FedAvg",
    "Mean",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "Scaffold",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
]

__version__ = "0.1.0"

#: Where each lazily loaded name lives.
_HOMES: dict[str, str] = {
    "WorkerConfig": "config",
    "CoordinatorConfig": "config",
    "run_worker": "worker",
    "load_holdings": "worker",
    "Holding": "worker",
    "Dataset": "datasets",
    "load_dataset": "datasets",
    "Coordinator": "coordinator",
    "RunResult": "coordinator",
    **{
        name: "strategies"
        for name in (
            "Strategy",
            "MeanStrategy",
            "make_strategy",
            "FedAvg",
            "Mean",
            "FedProx",
            "FedAvgM",
            "FedAdam",
            "FedYogi",
            "FedAdagrad",
            "Scaffold",
            "Median",
            "TrimmedMean",
            "Krum",
            "MultiKrum",
        )
    },
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'syncfed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
