"""Federated evaluation, cross-site validation and the data-set registry on workers.

Pure tests first (the hold-out, pooling, the matrix, the new message fields,
the flags), then end-to-end runs over real worker processes on digits: the
session's classic workers (alice 0-3, bob 4-6, charlie 7-9 and the evaluator
testing), and a module's own workers that hold named data sets. Every figure a
worker reports is checked against an independent computation here: the
worker's examples are selected with plain numpy, the model is scored with a
plain torch pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import THREADS, run, running_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from units import MS

from syncfed.cli import coordinator as client_cli
from syncfed.cli import worker as server_cli
from syncfed.cli.common import parse_arguments
from syncfed.config import CoordinatorConfig, WorkerConfig
from syncfed.coordinator import FEDERATED, Coordinator, RunResult, plan_seed
from syncfed.datasets import DatasetSpec, load_dataset, parse_dataset_spec
from syncfed.evaluation import CrossSiteMatrix, holdout, pool, validation_seed, write_cross_site
from syncfed.exceptions import AggregationError, ConfigError, IncompatibleWorkers, ProtocolError, RemoteError
from syncfed.models import DigitsCNN, get_weights, set_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    DatasetInfo,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Hello,
    Info,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.training import train
from syncfed.worker import load_shard

TRAINERS = ("alice", "bob", "charlie")
CLASSES = {"alice": (0, 1, 2, 3), "bob": (4, 5, 6), "charlie": (7, 8, 9)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Independent computations ------------------------------------------------------


def seed_of(worker_id: str) -> int:
    """The documented seed of a worker's hold-out: the first 8 bytes of a SHA-256, little-endian."""
    return int.from_bytes(hashlib.sha256(("syncfed-validation\0" + worker_id).encode()).digest()[:8], "little")


def split_indices(labels: np.ndarray, classes: tuple[int, ...], seed: int, fraction: float = 0.1) -> tuple[list, list]:
    """The worker's training and validation indices into ``labels``, by the documented rule, without syncfed."""
    shard = [index for index, label in enumerate(labels.tolist()) if label in classes]
    size = min(max(round(fraction * len(shard)), 1), len(shard) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(shard))[:size].tolist())
    validation = [shard[position] for position in range(len(shard)) if position in chosen]
    training = [shard[position] for position in range(len(shard)) if position not in chosen]
    return training, validation


def score(weights: Mapping[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Mean cross-entropy and number correct of digits-cnn with ``weights``, in one plain forward pass."""
    model = DigitsCNN()
    set_weights(model, dict(weights))
    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(images)).double()
    log_probabilities = torch.log_softmax(output, dim=1).numpy()
    loss = -float(np.mean(log_probabilities[np.arange(len(labels)), labels]))
    return loss, int(np.sum(output.argmax(dim=1).numpy() == labels))


@pytest.fixture(scope="module")
def digits_train() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("digits", "train")
    return data.images, data.labels


def site_data(digits_train: tuple[np.ndarray, np.ndarray], name: str, part: int) -> tuple[np.ndarray, np.ndarray]:
    """``name``'s training (part 0) or validation (part 1) examples."""
    images, labels = digits_train
    indices = split_indices(labels, CLASSES[name], seed_of(name))[part]
    return images[indices], labels[indices]


# The hold-out ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    num_examples=st.integers(0, 3000),
    fraction=st.floats(0, 0.95),
    seed=st.integers(0, 2**63 - 1),
)
def test_holdout_is_a_seeded_disjoint_cover(num_examples: int, fraction: float, seed: int) -> None:
    train_part, held = holdout(num_examples, fraction, np.random.default_rng(seed))
    assert np.intersect1d(train_part, held).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_part, held])), np.arange(num_examples))
    assert list(train_part) == sorted(train_part) and list(held) == sorted(held)
    expected = (
        0 if num_examples == 0 or fraction == 0 else min(max(round(fraction * num_examples), 1), num_examples - 1)
    )
    assert len(held) == expected
    again = holdout(num_examples, fraction, np.random.default_rng(seed))
    np.testing.assert_array_equal(again[1], held)


def test_holdout_refuses_a_fraction_outside_zero_to_one() -> None:
    for fraction in (1.0, -0.1, math.nan):
        with pytest.raises(ConfigError) as error:
            holdout(10, fraction, np.random.default_rng(0))
        assert str(error.value) == f"validation fraction {fraction!r} is not in [0, 1)"


