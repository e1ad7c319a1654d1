"""The job service's workers: one link each that outlives the jobs, their listener, and what each said of itself.

A worker dials in once and stays: the table greets it (hello: its role, its
data, its protocol), lends its link to the jobs that use it, and pings it
every ``ping_interval``, so that ``rtt_ms`` stays current and ``last_seen``
is when it last answered a ping or sent a message (a hung worker does not
look fresh). While a job holds a link, the job's pool reconnects it after a
loss: the table only measures it, and leaves a silent one to the pool.
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
from ..net.link import ping
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
            self.links[name].terms = None  # the job's: the next job proposes its own
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
        if name in self.lent:  # its job's pool reconnects it and drops it when silent; the table only measures it
            if link.connected:
                await self._measure(name, drop=False)
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
        await self._measure(name, drop=True)

    async def _measure(self, name: str, *, drop: bool) -> None:
        """Ping a connected worker when due; ``last_seen`` becomes the later of its pong and its last message.
        A worker that does not answer is dropped if ``drop`` (an idle one: a lent one is its job's pool's)."""
        link, record = self.links[name], self._records[name]
        if time.time() - self._pinged[name] >= self.ping_interval:
            self._pinged[name] = time.time()
            try:
                rtt = await ping(link, timeout=self.ping_timeout)
            except (WorkerUnavailable, WorkerTimeout) as exc:
                if drop:
                    await link.close(str(exc))
                    return
            else:
                record["last_seen"] = time.time()
                record["rtt_ms"] = round(rtt * 1000, 3)
        heard = link.last_heard
        if heard is not None and (record["last_seen"] is None or heard > record["last_seen"]):
            record["last_seen"] = heard

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
