"""The table a plan makes a worker encode is bounded (``max_prepared_bytes``) before it is allocated, and held once.

A table plan's width comes from its vocabularies, which the coordinator
chooses: the holding refuses one past the limit (at the limit it prepares),
evicts the tables it keeps to stay within it, and serves the training and
validation splits as views of the one prepared array.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from syncfed import load_data
from syncfed.config import WorkerConfig
from syncfed.data.base import Source
from syncfed.data.tables import TableSource
from syncfed.datasets import Dataset, Rows
from syncfed.exceptions import DatasetError
from syncfed.protocol import DataPlan
from syncfed.worker import hold_source

ROWS = 40


@pytest.fixture
def prepares(monkeypatch: pytest.MonkeyPatch) -> list[DataPlan]:
    """The plans tables are prepared for, in order."""
    seen: list[DataPlan] = []
    prepare = TableSource.prepare

    def counting(self: TableSource, plan: DataPlan) -> Dataset:
        seen.append(plan)
        return prepare(self, plan)

    monkeypatch.setattr(TableSource, "prepare", counting)
    return seen


def table() -> Source:
    frame = pd.DataFrame(
        {"age": np.arange(float(ROWS)), "ward": ["a"] * 20 + ["b"] * 20, "sick": np.resize(np.array(["n", "y"]), ROWS)}
    )
    return load_data(frame, label_column="sick", categorical_columns=["ward"])


def plan(*vocabulary: str) -> DataPlan:
    """A plan of the age and a ward one-hot over ``vocabulary``: 2 + len(vocabulary) values per row."""
    return DataPlan("table", (2 + len(vocabulary),), ("n", "y"), ("age", "ward"), {"ward": vocabulary})


def size(encoded: DataPlan) -> int:
    return ROWS * encoded.input_shape[0] * 4


def test_a_plan_is_prepared_at_the_limit_and_refused_one_byte_past_it(prepares: list[DataPlan]) -> None:
    wide = plan("a", "b", "c", "d")
    at_limit = hold_source(WorkerConfig("alice", val_fraction=0, max_prepared_bytes=size(wide)), table())
    assert len(at_limit.prepared(wide)[0]) == ROWS
    past = hold_source(WorkerConfig("alice", val_fraction=0, max_prepared_bytes=size(wide) - 1), table())
    with pytest.raises(DatasetError) as error:
        past.prepared(wide)
    assert str(error.value) == (
        f"table of {ROWS} rows encoded in 6 values each takes {size(wide)} bytes,"
        f" exceeds limit of {size(wide) - 1} bytes (the worker's --max-prepared-bytes)"
    )
    assert prepares == [wide]  # at the limit only: past it, refused before the table was asked for anything


def test_kept_tables_stay_within_the_limit_the_least_recently_used_making_room(prepares: list[DataPlan]) -> None:
    first, second = plan("a", "b"), plan("a", "b", "c")
    tight = hold_source(
        WorkerConfig("alice", val_fraction=0, max_prepared_bytes=size(first) + size(second) - 1), table()
    )
    for encoded in (first, second, second, first):  # both would pass the limit: each evicts the other
        tight.prepared(encoded)
    assert prepares == [first, second, first]
    prepares.clear()
    roomy = hold_source(WorkerConfig("alice", val_fraction=0, max_prepared_bytes=size(first) + size(second)), table())
    for encoded in (first, second, first, second):
        roomy.prepared(encoded)
    assert prepares == [first, second]


def test_the_training_and_validation_splits_view_one_prepared_array() -> None:
    holding = hold_source(WorkerConfig("alice", val_fraction=0.25), table())
    train, validation = holding.prepared(plan("a", "b"))
    assert validation is not None and isinstance(train.images, Rows) and isinstance(validation.images, Rows)
    assert train.images.array is validation.images.array and len(train.images.array) == ROWS
    # The views read the rows they name, standardised as the plan says (no statistics here: the ages).
    np.testing.assert_array_equal(train.batch(np.arange(len(train)))[:, 0], holding.train.astype(np.float32))
    np.testing.assert_array_equal(validation.batch(np.arange(len(validation)))[:, 0], holding.held.astype(np.float32))
