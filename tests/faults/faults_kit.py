"""What the fault tests share: a bounded event loop, a short training plan, initial weights, a free port.

A test file takes the ``weights`` fixture by importing it by name (``from
faults_kit import weights as weights``), so that pytest finds it there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from units import MS

from syncfed.models import DigitsCNN, get_weights
from syncfed.protocol import TrainingPlan

__all__ = ["MiB", "PLAN", "TEST_TIMEOUT", "free_port", "run", "weights"]

T = TypeVar("T")

MiB = 2**20
TEST_TIMEOUT = 90_000 * MS  # one test's event loop

PLAN = TrainingPlan(round=1, batch_size=8, num_batches=3, lr=0.05, seed=3)


def run(coroutine: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return get_weights(DigitsCNN())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
