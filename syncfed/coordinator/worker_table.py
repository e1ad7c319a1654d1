"""The job service's workers: one link each that outlives the jobs, their listener, and what each said of itself.

A worker dials in once and stays: the table greets it (hello: its role, its
data, its protocol), lends its link to the jobs that use it, and while it
serves none pings it, so that ``last_seen`` and ``rtt_ms`` stay current.
While a job holds a link, the job's pool reconnects it after a loss, and the
table only reads the figures the link's keepalive pings keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from ..disclosure import holdings
from ..exceptions import ProtocolError, RemoteError, WorkerTimeout, WorkerUnavailable
from ..net.dial_in import DialInLink, DialInListener
from ..net.link import latency, ping
from ..service_api import WorkerRecord
from .pool import greet

__all__ = ["WorkerTable"]

logger = logging.getLogger("syncfed.service")


class WorkerTable:
    """The service's dial-in workers, keyed by id.

    Usage::

        table = WorkerTable(links, listener, report=print)
        uri = await table.open()
        ...
        await table.close()
    """

    def __init__(
        self,
        links: Mapping[str, DialInLink],
        listener: DialInListener,
        *,
        report: Callable[[str], None],
        on_change: Callable[[], None] = lambda: None,
        # Timeouts
        hello_timeout: float = 30.0,
        ping_interval: float = 20.0,  # between pings of an idle worker
        ping_timeout: float = 20.0,
        poll_interval: float = 0.2,  # how often idle links are checked for a worker that dialed in
    ) -> None:
        self.links = dict(links)
        self.listener = listener
        self.report = report
        self.on_change = on_change  # a worker joined or left, or a job gave its links back
        self.hello_timeout, self.ping_interval, self.ping_timeout = hello_timeout, ping_interval, ping_timeout
        self.poll_interval = poll_interval
        #: The job each lent link serves.
        self.lent: dict[str, str] = {}
        self._records = {name: _unknown(name) for name in self.links}
        self._pinged = dict.fromkeys(self.links, 0.0)
        self._watch: asyncio.Task[None] | None = None

    async def open(self) -> str:
        """Listen for the workers and start watching them; return the address bound."""
        uri = await self.listener.open()
        self._watch = asyncio.create_task(self._watch_links())
        return uri

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(*(link.close("the service stopped") for link in self.links.values()))
        await self.listener.close()

    def records(self) -> list[WorkerRecord]:
        """Every worker, sorted by id, with the job it serves."""
        return [{**self._records[name], "job": self.lent.get(name)} for name in sorted(self.links)]

    def ready(self, name: str) -> bool:
        """Connected and greeted: a job may start on it."""
        return self.links[name].connected and self._records[name]["connected"]

    def lend(self, names: list[str], job: str) -> dict[str, DialInLink]:
        """The links of ``names`` for ``job``, which its coordinator uses and leaves open."""
        self.lent.update(dict.fromkeys(names, job))
        return {name: self.links[name] for name in names}

    def give_back(self, job: str) -> None:
        for name in [name for name, holder in self.lent.items() if holder == job]:
            del self.lent[name]
        self.on_change()

    async def _watch_links(self) -> None:
        await asyncio.gather(*(self._tend_forever(name) for name in self.links))

    async def _tend_forever(self, name: str) -> None:
        """One loop per worker, so that a worker slow to greet holds up no other."""
        while True:
            await self._tend(name)
            await asyncio.sleep(self.poll_interval)

    async def _tend(self, name: str) -> None:
        """Greet a worker that dialed in, notice one that left, ping an idle one that is due."""
        link, record = self.links[name], self._records[name]
        now = time.time()
        if name in self.lent:  # its job's pool reconnects it; read what its keepalive measured
            if link.connected:
                record["last_seen"] = now
                measured = _ms(latency(link))  # None until the first keepalive: keep the figure of the greeting
                record["rtt_ms"] = measured if measured is not None else record["rtt_ms"]
            self._set_connected(name, link.connected, now)
            return
        if not link.connected:
            self._set_connected(name, False, now)
            if not link.busy:
                return
            try:
                info = await greet(link, timeout=self.hello_timeout, report=self.report, wait_for_start=False)
            except (WorkerUnavailable, RemoteError, ProtocolError) as exc:
                logger.info("%s: not greeted (%s)", name, exc)
                return
            record["role"], record["data"] = info.role, holdings(info, secure=False)
            record["version"] = f"protocol {info.protocol_version}"
            record["rtt_ms"] = None
            with contextlib.suppress(WorkerUnavailable, WorkerTimeout):  # a worker that left is noticed next time
                record["rtt_ms"] = round(await ping(link, timeout=self.ping_timeout) * 1000, 3)
            record["last_seen"] = self._pinged[name] = now = time.time()
            self._set_connected(name, True, now)
            self.report(f"Worker {name} connected: {info.role}, {record['data']}")
            return
        if now - self._pinged[name] >= self.ping_interval:
            self._pinged[name] = now
            try:
                rtt = await ping(link, timeout=self.ping_timeout)
            except (WorkerUnavailable, WorkerTimeout) as exc:
                await link.close(str(exc))
                return
            record["last_seen"] = time.time()
            record["rtt_ms"] = round(rtt * 1000, 3)

    def _set_connected(self, name: str, connected: bool, now: float) -> None:
        record = self._records[name]
        if connected == record["connected"]:
            return
        record["connected"] = connected
        record["connected_since"] = now if connected else None
        if not connected:
            self.report(f"Worker {name} disconnected: {self.links[name].closed_reason}")
        self.on_change()


def _unknown(name: str) -> WorkerRecord:
    return WorkerRecord(
        id=name,
        role="",
        connected=False,
        connected_since=None,
        last_seen=None,
        version="",
        rtt_ms=None,
        data="",
        job=None,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
