"""A worker's server: who is let in, and one session per connection, until cancelled.

Usage::

    config = WorkerConfig("alice", port=8777)
    asyncio.run(run_worker(config, load_holdings(config)))
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .. import auth
from ..admission import Admission
from ..config import WorkerConfig
from ..datasets import Dataset
from ..exceptions import ConfigError
from ..fit_ledger import FitLedger
from ..net.reader import ChunkedServerConnection
from ..net.transport import common_name, connection_options, server_tls
from ..policy import SitePolicy, load_policy
from ..protocol import Info
from .compute import Compute
from .holdings import Holding, Served
from .session import Session

__all__ = ["LOOPBACK", "Worker", "run_worker", "serving"]

logger = logging.getLogger("syncfed.worker")


LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Worker:
    """Serves fit, evaluate, describe, query, hello and ping requests over its data."""

    def __init__(self, config: WorkerConfig, data: Dataset | Sequence[Served]) -> None:
        """``data``: the worker's holdings (the first is its default), or one data set served as is.

        Raises:
            ConfigError: if there is no data set, or two share a name.
        """
        self.config = config
        self.holdings: list[Served] = [Holding(data)] if isinstance(data, Dataset) else list(data)
        if not self.holdings:
            raise ConfigError("a worker needs at least one data set")
        self.named = {holding.spec.key: holding for holding in self.holdings if holding.spec is not None}
        if len(self.named) != sum(holding.spec is not None for holding in self.holdings):
            raise ConfigError("two of the worker's data sets share a key")
        self._catalog = tuple(holding.describe(config.withhold_histogram) for holding in self.named.values())
        self.compute = Compute(config, self.holdings, self.named)
        # Slots go to authenticated connections only; see Session.run() for what authenticates one.
        self.admission: Admission[Session] = Admission(
            max_connections=config.max_connections, max_pending=config.max_pending_connections
        )
        self.token = auth.read_token(config.auth_token_file) if config.auth_token_file is not None else None
        self.policy: SitePolicy | None = load_policy(config.policy) if config.policy is not None else None
        self.ledger = FitLedger()  # the fits served per job, which a policy bounds by the job's rounds
        # What a policy's data_keys call the data set a request naming none uses: its key, or its data set's name.
        default = self.holdings[0]
        self.default_key = default.spec.key if default.spec is not None else self.info().dataset

    def data_key(self, dataset_key: str | None) -> str:
        """The name a site policy knows the data set a request uses by (see ``default_key``)."""
        return dataset_key if dataset_key is not None else self.default_key

    def info(self) -> Info:
        """What hello answers: who this worker is, what it holds and which models it builds."""
        return Info(
            worker_id=self.config.worker_id,
            role=self.config.role,
            models=self.compute.catalog.names,
            datasets=self._catalog,
            # The data set it serves when a request names none.
            **self.holdings[0].summary(self.config.withhold_histogram),
        )

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse the websocket handshake: HTTP 503 while ``max_connections`` authenticated
        connections are open, HTTP 403 for a client certificate whose common name is not on the allow-list.

        Connections still authenticating never cause a 503: they wait in their own queue (see ``handle``).
        """
        if self.admission.full:
            logger.warning("refused a connection: %d authenticated connections already open", self.admission.counts[0])
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if self.config.allow_coordinators:
            identity = common_name(connection.transport.get_extra_info("peercert"))
            if identity not in self.config.allow_coordinators:
                logger.warning("refused coordinator identity %r: not on the allow-list", identity)
                return connection.respond(
                    HTTPStatus.FORBIDDEN, f"coordinator identity {identity!r} is not allowed by this worker\n"
                )
        return None

    async def handle(self, connection: Connection, *, authenticated: bool = False) -> None:
        """Serve one connection until it closes; ``authenticated``: the peer already proved itself."""
        peer = "{}:{}".format(*connection.remote_address[:2]) if connection.remote_address else "?"
        session = Session(self, connection, peer)
        evicted = self.admission.arrive(session)
        if evicted is not None:  # the oldest of a full queue of unauthenticated connections
            logger.warning(
                "dropped %s: %d connections still authenticating", evicted.peer, self.config.max_pending_connections
            )
            evicted.connection.transport.abort()
        try:
            await session.run(authenticated=authenticated)
        finally:
            self.admission.leave(session)
            session.abandon()


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[tuple[Server, str]]:
    """Listen on the worker's address, TLS and handshake limits included, until the block exits.

    Yields the server and the address it is bound to (``ws://`` or ``wss://``, host and port).
    """
    config = worker.config
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_ca)
    if not config.secured and config.host not in LOOPBACK:
        logger.warning(
            "WORKER %s ACCEPTS ANY COORDINATOR ON %s: serving without client certificates or a token on an address"
            " other than loopback lets anyone who can reach it train on this data; use --tls-ca (see"
            " python -m syncfed provision) or --auth-token-file",
            config.worker_id.upper(),
            config.host,
        )
    async with serve(
        worker.handle,
        config.host,
        config.port,
        process_request=worker.admit,
        ssl=tls,
        open_timeout=config.handshake_timeout,  # the TLS handshake and the HTTP upgrade, each
        create_connection=ChunkedServerConnection,
        **connection_options(config.max_message_size),
    ) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        yield server, f"{'wss' if tls is not None else 'ws'}://{host}:{port}"


async def run_worker(
    config: WorkerConfig, data: Dataset | Sequence[Served], *, ready: Callable[[str], None] = print
) -> None:
    """Serve ``data`` (see :class:`Worker`) until cancelled; ``ready`` gets the line naming the bound address."""
    async with serving(Worker(config, data)) as (server, uri):
        ready(f"syncfed worker {config.worker_id} listening on {uri}")
        await server.serve_forever()
