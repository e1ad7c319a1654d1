"""The coordinator folds each update in a thread of its own, one at a time, in arrival order."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from syncfed.config import CoordinatorConfig
from syncfed.coordinator.dispatch import Dispatch
from syncfed.protocol import FitResult

CONFIG = CoordinatorConfig(workers={"alice": "ws://unused"}, evaluator={})


def test_folds_run_off_the_event_loop_one_at_a_time_in_arrival_order() -> None:
    folded: list[int] = []
    threads: set[int] = set()
    busy = threading.Lock()

    def take(reply: FitResult) -> int:
        assert busy.acquire(blocking=False), "two folds ran at once"
        threads.add(threading.get_ident())
        time.sleep(0.01)  # a fold that holds its thread (numpy would release the GIL)
        folded.append(reply.num_examples)
        busy.release()
        return reply.num_examples

    async def main() -> list[int]:
        dispatch = Dispatch(CONFIG, pool=None)  # type: ignore[arg-type]  # _fold does not use the pool
        replies = [FitResult({"w": np.zeros(2, np.float32)}, count, 0.0) for count in range(1, 6)]
        return await asyncio.gather(*(dispatch._fold(take, reply) for reply in replies))

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]
    assert folded == [1, 2, 3, 4, 5]
    assert threading.get_ident() not in threads


def test_a_cancelled_fold_finishes_before_the_next_one_starts() -> None:
    events: list[str] = []

    def take(reply: FitResult) -> None:
        events.append(f"start {reply.num_examples}")
        time.sleep(0.02)
        events.append(f"end {reply.num_examples}")

    async def main() -> None:
        dispatch = Dispatch(CONFIG, pool=None)  # type: ignore[arg-type]
        first = asyncio.create_task(dispatch._fold(take, FitResult({"w": np.zeros(1)}, 1, 0.0)))
        await asyncio.sleep(0.005)
        first.cancel()
        await dispatch._fold(take, FitResult({"w": np.zeros(1)}, 2, 0.0))
        assert first.cancelled()

    asyncio.run(main())
    assert events == ["start 1", "end 1", "start 2", "end 2"]