def test_validation_seed_is_a_stable_digest_of_the_id() -> None:
    assert validation_seed("alice") == seed_of("alice")
    assert validation_seed("alice") != validation_seed("bob")


def test_a_training_worker_holds_out_its_validation_split(digits_train: tuple[np.ndarray, np.ndarray]) -> None:
    holding = load_shard(WorkerConfig("alice"))
    training, validation = site_data(digits_train, "alice", 0), site_data(digits_train, "alice", 1)
    assert holding.validation is not None
    assert (len(holding.data), len(holding.validation)) == (518, 58)  # 576 examples of digits 0-3
    np.testing.assert_array_equal(holding.data.images, training[0])
    np.testing.assert_array_equal(holding.validation.labels, validation[1])
    assert holding.spec is None and holding.version == ""

    unsplit = load_shard(WorkerConfig("alice", val_fraction=0.0))
    assert unsplit.validation is None and len(unsplit.data) == 576
    reseeded = load_shard(WorkerConfig("alice", val_seed=7))
    assert reseeded.validation is not None and len(reseeded.validation) == 58
    assert not np.array_equal(reseeded.validation.images, holding.validation.images)
    evaluator = load_shard(WorkerConfig("testing", testing=True))
    assert evaluator.validation is None and len(evaluator.data) == 360


# Pooling -----------------------------------------------------------------------


@st.composite
def site_results(draw: st.DrawFn) -> list[EvalResult]:
    classes = draw(st.integers(1, 6))
    results = []
    for _ in range(draw(st.integers(1, 6))):
        predictions = draw(st.lists(st.integers(0, 500), min_size=classes, max_size=classes).filter(any))
        total = sum(predictions)
        loss = draw(st.floats(0, 50, allow_nan=False))
        results.append(EvalResult(loss, draw(st.integers(0, total)), total, tuple(predictions)))
    return results


@settings(max_examples=80, deadline=None)
@given(results=site_results())
def test_pool_is_the_example_weighted_average(results: list[EvalResult]) -> None:
    pooled = pool(results)
    counts = np.array([result.num_examples for result in results], dtype=np.float64)
    assert pooled.loss == pytest.approx(np.average([result.loss for result in results], weights=counts), rel=1e-12)
    assert pooled.num_examples == int(counts.sum())
    assert pooled.correct == sum(result.correct for result in results)
    assert pooled.accuracy == pytest.approx(np.dot([r.accuracy for r in results], counts) / counts.sum(), rel=1e-12)
    np.testing.assert_array_equal(pooled.predictions, np.sum([result.predictions for result in results], axis=0))
    assert pool(reversed(results)) == pooled


def test_pool_refuses_nothing_and_mixed_class_counts() -> None:
    with pytest.raises(AggregationError, match="^no site results to pool$"):
        pool([])
    with pytest.raises(AggregationError, match=r"^site results have \[2, 3\] classes, not one number of classes$"):
        pool([EvalResult(1.0, 1, 2, (1, 1)), EvalResult(1.0, 1, 3, (1, 1, 1))])


# The cross-site matrix ---------------------------------------------------------


def small_matrix() -> CrossSiteMatrix:
    return CrossSiteMatrix(
        round=3,
        models=("alice", "federated"),
        sites=("alice", "testing"),
        splits=("validation", "test"),
        cells=(
            (EvalResult(0.5, 9, 10, (9, 1)), "worker testing is unavailable: gone"),
            (EvalResult(0.25, 3, 4, (2, 2)), EvalResult(1.5, 1, 8, (4, 4))),
        ),
    )


def test_matrix_table_json_and_accuracy() -> None:
    matrix = small_matrix()
    assert matrix.table() == [
        "model \\ data  alice (validation)  testing (test)",
        "alice                     90.00%               -",
        "federated                 75.00%          12.50%",
        "  - alice on testing: worker testing is unavailable: gone",
    ]
    np.testing.assert_array_equal(matrix.values(), [[0.9, np.nan], [0.75, 0.125]])
    data = matrix.to_json()
    assert data["cells"][0][1] == {"error": "worker testing is unavailable: gone"}
    assert data["cells"][1][1] == {"loss": 1.5, "accuracy": 0.125, "correct": 1, "n": 8}
    assert json.loads(json.dumps(data)) == data
    assert matrix.cell("federated", "alice") == EvalResult(0.25, 3, 4, (2, 2))


