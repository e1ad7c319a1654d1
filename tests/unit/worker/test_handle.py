"""Workers started from Python: awaited in a running loop, blocking in a script, and refused in one line otherwise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from linkpair import tiny_digits

from syncfed import serve_worker, start_worker
from syncfed.exceptions import ConfigError, DatasetError


def test_serve_worker_refuses_to_block_a_running_loop() -> None:
    async def in_a_notebook() -> None:
        serve_worker("alice", tiny_digits(), port=0)

    with pytest.raises(ConfigError) as error:
        asyncio.run(in_a_notebook())
    assert str(error.value) == (
        "serve_worker blocks, and this thread already runs an event loop (a notebook):"
        " use worker = await start_worker(...) there"
    )


def test_start_worker_serves_a_spec_or_a_dataset_and_stops_twice(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.ones((30, 2), np.float32), y=np.arange(30) % 3)

    async def scenario() -> tuple[str, str, str]:
        own = await start_worker("own", f"npz:{path}", host="127.0.0.1", port=0, testing=True)
        bundled = await start_worker("bundled", tiny_digits(), host="127.0.0.1", port=0)
        kinds = own.worker.info().dataset, bundled.worker.info().dataset, repr(own)
        for handle in (own, bundled):
            await handle.stop()
            await handle.stop()
        return kinds

    own, bundled, described = asyncio.run(scenario())
    assert (own, bundled) == ("arrays", "digits") and described.startswith("<WorkerHandle own at ws://127.0.0.1:")


def test_start_worker_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^a worker serves a source .load_data., a data spec or a Dataset, not list$"):
        asyncio.run(start_worker("alice", [1, 2], port=0))  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="^.*/none.npz: no such file$"):
        asyncio.run(start_worker("alice", f"npz:{tmp_path}/none.npz", port=0))
