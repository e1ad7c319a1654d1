"""Each kind of a user's own data in a real federation: short runs of the real programs over worker processes.

TSV and Parquet tables with a categorical column, npz arrays beside a
Python loader that serves every site through ``--data-arg``, and the Python
API over DataFrames in one event loop. A category rarer than
``--min-group-size`` is not revealed in hello; feature columns are matched
by name, so their order at a site does not change the model; a hospital
without cases of one class still trains the model of every class, which
the evaluator scores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import THREADS, assert_same_weights, run, running_workers
from programs import REPO, run_program
from safetensors.numpy import load_file
from units import MS

from syncfed import Coordinator, CoordinatorConfig, load_data, start_worker
from syncfed.coordinator import FEDERATED, RunResult
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import Feature, Hello, Info

#: The coordinator's recipe in these runs: a few seeded rounds, evaluated at the first and the last.
ROUNDS = 10
RECIPE = ["--training-rounds", str(ROUNDS), "--eval-every", str(ROUNDS), "--seed", "7", "--no-progress"]
TABLE_FLAGS = "--label-column sick --categorical-columns region --min-group-size 5"
REGIONS = ("north", "south")
RARE = "Svalbard"


def patients(seed: int, rows: int, *, well_only: bool = False, rare: int = 0) -> pd.DataFrame:
    """A site's records: sick when age and dose are high; ``rare`` of them from a region few sites hold."""
    rng = np.random.default_rng(seed)
    age, dose = rng.normal(50, 10, rows).round(1), rng.normal(2, 1, rows).round(2)
    sick = age + 10 * dose > 70
    if well_only:  # a hospital that saw no sick patients
        age, dose, sick = age[~sick], dose[~sick], sick[~sick]
    region = np.array([REGIONS[i % 2] for i in range(len(age))], dtype=object)
    region[:rare] = RARE
    return pd.DataFrame({"age": age, "sick": np.where(sick, "yes", "no"), "region": region, "dose": dose})


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice's TSV and bob's Parquet (no sick patients, two from a rare region), each in the test file's column
    order and in an order of its own, and the evaluator's CSV."""
    root = tmp_path_factory.mktemp("tables")
    alice, bob, test = patients(1, 120), patients(2, 160, well_only=True, rare=2), patients(3, 80)
    alice.to_csv(root / "alice.tsv", sep="\t", index=False)
    alice[["dose", "region", "sick", "age"]].to_csv(root / "alice-reordered.tsv", sep="\t", index=False)
    bob.to_parquet(root / "bob.parquet")
    bob[["sick", "age", "dose", "region"]].to_parquet(root / "bob-reordered.parquet")
    test.to_csv(root / "test.csv", index=False)
    return root


def table_run(tables: Path, tmp_path: Path, alice: str, bob: str) -> tuple[dict[str, np.ndarray], list[Any]]:
    """The final weights of a seeded run over alice's and bob's files, and its evaluation events."""
    saved, metrics = tmp_path / f"{alice}.safetensors", tmp_path / f"{alice}.jsonl"
    sites = [f"alice=tsv:{tables / alice}", f"bob=parquet:{tables / bob}", f"testing=csv:{tables / 'test.csv'}"]
    finished = run_program(
        [
            "run_websocket_client.py",
            *(f"--site={site}" for site in sites),
            f"--worker-args={TABLE_FLAGS}",
            *RECIPE,
            "--task",
            "classification",  # one output per class, so the model's width shows the union of classes
            "--save-model",
            str(saved),
            "--metrics-out",
            str(metrics),
            "--no-registry",
        ]
    )
    assert finished.returncode == 0, finished.stderr
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    return load_file(saved), [event for event in events if event.get("class_counts") is not None]


def test_tables_train_the_same_model_whatever_their_column_order(tables: Path, tmp_path: Path) -> None:
    weights, evaluations = table_run(tables, tmp_path, "alice.tsv", "bob.parquet")
    reordered, _ = table_run(tables, tmp_path, "alice-reordered.tsv", "bob-reordered.parquet")
    assert_same_weights(reordered, weights)
    # bob holds no sick patient, yet the model has both classes, and the evaluator scores both.
    assert min(array.shape[0] for name, array in weights.items() if name.endswith("bias")) == 2
    test = patients(3, 80)
    final = evaluations[-1]
    assert final["class_counts"] == [int(np.sum(test.sick == "no")), int(np.sum(test.sick == "yes"))]
    assert final["correct"] == sum(final["class_correct"]) and final["correct"] / len(test) > 0.7