def test_matrix_refuses_inconsistent_shapes() -> None:
    matrix = small_matrix()
    with pytest.raises(ConfigError, match=r"^cells have rows of \[2\], expected 2 rows of 2$"):
        replace(matrix, cells=matrix.cells[:1])
    with pytest.raises(ConfigError, match=r"^model names \['a', 'a'\] must be distinct and at least one$"):
        replace(matrix, models=("a", "a"))
    with pytest.raises(ConfigError, match="must name validation or test for each site"):
        replace(matrix, splits=("validation", "train"))


def test_write_cross_site_saves_json_and_a_heat_map(tmp_path: Path) -> None:
    written = write_cross_site(small_matrix(), tmp_path / "out")
    assert written == [tmp_path / "out" / "cross_site.json", tmp_path / "out" / "cross_site.png"]
    assert json.loads(written[0].read_text()) == small_matrix().to_json()
    assert written[1].read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(written[1]).shape[2] in (3, 4)


def test_without_matplotlib_only_the_json_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # makes the import fail
    assert write_cross_site(small_matrix(), tmp_path) == [tmp_path / "cross_site.json"]
    assert not (tmp_path / "cross_site.png").exists()


# Messages ----------------------------------------------------------------------


def entry(key: str = "main", **changes: Any) -> DatasetInfo:
    fields: dict[str, Any] = {
        "key": key,
        "dataset": "digits",
        "split": "train",
        "version": "sha256:0123456789abcdef",
        "input_shape": (1, 8, 8),
        "dtype": "float32",
        "num_classes": 2,
        "histogram": (3, 4),
        "validation_size": 1,
    }
    return DatasetInfo(**{**fields, **changes})


def test_new_fields_round_trip_and_defaults_stay_off_the_wire() -> None:
    weights = {"w": np.ones(2, dtype=np.float32)}
    info = Info("a", "trainer", "digits", (1, 8, 8), 2, (3, 4), ("digits-cnn",), 1, 7, (entry(), entry("small")))
    evaluate = Evaluate("digits-cnn", weights, 16, "validation", "main")
    plan = TrainingPlan(round=1, batch_size=2, num_batches=1, lr=0.1, seed=0)
    fit = Fit("digits-cnn", weights, plan, None, "main")
    for message in (info, evaluate, fit):
        assert decode(encode(1, message)).message == message
    wire = info.to_body()
    assert wire["validation_size"] == 7 and [item["key"] for item in wire["datasets"]] == ["main", "small"]

    plain_info = replace(info, validation_size=0, datasets=())
    assert sorted(plain_info.to_body()) == sorted(
        ["worker_id", "role", "dataset", "input_shape", "num_classes", "histogram", "models", "protocol_version"]
    )
    assert sorted(Evaluate("digits-cnn", weights, 16).to_body()) == ["batch_size", "model", "weights"]
    assert sorted(Fit("digits-cnn", weights, plan).to_body()) == ["model", "plan", "weights"]
    assert evaluate != replace(evaluate, split=None) and fit != replace(fit, dataset_key=None)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: Evaluate("m", {}, 1, "train"), "split must be one of validation, not 'train'"),
        (lambda: Evaluate("m", {}, 1, None, ""), "dataset_key must be a string of 1 to 256 characters, not ''"),
        (lambda: entry(split="valid"), "split must be train or test, not 'valid'"),
        (lambda: entry(dtype="object"), "dtype must be one of"),
        (lambda: entry(histogram=(1,)), "histogram must have num_classes entries"),
        (lambda: entry(validation_size=-1), "validation_size must be a non-negative integer"),
        (
            lambda: Info("a", "trainer", "d", (1,), 1, (1,), (), 1, 0, (entry(), entry())),
            "data set keys ['main', 'main'] must be distinct",
        ),
    ],
)
def test_invalid_new_fields_cannot_be_built(build: Any, reason: str) -> None:
    with pytest.raises(ProtocolError) as error:
        build()
    assert str(error.value).startswith(reason)


def test_info_with_a_non_list_of_data_sets_cannot_be_decoded() -> None:
    info_body = Info("a", "trainer", "d", (1,), 1, (1,), ()).to_body()
    with pytest.raises(ProtocolError, match="^datasets must be a list of at most 64 data set entries$"):
        Info.from_body({**info_body, "datasets": {"main": 1}})


