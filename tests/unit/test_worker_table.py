"""The service's worker table says when a worker was last heard from, also while a job holds its link."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from syncfed.coordinator import worker_table
from syncfed.coordinator.worker_table import WorkerTable
from syncfed.exceptions import WorkerTimeout


class SilentLink:
    """A connected link whose worker answers no ping; ``last_heard`` is when it last sent a message."""

    connected = True
    busy = False
    closed_reason = "not connected"

    def __init__(self) -> None:
        self.last_heard: float | None = None
        self.closed: str | None = None

    async def close(self, reason: str) -> None:
        self.closed = reason


async def no_pong(link: Any, *, timeout: float) -> float:
    raise WorkerTimeout("alice", f"no pong within {timeout:g} s")


def test_a_lent_worker_that_is_silent_does_not_look_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_table, "ping", no_pong)
    link = SilentLink()
    table = WorkerTable({"alice": link}, listener=None, report=lambda line: None, ping_interval=0.0)  # type: ignore[dict-item, arg-type]
    table._records["alice"].update(connected=True, last_seen=100.0)
    table.lend(["alice"], "1")

    asyncio.run(table._tend("alice"))
    assert (table.records()[0]["last_seen"], link.closed) == (100.0, None)  # the job's pool decides to drop it
    link.last_heard = 150.0  # a message from it
    asyncio.run(table._tend("alice"))
    assert table.records()[0]["last_seen"] == 150.0
