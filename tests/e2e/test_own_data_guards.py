"""What a real worker over its own table refuses, so that neither a coordinator nor a file can get past its limits.

- A ``feature-stats`` or ``quantiles`` query that selects a category's
  one-hot or "other" slot would count the rows holding that category, the
  rare ones its schema hides included: refused. A numeric column is answered.
- A plan whose vocabularies would make the encoded table larger than
  ``--max-prepared-bytes`` is refused before anything is allocated, and the
  worker goes on serving plans that fit.
- A ``.zst`` CSV without the zstandard package stops the worker at start-up
  with one line naming the file and the package.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pytest
from conftest import THREADS, running_workers
from programs import run_program
from units import MS

from syncfed.exceptions import RemoteError
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import DataPlan, Hello, Info, Query, QueryResult

T = TypeVar("T")

TEST_TIMEOUT = 120_000 * MS
LIMIT = 64 * 2**20
MAX_PREPARED = 64 * 2**10
#: 30 patients: 27 with a common diagnosis, 2 with HIV and 1 with a rarer one, both below the minimum group size.
DIAGNOSES = ["common"] * 27 + ["HIV"] * 2 + ["rare-x"]
AGES = np.arange(30, 60, dtype=np.float64)
#: A plan a coordinator could send: it guesses the hidden categories' names into the vocabulary.
GUESSED = DataPlan("table", (5,), ("no", "yes"), ("age", "diagnosis"), {"diagnosis": ("HIV", "common", "rare-x")})


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    path = tmp_path_factory.mktemp("guards") / "ward.csv"
    sick = np.resize(np.array(["no", "yes"]), len(AGES))
    pd.DataFrame({"age": AGES, "diagnosis": DIAGNOSES, "sick": sick}).to_csv(path, index=False)
    flags = [
        *THREADS,
        *("--data", f"csv:{path}", "--label-column", "sick", "--categorical-columns", "diagnosis"),
        *("--min-group-size", "10", "--val-fraction", "0", "--max-prepared-bytes", "64KiB"),
    ]
    with running_workers([("ward", flags)]) as workers:
        yield workers["ward"]


async def ask(worker: WorkerProcess, *queries: Query) -> list[QueryResult | tuple[str, str]]:
    """Each query's answer, or its refusal's code and reason."""
    answers: list[QueryResult | tuple[str, str]] = []
    async with WorkerLink("ward", worker.uri, max_message_size=LIMIT, connect_timeout=30_000 * MS) as peer:
        info = await peer.request(Hello())
        assert isinstance(info, Info) and info.schema is not None
        # The schema names only the category held by at least 10 rows.
        assert [feature.categories for feature in info.schema.features] == [(), ("common",)]
        for query in queries:
            try:
                reply = await peer.request(query)
            except RemoteError as exc:
                answers.append((exc.code, exc.reason))
            else:
                assert isinstance(reply, QueryResult)
                answers.append(reply)
    return answers


def slot_refusal(query: str, feature: int) -> tuple[str, str]:
    return (
        "refused",
        f"{query} of feature {feature} would count the examples of a category (a one-hot slot), which may be"
        " fewer than 10; this worker's minimum group size is 10",
    )


def test_a_query_over_a_category_slot_is_refused_and_a_numeric_column_answered(ward: WorkerProcess) -> None:
    answers = run(
        ask(
            ward,
            Query("feature-stats", (1,), data=GUESSED),  # the HIV slot: its mean x 30 would be 2
            Query("feature-stats", (0, 4), data=GUESSED),  # age, then the "other" slot
            Query("quantiles", (3,), 4, (0.0, 1.0), data=GUESSED),  # the rare-x slot
            Query("feature-stats", (0,), data=GUESSED),
        )
    )
    assert answers[:3] == [
        slot_refusal("feature-stats", 1),
        slot_refusal("feature-stats", 4),
        slot_refusal("quantiles", 3),
    ]
    numeric = answers[3]
    assert isinstance(numeric, QueryResult) and numeric.num_examples == len(AGES)
    np.testing.assert_allclose(numeric.tensors["mean"], [AGES.mean()], rtol=1e-6)
    np.testing.assert_allclose(numeric.tensors["m2"], [np.square(AGES - AGES.mean()).sum()], rtol=1e-5)


def test_a_plan_that_would_encode_past_the_limit_is_refused_and_the_worker_serves_on(ward: WorkerProcess) -> None:
    # 600 guessed categories and "common": 1 + 601 + 1 values per row, 30 rows of float32 = 72,360 bytes.
    vocabulary = tuple(sorted([f"c{i:03d}" for i in range(600)] + ["common"]))
    wide = DataPlan("table", (603,), ("no", "yes"), ("age", "diagnosis"), {"diagnosis": vocabulary})
    assert 30 * 603 * 4 > MAX_PREPARED
    answers = run(ask(ward, Query("feature-stats", (0,), data=wide), Query("feature-stats", (0,), data=GUESSED)))
    assert answers[0] == (
        "incompatible",
        "table of 30 rows encoded in 603 values each takes 72360 bytes, exceeds limit of 65536 bytes"
        " (the worker's --max-prepared-bytes)",
    )
    assert isinstance(answers[1], QueryResult) and answers[1].num_examples == len(AGES)


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None, reason="zstandard is installed")
def test_a_zstandard_csv_without_its_package_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ward.csv.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")  # a zstandard frame's magic number: pandas needs the package to go on
    started = run_program(["run_websocket_server.py", "--id", "ward", "--port", "0", *THREADS, "--data", str(path)])
    assert (started.returncode, started.stderr) == (
        3,
        f"run_websocket_server.py: error: {path}: cannot be read as csv:"
        " it needs the zstandard package (pip install zstandard)\n",
    )
    assert "listening" not in started.stdout
