"""A worker started from Python over a user's own data: in a notebook, whose event loop already runs, or in a script.

Usage, in Jupyter (top-level ``await``)::

    from syncfed import load_data, start_worker

    source = load_data((x, y))  # or a spec such as "csv:claims.csv" with label_column="fraud"
    alice = await start_worker("alice", source, port=0)
    print(alice.uri)  # give it to the coordinator
    await alice.stop()

and in a script, which it blocks until Ctrl-C::

    serve_worker("alice", source, port=8777)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from ..config import WorkerConfig
from ..data.base import Source, SourceOptions
from ..datasets import Dataset
from ..exceptions import ConfigError
from .holdings import Holding, Served, hold_source, load_holdings
from .server import Worker, run_worker, serving

__all__ = ["WorkerHandle", "start_worker", "serve_worker"]

logger = logging.getLogger("syncfed.worker")

#: What a worker started from Python serves: a source (``load_data``), a spec such as ``csv:claims.csv``
#: (read with ``options``), or a :class:`~syncfed.datasets.Dataset` served as it is.
Data = Source | str | os.PathLike[str] | Dataset


class WorkerHandle:
    """A worker serving in this event loop, as :func:`start_worker` returns it: where it listens, and its stop."""

    def __init__(self, worker: Worker, uri: str, stack: AsyncExitStack) -> None:
        self.worker = worker
        self.uri = uri  # ws://host:port, the port bound when 0 was asked for
        self._stack = stack

    @property
    def worker_id(self) -> str:
        return self.worker.config.worker_id

    async def stop(self) -> None:
        """Close the worker's connections and stop listening; a second call does nothing."""
        await self._stack.aclose()

    async def __aenter__(self) -> WorkerHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.worker_id} at {self.uri}>"


def _setup(
    worker_id: str, data: Data, host: str, port: int, options: SourceOptions | None, settings: dict[str, Any]
) -> tuple[WorkerConfig, list[Served]]:
    """The worker's config and what it serves, read and checked whole (as the command line does at start).

    Raises:
        ConfigError: if a setting is invalid, or ``data`` is none of :data:`Data`.
        DatasetError: if the data cannot be read.
    """
    spec = os.fspath(data) if isinstance(data, str | os.PathLike) else None
    config = WorkerConfig(
        worker_id, host=host, port=port, data=spec, source_options=options or SourceOptions(), **settings
    )
    if isinstance(data, str | os.PathLike):
        return config, load_holdings(config)
    if isinstance(data, Dataset):
        return config, [Holding(data)]
    if not all(hasattr(data, name) for name in ("schema", "prepare", "labels", "fingerprint")):
        raise ConfigError(f"a worker serves a source (load_data), a data spec or a Dataset, not {type(data).__name__}")
    return config, [hold_source(config, data)]


async def start_worker(
    worker_id: str,
    data: Data,
    *,
    host: str = "localhost",
    port: int = 8777,
    options: SourceOptions | None = None,
    **settings: Any,
) -> WorkerHandle:
    """Start worker ``worker_id`` serving ``data`` in the running event loop, and return once it listens.

    ``port`` 0 picks a free one (see :attr:`WorkerHandle.uri`); ``options``
    read a data spec; ``settings`` are further :class:`~syncfed.config.WorkerConfig`
    fields (``testing=True``, ``val_fraction=0.2``, ``auth_token_file=...``).
    The data is read in a thread, so a notebook's loop stays free meanwhile.

    Raises:
        ConfigError: if a setting is invalid.
        DatasetError: if the data cannot be read.
        OSError: if the address cannot be bound.
    """
    config, holdings = await asyncio.to_thread(_setup, worker_id, data, host, port, options, settings)
    worker = Worker(config, holdings)
    stack = AsyncExitStack()
    _, uri = await stack.enter_async_context(serving(worker))
    logger.info("syncfed worker %s listening on %s", worker_id, uri)
    return WorkerHandle(worker, uri, stack)


def serve_worker(
    worker_id: str,
    data: Data,
    *,
    host: str = "localhost",
    port: int = 8777,
    options: SourceOptions | None = None,
    ready: Callable[[str], None] = print,
    **settings: Any,
) -> None:
    """Serve ``data`` as worker ``worker_id`` until Ctrl-C: :func:`start_worker` for a script, which it blocks.

    ``ready`` gets the line naming the bound address.

    Raises:
        ConfigError: if a setting is invalid, or an event loop already runs in this thread (use :func:`start_worker`).
        DatasetError: if the data cannot be read.
        OSError: if the address cannot be bound.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ConfigError(
            "serve_worker blocks, and this thread already runs an event loop (a notebook):"
            " use worker = await start_worker(...) there"
        )
    config, holdings = _setup(worker_id, data, host, port, options, settings)
    try:
        asyncio.run(run_worker(config, holdings, ready=ready))
    except KeyboardInterrupt:
        logger.info("worker %s stopped", worker_id)