# Flags and settings -------------------------------------------------------------


def test_dataset_specs_parse_and_refuse_bad_text() -> None:
    assert parse_dataset_spec("digits-train=digits:train") == DatasetSpec("digits-train", "digits", "train")
    with pytest.raises(ConfigError) as error:
        parse_dataset_spec("digits:train")
    assert str(error.value) == (
        "data set spec 'digits:train' must look like digits-train=digits:train (KEY=DATASET:SPLIT)"
        " or north=csv:claims.csv (KEY=SPEC of own data)"
    )
    # Not a bundled data set: own data, a loader function train of a module cifar, opened when the worker starts.
    assert parse_dataset_spec("a=cifar:train") == DatasetSpec("a", source="cifar:train")
    with pytest.raises(ConfigError, match="^split 'valid' of data set a is not train or test$"):
        parse_dataset_spec("a=digits:valid")
    with pytest.raises(ConfigError, match="^data set key 'a b' must be 1 to 64 letters"):
        parse_dataset_spec("a b=digits:train")


def test_settings_refuse_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^validation fraction must be in \[0, 1\), not 1.0$"):
        WorkerConfig("alice", val_fraction=1.0)
    spec = DatasetSpec("a", "digits", "train")
    with pytest.raises(ConfigError, match="^data set key 'a' appears twice$"):
        WorkerConfig("alice", datasets=(spec, spec))
    with pytest.raises(ConfigError, match="^data set key '' must be"):
        CoordinatorConfig(dataset_key="")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file; name a folder$"):
        CoordinatorConfig(cross_site_out=tmp_path / "file")


def test_worker_flags_and_config_file_reach_the_settings(tmp_path: Path) -> None:
    config_file = tmp_path / "worker.toml"
    config_file.write_text('id = "alice"\nval-fraction = 0.2\ndataset-spec = ["a=digits:train", "b=digits:test"]\n')
    args = parse_arguments(server_cli.build_parser(), ["--config", str(config_file), "--val-seed", "5"])
    config = server_cli.config_from_args(args)
    assert config.datasets == (DatasetSpec("a", "digits", "train"), DatasetSpec("b", "digits", "test"))
    assert (config.val_fraction, config.val_seed) == (0.2, 5)
    default = server_cli.config_from_args(parse_arguments(server_cli.build_parser(), ["--id", "bob"]))
    assert (default.val_fraction, default.val_seed, default.datasets) == (0.1, None, ())


def test_coordinator_flags_reach_the_settings() -> None:
    parser = client_cli.build_parser()
    args = parse_arguments(
        parser,
        ["--federated-eval", "--cross-site-validation", "--cross-site-out", "x", "--dataset-key", "main"],
    )
    config = client_cli.config_from_args(args, {"alice": "ws://localhost:1"}, {})
    assert (config.federated_eval, config.cross_site_validation) == (True, True)
    assert (config.cross_site_out, config.dataset_key) == (Path("x"), "main")
    plain = client_cli.config_from_args(parse_arguments(parser, []), {"alice": "ws://localhost:1"}, {})
    assert (plain.federated_eval, plain.cross_site_validation, plain.cross_site_out, plain.dataset_key) == (
        False,
        False,
        None,
        None,
    )


def test_a_trainer_without_a_validation_split_is_refused_before_round_one() -> None:
    coordinator = Coordinator(
        CoordinatorConfig(workers={"alice": "ws://localhost:1"}, evaluator={}, federated_eval=True)
    )
    info = Info("alice", "trainer", "digits", (1, 8, 8), 2, (3, 4), ("digits-cnn",))
    with pytest.raises(IncompatibleWorkers) as error:
        coordinator._chosen_data("alice", info)
    assert str(error.value) == (
        "alice holds no validation split, which --federated-eval needs; start it with --val-fraction above 0"
    )
    assert coordinator._chosen_data("alice", replace(info, validation_size=1)).validation_size == 1


# End to end: federated evaluation and cross-site validation (synchronous) --------


def settings_for(workers: dict[str, WorkerProcess], **changes: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers={name: workers[name].uri for name in TRAINERS},
        evaluator={"testing": workers["testing"].uri},
        connect_timeout=10_000 * MS,
        request_timeout=60_000 * MS,
        **changes,
    )


