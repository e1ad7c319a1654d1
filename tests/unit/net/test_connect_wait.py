"""A link waits, with backoff, for a worker that is still starting, up to its connect timeout, and says so."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from units import MS
from websockets.asyncio.server import ServerConnection, serve

from syncfed.exceptions import WorkerUnavailable
from syncfed.net.link import WorkerLink, _refused_everywhere


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound by the system, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def idle(connection: ServerConnection) -> None:
    await connection.wait_closed()


def link(port: int, connect_timeout: float) -> WorkerLink:
    return WorkerLink("bob", f"ws://127.0.0.1:{port}", max_message_size=2**20, connect_timeout=connect_timeout)


def test_a_worker_that_starts_late_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()

    async def scenario() -> None:
        async def start_late() -> None:
            await asyncio.sleep(1_000 * MS)  # importing torch, say
            async with serve(idle, "127.0.0.1", port):
                await asyncio.sleep(3_000 * MS)

        server = asyncio.create_task(start_late())
        bob = link(port, connect_timeout=10_000 * MS)
        await bob.connect()
        assert bob.connected
        await bob.close()
        server.cancel()

    with caplog.at_level(logging.WARNING, logger="syncfed.client"):
        asyncio.run(scenario())
    assert [record.getMessage() for record in caplog.records] == [
        f"waiting for bob at 127.0.0.1:{port} (connection refused), up to {10_000 * MS:g} s"
    ]


def test_a_worker_that_never_starts_fails_after_the_timeout() -> None:
    port = closed_port()
    timeout = 500 * MS
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable) as caught:
        asyncio.run(link(port, connect_timeout=timeout).connect())
    assert timeout <= time.monotonic() - started < timeout + 2_000 * MS
    assert str(caught.value) == (
        f"worker bob is unavailable: no connection to ws://127.0.0.1:{port} within {timeout:g} s (connection refused)"
    )


def test_without_waiting_a_refusal_fails_at_once() -> None:
    """A rejoin attempt, or --status: they have a backoff of their own, or want the answer now."""
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match=f"cannot connect to ws://127.0.0.1:{port}"):
        asyncio.run(link(port, connect_timeout=10_000 * MS).connect(wait_for_start=False))
    assert time.monotonic() - started < 2_000 * MS


def test_a_refusal_from_every_address_of_a_name_counts_as_one() -> None:
    both = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 8778, 0, 0),"
        " [Errno 111] Connect call failed ('127.0.0.1', 8778)"
    )
    mixed = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 8778, 0, 0),"
        " [Errno 113] Connect call failed ('10.0.0.5', 8778)"
    )
    assert _refused_everywhere(ConnectionRefusedError(111, "Connect call failed"))
    assert _refused_everywhere(both)
    assert not _refused_everywhere(mixed)
    assert not _refused_everywhere(OSError(113, "No route to host"))
