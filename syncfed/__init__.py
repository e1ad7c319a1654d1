"""syncfed: federated learning over asyncio websockets.

Workers keep their data; a coordinator sends them the model and a training
plan, aggregates their updates and has an evaluator score the result.

The names below are the stable API for embedding syncfed in Python (see
``docs/api.md``)::

    from syncfed import Coordinator, CoordinatorConfig

    config = CoordinatorConfig(workers={"alice": "ws://127.0.0.1:8777"}, evaluator={}, training_rounds=5)
    result = await Coordinator(config).run()  # inside a coroutine, or through asyncio.run

They are loaded on first use, so that ``import syncfed.tensors`` (or any
other pure module) loads neither the protocol nor the networking layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exceptions import SyncfedError
from .lazy import lazy_names

if TYPE_CHECKING:  # the lazily loaded names, for type checkers (re-exported through __getattr__)
    from .config import CoordinatorConfig, WorkerConfig  # noqa: F401
    from .coordinator import Coordinator, RunResult  # noqa: F401
    from .data.sources import load_data  # noqa: F401
    from .datasets import Dataset, load_dataset  # noqa: F401
    from .protocol import PROTOCOL_VERSION  # noqa: F401
    from .strategies import (  # noqa: F401
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
    from .worker import Holding, WorkerHandle, load_holdings, run_worker, serve_worker, start_worker  # noqa: F401

__version__ = "0.1.0"

#: The stable names, by the module they live in (see docs/api.md).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "protocol": ("PROTOCOL_VERSION",),
    "config": ("WorkerConfig", "CoordinatorConfig"),
    "worker": ("run_worker", "load_holdings", "Holding", "start_worker", "serve_worker", "WorkerHandle"),
    "datasets": ("Dataset", "load_dataset"),
    "data.sources": ("load_data",),
    "coordinator": ("Coordinator", "RunResult"),
    "strategies": (
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
    ),
}
_HOMES = {name: f".{module}" for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", "SyncfedError", *_HOMES]

__getattr__, __dir__ = lazy_names(globals(), _HOMES)
