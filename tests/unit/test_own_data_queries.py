"""What an analytics query selects over own data by default, and own data named in ``--dataset-spec`` by a bare path.

Over a table "all features" are its numeric columns: a one-hot slot would
count a category's rows, which workers refuse. A ``--dataset-spec`` takes
every form ``--data`` takes, a bare path such as ``north=claims.csv`` included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from syncfed.config import WorkerConfig
from syncfed.coordinator.query_round import QuerySettings, build_query
from syncfed.datasets import DatasetSpec, parse_dataset_spec
from syncfed.exceptions import ConfigError
from syncfed.protocol import DataSchema, Feature, Info
from syncfed.worker import SourceHolding, load_holdings

#: The plan orders the columns by name: age, dose, then ward one-hot over a and b and its "other" slot.
TABLE = DataSchema(
    "table", (3,), ("no", "yes"), (Feature("age"), Feature("ward", "categorical", ("a", "b")), Feature("dose"))
)


def infos(schema: DataSchema) -> dict[str, Info]:
    return {
        name: Info(name, "trainer", schema.kind, schema.input_shape, 2, (9, 9), ("mlp",), schema=schema)
        for name in ("alice", "bob")
    }


def test_all_features_of_a_table_are_its_numeric_columns_and_a_chosen_slot_is_sent_as_asked() -> None:
    every = build_query(QuerySettings("feature-stats", features=None), infos(TABLE))
    assert every.features == (0, 1) and every.data is not None and every.data.input_shape == (5,)
    quantiles = build_query(QuerySettings("quantiles", None, 4, (0.0, 1.0)), infos(TABLE))
    assert quantiles.features == (0, 1)
    # Chosen features (dose, "other") go as chosen: the workers refuse a slot (tests/e2e/test_own_data_guards.py).
    assert build_query(QuerySettings("feature-stats", features=(1, 4)), infos(TABLE)).features == (1, 4)
    arrays = DataSchema("arrays", (3,), ("no", "yes"))
    assert build_query(QuerySettings("feature-stats", features=None), infos(arrays)).features == (0, 1, 2)


def test_a_dataset_spec_names_own_data_by_a_bare_path_as_data_does(tmp_path: Path) -> None:
    assert parse_dataset_spec("north=claims.csv") == DatasetSpec("north", source="claims.csv")
    assert parse_dataset_spec("north=csv:claims.csv") == DatasetSpec("north", source="csv:claims.csv")
    assert parse_dataset_spec("t=digits:test") == DatasetSpec("t", "digits", "test")
    for text in ("t=digits", "north=", "north"):
        with pytest.raises(ConfigError) as error:
            parse_dataset_spec(text)
        assert str(error.value) == (
            f"data set spec {text!r} must look like digits-train=digits:train (KEY=DATASET:SPLIT)"
            " or north=csv:claims.csv (KEY=SPEC of own data)"
        )
    path = tmp_path / "north.npz"
    np.savez(path, x=np.ones((12, 2), np.float32), y=np.arange(12) % 2)
    (held,) = load_holdings(WorkerConfig("north", datasets=(parse_dataset_spec(f"north={path}"),), val_fraction=0))
    assert isinstance(held, SourceHolding) and held.name == "arrays" and len(held.train) == 12
