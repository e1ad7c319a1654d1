"""A worker: serves its private shard over websockets, never the data itself.

Each connection is a session that starts with ``hello``. Requests are served
concurrently and answered by id; training and evaluation run in a thread,
one at a time, so the event loop keeps answering pings and other requests.
A bad request gets an error reply and the worker keeps serving.

The rooms: :mod:`.server` (who is let in, one session per connection),
:mod:`.session` (one connection: its rules applied, its requests dispatched
by kind), :mod:`.compute` (the training thread, SCAFFOLD and DP-SGD state),
:mod:`.catalog` (the models it builds, cached), :mod:`.secure_steps` (the
four secure aggregation steps), :mod:`.holdings` (the data sets it serves,
bundled or its own) and :mod:`.handle` (a worker started from Python). The
session's rules themselves are pure: :mod:`syncfed.protocol.session_rules`.

Usage::

    config = WorkerConfig("alice", port=8777)
    asyncio.run(run_worker(config, load_holdings(config)))
"""

from __future__ import annotations

from ..exceptions import RequestFailed
from .handle import WorkerHandle, serve_worker, start_worker
from .holdings import (
    Holding,
    Served,
    SourceHolding,
    advertised_holdings,
    hold_source,
    load_holdings,
    load_shard,
    model_factories,
)
from .server import LOOPBACK, Worker, run_worker, serving

__all__ = [
    "LOOPBACK",
    "Holding",
    "RequestFailed",
    "Served",
    "SourceHolding",
    "Worker",
    "WorkerHandle",
    "advertised_holdings",
    "hold_source",
    "load_holdings",
    "load_shard",
    "model_factories",
    "run_worker",
    "serve_worker",
    "serving",
    "start_worker",
]
