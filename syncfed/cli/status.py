"""``--status``: who each worker is and how fast it answers, as a table."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ..config import DIAL_IN
from ..exceptions import SyncfedError, WorkerUnavailable
from ..net.link import WorkerLink
from ..protocol import Hello, Info, Ping
from .common import exit_code, link_settings

__all__ = ["print_status"]


async def _probe(name: str, uri: str, args: argparse.Namespace) -> list[str]:
    """One row of the status table: who the worker is and how fast it answers."""
    if uri == DIAL_IN:  # it is reached only through a run's --listen
        return [name, uri, "unknown: it dials in", "", "", "", "", ""]
    client = WorkerLink.from_settings(name, uri, link_settings(args, uri))
    try:
        await client.connect(wait_for_start=False)  # a status table says who is down now
        try:
            info = await client.request(Hello(), timeout=args.connect_timeout)
            assert isinstance(info, Info)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                await client.request(Ping(), timeout=args.connect_timeout)
                times.append(time.perf_counter() - started)
        finally:
            await client.close()
    except SyncfedError as exc:
        return [name, uri, f"unreachable: {exc}", "", "", "", "", ""]
    withheld = info.histogram is None
    # Own data names its classes (a continuous label has one count); the bundled data sets' are their digits.
    names = info.schema.classes if info.schema is not None else None
    histogram = (
        "withheld"
        if withheld
        else " ".join(
            f"{label if names is None else names[label]}:{n}" for label, n in enumerate(info.histogram or ()) if n
        )
    )
    return [
        name,
        uri,
        f"reachable ({info.role})",
        str(info.protocol_version),
        info.dataset,
        f"at most {info.num_examples}" if withheld else str(info.num_examples),
        histogram,
        f"{statistics.median(times) * 1000:.1f}",
    ]


async def print_status(endpoints: dict[str, str], args: argparse.Namespace) -> int:
    """Print one row per worker in ``endpoints``; the exit code says whether every one answered."""
    rows = await asyncio.gather(*(_probe(name, uri, args) for name, uri in endpoints.items()))
    header = ["id", "address", "status", "protocol", "dataset", "examples", "classes", "rtt ms"]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0 if all(row[2].startswith("reachable") for row in rows) else exit_code(WorkerUnavailable("", ""))