@pytest.fixture(scope="module")
def evaluated(digits_workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three rounds with federated evaluation every round and cross-site validation at the end."""
    out = tmp_path_factory.mktemp("evaluated")
    report: list[str] = []
    config = settings_for(
        digits_workers,
        training_rounds=3,
        eval_every=1,
        federated_eval=True,
        cross_site_validation=True,
        metrics_out=out / "metrics.jsonl",
    )
    result = run(Coordinator(config, report=report.append).run())
    return {"result": result, "report": report, "out": out, "config": config}


def test_federated_evaluation_matches_an_independent_computation(
    evaluated: dict[str, Any], digits_train: tuple[np.ndarray, np.ndarray]
) -> None:
    result: RunResult = evaluated["result"]
    assert [record.round for record in result.site_evaluations] == [1, 2, 3]
    last = result.site_evaluations[-1]
    assert last.failed == {} and list(last.sites) == list(TRAINERS)
    losses, counts, corrects = [], [], []
    for name in TRAINERS:
        images, labels = site_data(digits_train, name, 1)
        loss, correct = score(result.weights, images, labels)
        reply = last.sites[name]
        assert (reply.num_examples, reply.correct) == (len(labels), correct), name
        assert reply.loss == pytest.approx(loss, rel=1e-5), name
        losses.append(loss)
        counts.append(len(labels))
        corrects.append(correct)
    assert counts == [58, 44, 43]  # 10% of 576, 435 and 426, rounded
    average = last.average
    assert average.num_examples == sum(counts) and average.correct == sum(corrects)
    assert average.loss == pytest.approx(np.average(losses, weights=counts), rel=1e-5)


def test_federated_evaluation_is_reported_and_recorded(evaluated: dict[str, Any]) -> None:
    result: RunResult = evaluated["result"]
    report: list[str] = evaluated["report"]
    events = read_metrics(evaluated["out"] / "metrics.jsonl")
    federated = [event for event in events if event["event"] == "federated_eval"]
    assert [event["round"] for event in federated] == [1, 2, 3]
    for event, record in zip(federated, result.site_evaluations, strict=True):
        assert event["failed"] == {}
        for name, reply in record.sites.items():
            assert event["sites"][name] == {
                "loss": reply.loss,
                "accuracy": reply.accuracy,
                "correct": reply.correct,
                "n": reply.num_examples,
            }
        assert event["average"]["correct"] == record.average.correct
        assert event["average"]["n"] == record.average.num_examples
        assert event["central"]["accuracy"] == result.accuracy(event["round"])
    # Each federated evaluation comes after the central evaluation of its round.
    order = [(event["round"], event["event"]) for event in events]
    assert order.index((3, "eval")) < order.index((3, "federated_eval"))

    last = result.site_evaluations[-1]
    start = report.index("Federated evaluation at round 3/3 (validation splits):")
    alice = last.sites["alice"]
    assert report[start + 1] == (
        f"Site alice: Average loss: {alice.loss:.4f}, Accuracy: {alice.correct}/{alice.num_examples}"
        f" ({alice.accuracy:.2%})"
    )
    average = last.average
    assert report[start + 4] == (
        f"Weighted average over 3 sites: Average loss: {average.loss:.4f}, Accuracy: {average.correct}/"
        f"{average.num_examples} ({average.accuracy:.2%}); central evaluator: {result.accuracy(3):.2%}"
    )


def test_a_worker_trains_only_on_what_it_does_not_hold_out(
    digits_workers: dict[str, WorkerProcess], digits_train: tuple[np.ndarray, np.ndarray]
) -> None:
    """Alice's update for a plan equals training in-process on her examples minus her validation split."""
    torch.manual_seed(3)
    initial = get_weights(DigitsCNN())
    plan = TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=11)

    async def fit_and_hello() -> tuple[Info, FitResult]:
        async with WorkerLink("alice", digits_workers["alice"].uri, max_message_size=2**30) as alice:
            info = await alice.request(Hello())
            reply = await alice.request(Fit("digits-cnn", initial, plan), timeout=60_000 * MS)
        assert isinstance(info, Info) and isinstance(reply, FitResult)
        return info, reply

    info, reply = run(fit_and_hello())
    images, labels = site_data(digits_train, "alice", 0)
    assert info.validation_size == 58 and reply.num_examples == len(labels) == info.num_examples == 518
    assert list(info.histogram[:4]) == np.bincount(labels, minlength=10)[:4].tolist()

    def trained_on(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        from syncfed.datasets import Dataset

        model = DigitsCNN()
        set_weights(model, initial)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the worker does
        try:
            torch.manual_seed(plan.seed)
            train(model, Dataset("digits", images, labels), plan, torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        return get_weights(model)

    expected = trained_on(images, labels)
    for name, array in expected.items():
        np.testing.assert_allclose(reply.weights[name], array, rtol=1e-4, atol=1e-5, err_msg=name)
    # The same plan over the whole shard, validation split included, gives other weights: the check can fail.
    everything = split_indices(digits_train[1], CLASSES["alice"], seed_of("alice"))
    whole = sorted(everything[0] + everything[1])
    other = trained_on(digits_train[0][whole], digits_train[1][whole])
    assert max(float(np.max(np.abs(other[name] - reply.weights[name]))) for name in other) > 1e-2


def test_cross_site_matrix_shape_cells_and_files(
    evaluated: dict[str, Any], digits_train: tuple[np.ndarray, np.ndarray]
) -> None:
    result: RunResult = evaluated["result"]
    matrix = result.cross_site
    assert matrix is not None
    assert matrix.round == 3
    assert matrix.models == (*TRAINERS, FEDERATED)
    assert matrix.sites == (*TRAINERS, "testing")
    assert matrix.splits == ("validation",) * 3 + ("test",)
    assert matrix.values().shape == (4, 4) and not np.isnan(matrix.values()).any()

    images, labels = site_data(digits_train, "bob", 1)
    loss, correct = score(result.weights, images, labels)
    cell = matrix.cell(FEDERATED, "bob")
    assert isinstance(cell, EvalResult)
    assert (cell.correct, cell.num_examples) == (correct, len(labels)) and cell.loss == pytest.approx(loss, rel=1e-5)
    # The global model on the evaluator's test set is the central evaluation of the last round.
    assert matrix.cell(FEDERATED, "testing") == next(
        record.result for record in result.evaluations if record.round == 3 and record.model == FEDERATED
    )
    # A local model on the test set is what the evaluator said of that worker's last update.
    for name in TRAINERS:
        assert matrix.cell(name, "testing") == next(
            record.result for record in result.evaluations if record.round == 3 and record.model == name
        )

    directory = evaluated["out"] / "cross-site"  # beside --metrics-out
    saved = json.loads((directory / "cross_site.json").read_text())
    assert saved == matrix.to_json()
    assert (directory / "cross_site.png").read_bytes()[:8] == PNG_MAGIC
    events = read_metrics(evaluated["out"] / "metrics.jsonl")
    assert events[-1] == {"event": "cross_site", **matrix.to_json()}
    assert (
        f"Saved the cross-site matrix to {directory / 'cross_site.json'}, {directory / 'cross_site.png'}"
        in (evaluated["report"])
    )


def test_a_local_model_cell_matches_an_independent_evaluation(
    evaluated: dict[str, Any], digits_workers: dict[str, WorkerProcess], digits_train: tuple[np.ndarray, np.ndarray]
) -> None:
    """Bob's local model is his round-3 update: rebuilt from the round-2 global model, scored on alice's data here."""
    config: CoordinatorConfig = evaluated["config"]
    two_rounds = replace(
        config,
        training_rounds=2,
        evaluator={},
        federated_eval=False,
        cross_site_validation=False,
        metrics_out=None,
    )
    global_two = run(Coordinator(two_rounds, report=lambda _: None).run()).weights
    plan = TrainingPlan(
        round=3,
        batch_size=config.batch_size,
        num_batches=config.federate_after_n_batches,
        lr=config.learning_rate(3),
        seed=plan_seed(config.seed, 3, TRAINERS.index("bob")),
    )

    async def bob_update() -> FitResult:
        async with WorkerLink("bob", digits_workers["bob"].uri, max_message_size=2**30) as bob:
            await bob.request(Hello())
            reply = await bob.request(Fit("digits-cnn", global_two, plan), timeout=60_000 * MS)
        assert isinstance(reply, FitResult)
        return reply

    local = run(bob_update()).weights
    images, labels = site_data(digits_train, "alice", 1)
    loss, correct = score(local, images, labels)
    matrix = evaluated["result"].cross_site
    cell = matrix.cell("bob", "alice")
    assert isinstance(cell, EvalResult)
    assert (cell.correct, cell.num_examples) == (correct, 58) and cell.loss == pytest.approx(loss, rel=1e-5)


def test_a_site_lost_before_cross_site_validation_leaves_empty_cells(
    digits_workers: dict[str, WorkerProcess], disposable_worker: WorkerProcess, tmp_path: Path
) -> None:
    """erin dies after the last round: her column is empty with the reason, her model is still scored elsewhere."""

    def kill_after_last_round(event: Mapping[str, Any]) -> None:
        if event.get("event") == "round" and event.get("round") == 2:
            os.kill(disposable_worker.process.pid, signal.SIGKILL)

    config = CoordinatorConfig(
        workers={"alice": digits_workers["alice"].uri, "erin": disposable_worker.uri},
        evaluator={"testing": digits_workers["testing"].uri},
        training_rounds=2,
        eval_every=5,
        min_workers=1,
        federated_eval=True,
        cross_site_validation=True,
        cross_site_out=tmp_path / "matrix",
        connect_timeout=5000 * MS,
        request_timeout=30_000 * MS,
    )
    report: list[str] = []
    result = run(Coordinator(config, report=report.append, listeners=[kill_after_last_round]).run())
    matrix = result.cross_site
    assert matrix is not None and matrix.models == ("alice", "erin", FEDERATED)
    for model in matrix.models:
        assert isinstance(matrix.cell(model, "erin"), str)
    assert all(
        isinstance(matrix.cell(model, site), EvalResult) for model in matrix.models for site in ("alice", "testing")
    )
    last = result.site_evaluations[-1]
    assert list(last.sites) == ["alice"] and list(last.failed) == ["erin"]
    assert any(line.startswith("Site erin: not evaluated (") for line in report)
    assert (tmp_path / "matrix" / "cross_site.json").is_file()


# End to end: the data-set registry ---------------------------------------------

REGISTRY_SPECS = ["--dataset-spec", "main=digits:train", "--dataset-spec", "small=digits:test"]
REGISTRY_CLASSES = {"grace": (0, 1, 2, 3, 4), "heidi": (5, 6, 7, 8, 9)}


@pytest.fixture(scope="module")
def registry_workers() -> Iterator[dict[str, WorkerProcess]]:
    """grace (digits 0-4) and heidi (5-9) hold two named data sets; judge, the evaluator, holds only main."""
    plan = [
        ("grace", [*THREADS, "--digits", "0-4", *REGISTRY_SPECS]),
        ("heidi", [*THREADS, "--digits", "5-9", *REGISTRY_SPECS]),
        ("judge", [*THREADS, "--testing", "--dataset-spec", "main=digits:test"]),
    ]
    with running_workers(plan) as workers:
        yield workers


def registry_settings(
    workers: dict[str, WorkerProcess], *, evaluator: bool = True, **changes: Any
) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers={name: workers[name].uri for name in REGISTRY_CLASSES},
        evaluator={"judge": workers["judge"].uri} if evaluator else {},
        connect_timeout=10_000 * MS,
        request_timeout=60_000 * MS,
        **changes,
    )


def hello(process: WorkerProcess) -> Info:
    async def greet() -> Info:
        async with WorkerLink(process.worker_id, process.uri, max_message_size=2**20) as client:
            info = await client.request(Hello())
        assert isinstance(info, Info)
        return info

    return run(greet())


def test_a_worker_advertises_its_named_data_sets(registry_workers: dict[str, WorkerProcess]) -> None:
    info = hello(registry_workers["grace"])
    assert [entry.key for entry in info.datasets] == ["main", "small"]
    for entry, split in zip(info.datasets, ("train", "test"), strict=True):
        source = load_dataset("digits", split)
        shard = np.flatnonzero(np.isin(source.labels, REGISTRY_CLASSES["grace"]))
        held = min(max(round(0.1 * len(shard)), 1), len(shard) - 1)
        assert (entry.dataset, entry.split, entry.dtype, entry.num_classes) == ("digits", split, "float32", 10)
        assert entry.input_shape == (1, 8, 8)
        assert (entry.num_examples, entry.validation_size) == (len(shard) - held, held)
        assert entry.version == source.subset(shard).fingerprint()
    # The top-level fields describe the default, first, data set.
    assert (info.num_examples, info.validation_size) == (
        info.datasets[0].num_examples,
        info.datasets[0].validation_size,
    )
    judge = hello(registry_workers["judge"])
    assert [entry.key for entry in judge.datasets] == ["main"] and judge.validation_size == 0


def test_a_worker_without_specs_advertises_no_data_sets(digits_workers: dict[str, WorkerProcess]) -> None:
    info = hello(digits_workers["alice"])
    assert info.datasets == () and info.validation_size == 58


def test_dataset_key_selects_what_the_workers_train_on(
    registry_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    for key, split in (("main", "train"), ("small", "test")):
        metrics = tmp_path / f"{key}.jsonl"
        config = registry_settings(registry_workers, evaluator=False, training_rounds=1, dataset_key=key)
        run(Coordinator(replace(config, metrics_out=metrics), report=lambda _: None).run())
        source = load_dataset("digits", split)
        expected = {}
        for name, classes in REGISTRY_CLASSES.items():
            shard = int(np.isin(source.labels, classes).sum())
            expected[name] = shard - min(max(round(0.1 * shard), 1), shard - 1)
        (round_event,) = [event for event in read_metrics(metrics) if event["event"] == "round"]
        assert round_event["num_examples"] == expected, key


def test_a_worker_lacking_the_data_set_stops_the_run_before_round_one(
    registry_workers: dict[str, WorkerProcess], digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    config = registry_settings(registry_workers, dataset_key="small", metrics_out=metrics)
    with pytest.raises(IncompatibleWorkers) as error:
        run(Coordinator(config, report=lambda _: None).run())
    assert str(error.value) == (
        "judge has no data set small (its data sets: main); start it with --dataset-spec small=..."
    )
    assert not metrics.exists()
    plain = replace(settings_for(digits_workers), dataset_key="main")
    with pytest.raises(IncompatibleWorkers) as error:
        run(Coordinator(plain, report=lambda _: None).run())
    assert str(error.value).startswith("alice has no data set main (its data sets: none);")


def test_a_request_for_a_data_set_the_worker_lacks_gets_an_error_reply(
    registry_workers: dict[str, WorkerProcess],
) -> None:
    weights = get_weights(DigitsCNN())

    async def ask() -> None:
        async with WorkerLink("judge", registry_workers["judge"].uri, max_message_size=2**30) as judge:
            await judge.request(Hello())
            with pytest.raises(RemoteError) as error:
                await judge.request(Evaluate("digits-cnn", weights, 64, dataset_key="small"))
            assert (error.value.code, error.value.reason) == (
                "incompatible",
                "data set 'small' is not held by this worker (it has main)",
            )
            with pytest.raises(RemoteError) as error:
                await judge.request(Evaluate("digits-cnn", weights, 64, "validation"))
            assert error.value.reason == (
                "this worker holds no validation split (it is the evaluator, or runs with --val-fraction 0)"
            )

    run(ask())


def test_asynchronous_run_with_federated_eval_and_cross_site_on_a_named_data_set(
    registry_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    config = registry_settings(
        registry_workers,
        mode="async",
        buffer_size=2,
        training_rounds=3,
        eval_every=2,
        federated_eval=True,
        cross_site_validation=True,
        cross_site_out=tmp_path / "matrix",
        dataset_key="small",
        evaluator=False,
    )
    result = run(Coordinator(config, report=lambda _: None).run())
    assert [record.round for record in result.site_evaluations] == [1, 3]
    matrix = result.cross_site
    assert matrix is not None and matrix.models == ("grace", "heidi", FEDERATED) and matrix.sites == ("grace", "heidi")
    assert all(isinstance(cell, EvalResult) for row in matrix.cells for cell in row)
    # The global model on grace's validation split of "small", computed here.
    source = load_dataset("digits", "test")
    shard = np.flatnonzero(np.isin(source.labels, REGISTRY_CLASSES["grace"]))
    _, held = split_indices(source.labels[shard], REGISTRY_CLASSES["grace"], seed_of("grace"))
    images, labels = source.images[shard][held], source.labels[shard][held]
    loss, correct = score(result.weights, images, labels)
    cell = matrix.cell(FEDERATED, "grace")
    assert isinstance(cell, EvalResult)
    assert (cell.correct, cell.num_examples) == (correct, len(labels)) and cell.loss == pytest.approx(loss, rel=1e-5)
    assert result.site_evaluations[-1].sites["grace"] == cell
    assert (tmp_path / "matrix" / "cross_site.png").read_bytes()[:8] == PNG_MAGIC
