"""I/O used by both ends: the websocket plumbing, the coordinator's link to a worker, local worker processes.

One of the four folders allowed to import asyncio and websockets; what they
carry is decoded and checked by the pure modules beside them.
"""

from __future__ import annotations

from .link import LinkSettings, WorkerLink
from .spawn import WorkerProcess, spawn_workers

__all__ = ["LinkSettings", "WorkerLink", "WorkerProcess", "spawn_workers"]
