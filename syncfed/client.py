"""Kept for one release: the worker link moved to :mod:`syncfed.net.link`, ``WorkerClient`` became ``WorkerLink``."""

from __future__ import annotations

from .net.link import LinkSettings, WorkerClient, WorkerLink

__all__ = ["LinkSettings", "WorkerClient", "WorkerLink"]