def hello(worker: WorkerProcess) -> Info:
    async def ask() -> Info:
        async with WorkerLink(
            worker.worker_id, worker.uri, max_message_size=2**20, connect_timeout=30_000 * MS
        ) as peer:
            info = await peer.request(Hello())
        assert isinstance(info, Info)
        return info

    return run(ask())


def test_a_category_rarer_than_the_group_size_is_not_revealed(tables: Path) -> None:
    flags = [*THREADS, "--data", f"parquet:{tables / 'bob.parquet'}", *TABLE_FLAGS.split()]
    with running_workers([("bob", flags)]) as workers:
        info = hello(workers["bob"])
    assert info.schema is not None
    assert info.schema.features == (
        Feature("age", "numeric"),
        Feature("region", "categorical", REGIONS),
        Feature("dose", "numeric"),
    )
    assert RARE not in repr(info)


#: A loader that serves every site: ``--data-arg site=NAME`` picks its seeded records.
CLINIC_LOADER = """
import numpy as np

SEEDS = {"south": 11, "east": 12, "test": 13}

def records(site, rows="150"):
    rng = np.random.default_rng(SEEDS[site])
    x = rng.normal(size=(int(rows), 3)).astype(np.float32)
    y = np.where(x[:, 0] - x[:, 2] > 0, "sick", "well")
    return x, y, {"feature_names": ["pulse", "dose", "age"]}
"""


@pytest.fixture(scope="module")
def array_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    """north over an npz file whose features come in another order; south, east and the evaluator over one loader."""
    root = tmp_path_factory.mktemp("arrays")
    (root / "clinic_loaders.py").write_text(CLINIC_LOADER)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(150, 3)).astype(np.float32)
    y = np.where(x[:, 2] - x[:, 0] > 0, "sick", "well")  # age first, pulse last
    np.savez(root / "north.npz", x=x, y=y, feature_names=np.array(["age", "dose", "pulse"]))
    loader = ["--data", "clinic_loaders:records"]
    plan = [
        ("north", [*THREADS, "--data", f"npz:{root / 'north.npz'}"]),
        ("south", [*THREADS, *loader, "--data-arg", "site=south"]),
        ("east", [*THREADS, *loader, "--data-arg", "site=east", "--data-arg", "rows=90"]),
        ("testing", [*THREADS, *loader, "--data-arg", "site=test", "--testing"]),
    ]
    with pytest.MonkeyPatch.context() as patch:  # the loader's module on the workers' path, as its operator puts it
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), str(REPO), os.environ.get("PYTHONPATH")])))
        with running_workers(plan) as workers:
            yield workers


def test_npz_and_a_loader_of_every_site_train_together(array_sites: dict[str, WorkerProcess]) -> None:
    # --data-arg reached the loader: east asked for 90 records (checked before the run's log lines push this out)
    assert any(
        "east holds 90 training examples of arrays from clinic_loaders:records" in line
        for line in array_sites["east"].output
    )
    trainers = ",".join(f"{name}={array_sites[name].uri}" for name in ("north", "south", "east"))
    finished = run_program(
        ["run_websocket_client.py", "--workers", trainers, "--evaluator", f"testing={array_sites['testing'].uri}"]
        + RECIPE
    )
    assert finished.returncode == 0, finished.stderr
    accuracy = float(finished.stdout.split(f"Final federated accuracy at round {ROUNDS}: ")[1].split("%")[0])
    assert accuracy > 80, finished.stdout


def test_the_python_api_federates_dataframes_in_one_event_loop() -> None:
    frames = {"alice": patients(1, 120), "bob": patients(2, 160, well_only=True), "testing": patients(3, 80)}

    async def notebook() -> RunResult:
        handles = [
            await start_worker(
                name,
                load_data(frame, label_column="sick", categorical_columns=["region"]),
                host="127.0.0.1",
                port=0,
                testing=name == "testing",
            )
            for name, frame in frames.items()
        ]
        try:
            uris = {handle.worker_id: handle.uri for handle in handles}
            config = CoordinatorConfig(
                workers={name: uris[name] for name in ("alice", "bob")},
                evaluator={"testing": uris["testing"]},
                training_rounds=ROUNDS,
                eval_every=ROUNDS,
                connect_timeout=10_000 * MS,
            )
            return await Coordinator(config).run()
        finally:
            for handle in handles:
                await handle.stop()

    result = run(notebook())
    final = [record for record in result.evaluations if record.model == FEDERATED][-1]
    test = frames["testing"]
    assert final.round == ROUNDS and final.result.num_examples == len(test)
    assert final.result.class_counts == (int(np.sum(test.sick == "no")), int(np.sum(test.sick == "yes")))
    assert final.result.accuracy > 0.7
