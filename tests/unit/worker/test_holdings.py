"""A worker's own data as it holds it: the shard, the hold-out, what hello says, and the examples prepared per plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from syncfed.config import WorkerConfig
from syncfed.data.arrays import ArraySource
from syncfed.datasets import Dataset, DatasetSpec, parse_dataset_spec
from syncfed.exceptions import ConfigError, DatasetError
from syncfed.protocol import DataPlan, DataSchema, DatasetInfo
from syncfed.worker import Holding, SourceHolding, hold_source, load_holdings

COUNT = 50
PLAN = DataPlan("arrays", (3,), ("a", "b", "c"))


class CountingSource(ArraySource):
    """Arrays that count how often they are prepared."""

    prepares = 0

    def prepare(self, plan: DataPlan) -> Dataset:
        self.prepares += 1
        return super().prepare(plan)


def source(count: int = COUNT) -> CountingSource:
    x = np.arange(count * 3, dtype=np.float32).reshape(count, 3)
    y = np.resize(np.array(["a", "b", "c", "b", "b"]), count)
    return CountingSource(x, y)


def plan(*classes: str) -> DataPlan:
    return DataPlan("arrays", (3,), classes)


def test_prepared_examples_are_cached_per_plan_keeping_the_last_two() -> None:
    data = source()
    holding = hold_source(WorkerConfig("alice"), data)
    first = holding.prepared(plan("a", "b", "c"))
    assert holding.prepared(plan("a", "b", "c")) is first and data.prepares == 1
    holding.prepared(plan("a", "b", "c", "d"))
    assert holding.prepared(plan("a", "b", "c")) is first and data.prepares == 2  # the last used is kept
    holding.prepared(plan("a", "b", "c", "e"))  # drops the least recently used: the one with d
    assert data.prepares == 3
    holding.prepared(plan("a", "b", "c", "d"))
    assert data.prepares == 4
    single = SourceHolding(data, np.arange(COUNT), np.arange(0), cache_size=1)
    single.prepared(plan("a", "b", "c"))
    single.prepared(plan("a", "b", "c", "d"))
    single.prepared(plan("a", "b", "c"))
    assert data.prepares == 7
    with pytest.raises(ConfigError, match="^cache size 0 must be at least 1$"):
        SourceHolding(data, np.arange(COUNT), np.arange(0), cache_size=0)


def test_a_trainer_holds_out_a_seeded_validation_split_and_the_evaluator_holds_everything() -> None:
    trainer = hold_source(WorkerConfig("alice", val_fraction=0.2), source())
    assert (len(trainer.train), trainer.validation_size) == (40, 10)
    assert sorted([*trainer.train, *trainer.held]) == list(range(COUNT))
    again = hold_source(WorkerConfig("alice", val_fraction=0.2), source())
    assert np.array_equal(again.held, trainer.held)  # seeded by the worker's id
    train, validation = trainer.prepared(PLAN)
    assert validation is not None and (len(train), len(validation)) == (40, 10)
    assert np.array_equal(train.batch(np.arange(len(train)))[:, 0], trainer.train * 3)  # those trained on, in order
    labels = source().labels
    assert trainer.histogram() == [int(np.sum(labels[trainer.train] == k)) for k in range(3)]

    evaluator = hold_source(WorkerConfig("testing", testing=True), source())
    assert (len(evaluator.train), evaluator.validation_size, evaluator.histogram()) == (COUNT, 0, [10, 30, 10])
    train, validation = evaluator.prepared(PLAN)
    assert validation is None and len(train) == COUNT


def test_an_iid_shard_of_own_data_and_an_empty_one() -> None:
    shards = [hold_source(WorkerConfig("alice", shard=(k, 3), val_fraction=0), source()) for k in range(3)]
    assert sorted(i for shard in shards for i in shard.train) == list(range(COUNT))
    with pytest.raises(ConfigError, match=r"^worker alice holds no examples: shard 4/4 of 3 is empty$"):
        hold_source(WorkerConfig("alice", shard=(3, 4)), source(3))


def test_hello_describes_the_schema_and_the_training_histogram() -> None:
    holding = hold_source(WorkerConfig("alice", val_fraction=0), source())
    assert holding.summary() == {
        "dataset": "arrays",
        "input_shape": (3,),
        "num_classes": 3,
        "schema": DataSchema("arrays", (3,), ("a", "b", "c")),
        "histogram": (10, 30, 10),
        "validation_size": 0,
    }
    assert holding.summary(withhold=True)["max_examples"] == 64
    named = hold_source(WorkerConfig("testing", testing=True), source(), DatasetSpec("north", source="npz:x.npz"))
    assert named.describe() == DatasetInfo(
        key="north",
        dataset="arrays",
        split="test",
        version=source().fingerprint(),
        input_shape=(3,),
        dtype="float32",
        num_classes=3,
        histogram=(10, 30, 10),
        schema=DataSchema("arrays", (3,), ("a", "b", "c")),
    )


def test_a_continuous_label_counts_every_example_as_one() -> None:
    x = np.zeros((12, 2), dtype=np.float32)
    holding = hold_source(WorkerConfig("alice"), ArraySource(x, np.linspace(0.5, 3.3, 12)))
    assert holding.schema.classes is None and holding.histogram() == [len(holding.train)] == [11]


def test_load_holdings_opens_the_data_spec_and_named_specs(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.ones((20, 2), dtype=np.float32), y=np.arange(20) % 2)
    (holding,) = load_holdings(WorkerConfig("alice", data=f"npz:{path}"))
    assert isinstance(holding, SourceHolding) and holding.schema.classes == ("0", "1")
    both = load_holdings(
        WorkerConfig("bob", datasets=(parse_dataset_spec(f"own=npz:{path}"), parse_dataset_spec("d=digits:test")))
    )
    assert isinstance(both[0], SourceHolding) and isinstance(both[1], Holding)
    assert both[0].spec == DatasetSpec("own", source=f"npz:{path}")
    with pytest.raises(DatasetError, match=f"^{tmp_path}/none.npz: no such file$"):
        load_holdings(WorkerConfig("alice", data=f"npz:{tmp_path}/none.npz"))
    with pytest.raises(ConfigError, match="^--data 'xlsx:a.xlsx' is not a data source; use one of images:DIR"):
        load_holdings(WorkerConfig("alice", data="xlsx:a.xlsx"))


def test_own_data_settings_refuse_what_belongs_to_the_bundled_data_sets() -> None:
    with pytest.raises(ConfigError, match="^--data and --dataset mnist each choose the worker's data: give one"):
        WorkerConfig("alice", data="npz:a.npz", dataset="mnist")
    with pytest.raises(ConfigError, match="^--data and --dataset-spec each choose the worker's data: name own data"):
        WorkerConfig("alice", data="npz:a.npz", datasets=(DatasetSpec("a", "digits", "train"),))
    with pytest.raises(ConfigError) as error:
        WorkerConfig("alice", data="npz:a.npz", digits=(1, 2))
    assert str(error.value) == (
        "--digits picks classes of digits or MNIST; a worker with its own data holds every example of it"
        " (use --shard K/N for a part)"
    )
    with pytest.raises(ConfigError, match="^--digits picks classes"):
        WorkerConfig("alice", datasets=(DatasetSpec("a", source="npz:a.npz"),), digits=(1,))
    with pytest.raises(ConfigError, match="^data spec must not be empty$"):
        WorkerConfig("alice", data="")
    assert WorkerConfig("alice", data="npz:a.npz", min_group_size=3).source_options.min_group_size == 3


def test_dataset_specs_name_own_data_beside_the_bundled_sets() -> None:
    assert parse_dataset_spec("north=csv:claims.csv") == DatasetSpec("north", source="csv:claims.csv")
    assert parse_dataset_spec("n=mypkg.loaders:load") == DatasetSpec("n", source="mypkg.loaders:load")
    assert parse_dataset_spec("t=digits:test") == DatasetSpec("t", "digits", "test")
    with pytest.raises(ConfigError, match="^data set n must name either a bundled data set or own data, not both$"):
        DatasetSpec("n", "digits", source="csv:a.csv")
