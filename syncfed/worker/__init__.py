"""A worker: serves its private shard over websockets, never the data itself (see :mod:`.server`)."""

from __future__ import annotations

from .server import Holding, RequestFailed, Worker, load_holdings, load_shard, model_factories, run_worker

__all__ = ["Holding", "RequestFailed", "Worker", "load_holdings", "load_shard", "model_factories", "run_worker"]
