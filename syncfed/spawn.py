"""Kept for one release: starting local worker processes moved to :mod:`syncfed.net.spawn`."""

from __future__ import annotations

from .net.spawn import WorkerProcess, spawn_workers

__all__ = ["WorkerProcess", "spawn_workers"]
