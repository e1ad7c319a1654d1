"""A worker started from Python names in hello only the categories its own minimum group size lets through.

A table read with ``load_data`` carries the minimum it was read with (10 by
default); a worker started over it with a larger ``min_group_size`` would
otherwise reveal a category rarer than its own minimum. It refuses instead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from syncfed import load_data, serve_worker, start_worker
from syncfed.data.base import SourceOptions
from syncfed.exceptions import ConfigError

#: 25 rows on ward a, 15 on ward b: b is named at a minimum of 10, not at 20.
FRAME = pd.DataFrame(
    {"age": np.arange(40.0), "ward": ["a"] * 25 + ["b"] * 15, "sick": np.resize(np.array(["no", "yes"]), 40)}
)
READ = {"label_column": "sick", "categorical_columns": ["ward"]}
REFUSAL = (
    "the data were read with a minimum group size of 10, below this worker's 20:"
    " read them with load_data(..., min_group_size=20)"
)


def wards(data: object, **settings: object) -> tuple[str, ...]:
    """The ward categories hello names for a worker started over ``data``."""

    async def scenario() -> tuple[str, ...]:
        handle = await start_worker("alice", data, host="127.0.0.1", port=0, **settings)  # type: ignore[arg-type]
        try:
            schema = handle.worker.info().schema
        finally:
            await handle.stop()
        assert schema is not None
        return schema.features[1].categories

    return asyncio.run(scenario())


def test_a_table_read_with_a_smaller_minimum_is_refused_by_a_stricter_worker() -> None:
    loose = load_data(FRAME, **READ)
    assert wards(loose) == ("a", "b")  # both at the default minimum of 10
    with pytest.raises(ConfigError) as started:
        wards(loose, min_group_size=20)
    assert str(started.value) == REFUSAL
    with pytest.raises(ConfigError) as served:
        serve_worker("alice", loose, host="127.0.0.1", port=0, ready=listened, min_group_size=20)
    assert str(served.value) == REFUSAL


def listened(line: str) -> None:
    """``serve_worker``'s ready line: reached, it would serve until Ctrl-C, so the test stops there instead."""
    raise AssertionError(f"the worker started: {line}")


def test_a_table_read_with_the_worker_minimum_or_a_spec_names_only_the_categories_it_lets_through(
    tmp_path: Path,
) -> None:
    assert wards(load_data(FRAME, **READ, min_group_size=20), min_group_size=20) == ("a",)
    path = tmp_path / "ward.csv"
    FRAME.to_csv(path, index=False)
    options = SourceOptions(label_column="sick", categorical_columns=("ward",), min_group_size=10)
    # A spec is read by the worker itself, with its own minimum whatever the options say.
    assert wards(f"csv:{path}", options=options, min_group_size=20) == ("a",)
