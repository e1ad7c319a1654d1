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

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:  # the lazily loaded names, for type checkers (re-exported through __getattr__)
    from ..exceptions import RequestFailed
    from .catalog import model_factories
    from .handle import WorkerHandle, serve_worker, start_worker
    from .holdings import Holding, Served, SourceHolding, advertised_holdings, hold_source, load_holdings, load_shard
    from .server import LOOPBACK, Worker, run_worker, serving

#: Each name, by the module it lives in. Loaded on first use: the worker's program reads its data
#: (:mod:`.holdings`) and stops on a bad file before anything loads torch.
_HOMES: dict[str, str] = {
    "LOOPBACK": ".server",
    "Holding": ".holdings",
    "RequestFailed": "..exceptions",
    "Served": ".holdings",
    "SourceHolding": ".holdings",
    "Worker": ".server",
    "WorkerHandle": ".handle",
    "advertised_holdings": ".holdings",
    "hold_source": ".holdings",
    "load_holdings": ".holdings",
    "load_shard": ".holdings",
    "model_factories": ".catalog",
    "run_worker": ".server",
    "serve_worker": ".handle",
    "serving": ".server",
    "start_worker": ".handle",
}

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


__getattr__, __dir__ = lazy_names(globals(), _HOMES)
