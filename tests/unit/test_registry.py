"""The model registry: versions recorded in SQLite, weights content-addressed and checked on every read."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from units import MS

from syncfed.exceptions import CheckpointError, ConfigError
from syncfed.registry import ModelRegistry, ModelVersion, content_hash

FAST = settings(max_examples=25, deadline=None)
CLI_TIMEOUT = 60_000 * MS

WIRE_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)


def raw_array(dtype_name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """An array of random bits: NaNs with payloads, -0.0 and subnormals included (bools are 0 or 1)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype_name)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    count = int(np.prod(shape))
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()


@st.composite
def weight_sets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(
            st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True), min_size=1, max_size=5, unique=True
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        name: raw_array(draw(st.sampled_from(WIRE_DTYPES)), draw(shapes), seed + index)
        for index, name in enumerate(names)
    }


def independent_hash(weights: dict[str, np.ndarray]) -> str:
    """The documented hash, written out again: tag, then per tensor a length-prefixed header and the bytes."""
    parts = [b"syncfed-weights/1\n"]
    for name, array in weights.items():
        header = json.dumps([name, array.dtype.name, [int(size) for size in array.shape]]).encode()
        parts += [len(header).to_bytes(8, "little"), header, array.astype(array.dtype.newbyteorder("<")).tobytes()]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def same_bits(loaded: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> bool:
    return list(loaded) == list(original) and all(
        loaded[name].dtype == array.dtype
        and loaded[name].shape == array.shape
        and loaded[name].tobytes() == array.tobytes()
        for name, array in original.items()
    )


def small(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, dtype=np.float32), "steps": np.array([int(value * 1000)], dtype=np.int64)}


def record(
    registry: ModelRegistry, run_id: str, round: int, weights: dict[str, np.ndarray], **extra: object
) -> ModelVersion:
    arguments: dict[str, object] = {
        "participants": ["alice", "bob"],
        "strategy": {"name": "fedavg"},
        "settings": {"input_shape": [1, 8, 8], "lr": 0.1},
    }
    arguments.update(extra)
    return registry.record(run_id=run_id, round=round, model="digits-cnn", weights=weights, **arguments)  # type: ignore[arg-type]


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def populated(registry: ModelRegistry) -> ModelRegistry:
    """Run alpha: rounds 1-3; run beta: rounds 1-2; each with accuracy and loss."""
    scores = {("alpha", 1): (0.50, 1.2), ("alpha", 2): (0.80, 0.6), ("alpha", 3): (0.75, 0.7)}
    scores |= {("beta", 1): (0.60, 0.9), ("beta", 2): (0.70, 0.5)}
    for (run_id, round), (accuracy, loss) in scores.items():
        record(registry, run_id, round, small(accuracy + round), metrics={"accuracy": accuracy, "loss": loss})
    return registry


# Content hash


@FAST
@given(weights=weight_sets())
def test_content_hash_is_the_documented_digest(weights: dict[str, np.ndarray]) -> None:
    assert content_hash(weights) == independent_hash(weights)


@FAST
@given(weights=weight_sets(), data=st.data())
def test_hash_changes_when_any_byte_changes(weights: dict[str, np.ndarray], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([name for name, array in weights.items() if array.nbytes > 0] or [None]))
    if name is None:  # only empty tensors: change a shape instead
        first = next(iter(weights))
        changed = {**weights, first: np.zeros((*weights[first].shape, 0), dtype=weights[first].dtype)}
    else:
        raw = bytearray(weights[name].tobytes())
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] ^= 1 if weights[name].dtype == np.bool_ else data.draw(st.integers(1, 255))
        changed = {**weights, name: np.frombuffer(bytes(raw), dtype=weights[name].dtype).reshape(weights[name].shape)}
    assert content_hash(changed) != content_hash(weights)


def test_hash_covers_names_dtypes_shapes_and_order() -> None:
    weights = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.ones(2, dtype=np.float32)}
    digest = content_hash(weights)
    variants = [
        {"A": weights["a"], "b": weights["b"]},  # a name
        {"a": weights["a"].view(np.float32), "b": weights["b"]},  # same bytes, another dtype
        {"a": weights["a"].reshape(3, 2), "b": weights["b"]},  # same bytes, another shape
        {"b": weights["b"], "a": weights["a"]},  # the state dict's order
    ]
    assert len({digest, *map(content_hash, variants)}) == 5
    assert (
        content_hash({name: array.astype(array.dtype.newbyteorder(">")) for name, array in weights.items()}) == digest
    )


def test_hash_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ConfigError, match=r"^weights hold no tensors$"):
        content_hash({})
    with pytest.raises(ConfigError, match=r"^tensor c has dtype complex64, not one of float16, .*, bool$"):
        content_hash({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(ConfigError, match=r"^tensor x is a list, not a numpy array$"):
        content_hash({"x": [1.0]})  # type: ignore[dict-item]


# Recording and reading back


@FAST
@given(weights=weight_sets())
def test_record_then_load_is_bit_identical(weights: dict[str, np.ndarray]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        registry = ModelRegistry(Path(directory))
        version = record(registry, "run", 1, weights)
        assert version.hash == independent_hash(weights)
        assert version.path == Path(directory).resolve() / "weights" / f"{version.hash}.safetensors"
        assert same_bits(registry.load_weights(version), weights)
        assert same_bits(ModelRegistry(Path(directory), create=False).load_weights("run:1"), weights)


def test_float32_float64_and_int64_load_back_bit_identical(registry: ModelRegistry) -> None:
    weights = {
        "conv.weight": raw_array("float32", (4, 1, 3, 3), 1),
        "fc.bias": raw_array("float64", (10,), 2),
        "bn.running_mean": np.array([-0.0, np.inf, -np.inf, np.nan, 5e-324], dtype=np.float64),
        "steps": np.array([np.iinfo(np.int64).min, -1, np.iinfo(np.int64).max], dtype=np.int64),
    }
    assert same_bits(registry.load_weights(record(registry, "r", 7, weights)), weights)


def test_zero_dimensional_tensors_keep_their_shape(registry: ModelRegistry) -> None:
    weights = {"bn.num_batches_tracked": np.array(17, dtype=np.int64), "w": np.ones(3, dtype=np.float32)}
    assert same_bits(registry.load_weights(record(registry, "r", 1, weights)), weights)


def test_entry_keeps_what_was_recorded(registry: ModelRegistry) -> None:
    version = record(registry, "demo", 4, small(1.0), metrics={"accuracy": 0.5})
    again = registry.get(version.id)
    assert again == version
    assert (again.run_id, again.round, again.model) == ("demo", 4, "digits-cnn")
    assert again.participants == ("alice", "bob")
    assert again.strategy == {"name": "fedavg"}
    assert again.settings == {"input_shape": [1, 8, 8], "lr": 0.1}
    assert again.metrics == {"accuracy": 0.5}
    assert again.created.endswith("+00:00")
    fields = ["syncfed-version/2", "demo", 4, version.hash, "digits-cnn", {"input_shape": [1, 8, 8], "lr": 0.1}]
    expected_id = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    assert again.id == expected_id


def test_equal_weights_share_one_file(registry: ModelRegistry) -> None:
    first, second = record(registry, "a", 1, small(1.0)), record(registry, "b", 1, small(1.0))
    assert first.id != second.id and first.path == second.path
    assert len(list((registry.directory / "weights").iterdir())) == 1


def test_rerecording_the_same_weights_keeps_id_time_and_metrics(registry: ModelRegistry) -> None:
    first = record(registry, "run", 2, small(1.0), metrics={"accuracy": 0.9})
    again = record(registry, "run", 2, small(1.0), participants=["alice"], metrics={"loss": 0.3})
    assert (again.id, again.created) == (first.id, first.created)
    assert again.participants == ("alice",)
    assert again.metrics == {"accuracy": 0.9, "loss": 0.3}
    assert len(registry.versions()) == 1


def test_rerecording_other_weights_replaces_the_entry(registry: ModelRegistry) -> None:
    """A resumed run that recomputed a round differently: its new weights are what later rounds build on."""
    first = record(registry, "run", 2, small(1.0), metrics={"accuracy": 0.9})
    second = record(registry, "run", 2, small(2.0))
    assert second.id != first.id and second.metrics == {}
    assert [version.id for version in registry.versions()] == [second.id]
    assert not first.path.exists(), "the replaced weights are referenced by no entry and were removed"
    assert same_bits(registry.load_weights("run:2"), small(2.0))


def test_add_metrics_merges(registry: ModelRegistry) -> None:
    record(registry, "run", 1, small(1.0), metrics={"loss": 0.5, "accuracy": 0.1})
    registry.add_metrics("run", 1, {"accuracy": 0.8, "f1": np.float32(0.75), "diverged": float("nan")})
    metrics = registry.get("run:1").metrics
    assert {name: value for name, value in metrics.items() if name != "diverged"} == {
        "accuracy": 0.8,
        "f1": pytest.approx(0.75),
        "loss": 0.5,
    }
    assert np.isnan(metrics["diverged"])
    with pytest.raises(ConfigError, match=r"^no version of run 'run' round 2 in registry .*$"):
        registry.add_metrics("run", 2, {"accuracy": 1.0})
    with pytest.raises(ConfigError, match=r"^metric accuracy is '0.9', not a number$"):
        registry.add_metrics("run", 1, {"accuracy": "0.9"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"^metric ok is True, not a number$"):
        registry.add_metrics("run", 1, {"ok": True})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"run_id": ""}, r"^run id '' must be 1 to 200 printable characters$"),
        ({"run_id": "x" * 201}, r"^run id 'x+\.\.\.x+' must be 1 to 200 printable characters$"),
        ({"run_id": "a\nb"}, r"^run id 'a\\nb' must be 1 to 200 printable characters$"),
        ({"round": -1}, r"^round -1 must be an integer of at least 0$"),
        ({"round": True}, r"^round True must be an integer of at least 0$"),
        ({"model": ""}, r"^model '' must be a non-empty string$"),
        ({"participants": "alice"}, r"^participants 'alice' must be a sequence of strings$"),
        ({"strategy": ["fedavg"]}, r"^strategy must be a mapping, not list$"),
        ({"settings": {"path": Path("x")}}, r"^settings cannot be stored as JSON: .*PosixPath.*$"),
    ],
)
def test_record_refuses_invalid_values(registry: ModelRegistry, change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "run_id": "run",
        "round": 1,
        "model": "digits-cnn",
        "weights": small(1.0),
        "participants": ["alice"],
        "strategy": {},
        "settings": {},
    }
    with pytest.raises(ConfigError, match=message):
        registry.record(**{**arguments, **change})  # type: ignore[arg-type]
    assert registry.versions() == []


# Integrity


def test_a_changed_byte_in_the_file_is_detected(registry: ModelRegistry) -> None:
    version = record(registry, "run", 1, small(1.0))
    raw = bytearray(version.path.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the tensor data
    version.path.write_bytes(bytes(raw))
    pattern = (
        rf"^weights of version {version.id[:12]} in .* have hash [0-9a-f]{{12}},"
        rf" the registry recorded {version.hash[:12]}: the file was changed$"
    )
    with pytest.raises(CheckpointError, match=pattern):
        registry.load_weights(version)
    with pytest.raises(CheckpointError, match=pattern):
        registry.export(version, registry.directory.parent / "out.safetensors")
    assert not (registry.directory.parent / "out.safetensors").exists()


def test_a_missing_or_truncated_file_is_detected(registry: ModelRegistry) -> None:
    version = record(registry, "run", 1, small(1.0))
    version.path.write_bytes(version.path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"^cannot read weights file .*\.safetensors: .*$"):
        registry.load_weights(version)
    version.path.unlink()
    with pytest.raises(CheckpointError, match=r"^cannot read weights file .*\.safetensors: .*$"):
        registry.load_weights(version)
    # Recording the same weights again repairs the file.
    record(registry, "run", 1, small(1.0))
    assert same_bits(registry.load_weights(version), small(1.0))


def test_another_schema_version_is_refused(registry: ModelRegistry) -> None:
    with sqlite3.connect(registry.database) as connection:
        connection.execute("UPDATE schema_version SET version = 1")
    connection.close()
    with pytest.raises(
        CheckpointError, match=r"^model registry .*registry\.sqlite3 has schema version 1, this syncfed reads 2$"
    ):
        ModelRegistry(registry.directory)


def test_opening_without_create_needs_a_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^no model registry in .*missing: registry\.sqlite3 is missing$"):
        ModelRegistry(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


# Finding versions


def test_versions_are_listed_oldest_first_and_by_run(populated: ModelRegistry) -> None:
    every = populated.versions()
    assert [(version.run_id, version.round) for version in every] == [
        ("alpha", 1),
        ("alpha", 2),
        ("alpha", 3),
        ("beta", 1),
        ("beta", 2),
    ]
    assert [version.created for version in every] == sorted(version.created for version in every)
    assert [version.round for version in populated.versions("beta")] == [1, 2]
    assert populated.versions("gamma") == []


def test_get_by_id_prefix_or_run_and_round(populated: ModelRegistry) -> None:
    version = populated.get("alpha:2")
    assert (version.run_id, version.round) == ("alpha", 2)
    assert populated.get(version.id) == version
    assert populated.get(version.id[:10].upper()) == version
    with pytest.raises(ConfigError, match=r"^no version of run 'alpha' round 9 in registry .*$"):
        populated.get("alpha:9")
    with pytest.raises(ConfigError, match=r"^version 'alpha:two' must be an id, an id prefix or run_id:round$"):
        populated.get("alpha:two")
    with pytest.raises(ConfigError, match=r"^version 'xyz' must be an id, an id prefix or run_id:round$"):
        populated.get("xyz")
    absent = next(
        digit for digit in "0123456789abcdef" if not any(v.id.startswith(digit) for v in populated.versions())
    )
    with pytest.raises(ConfigError, match=rf"^no version with id '{absent}' in registry .*$"):
        populated.get(absent)


def test_an_ambiguous_prefix_names_its_candidates(registry: ModelRegistry) -> None:
    # 17 ids among 16 hex digits: some first digit is shared.
    ids = [record(registry, "run", round, small(round)).id for round in range(17)]
    shared = next(digit for digit in "0123456789abcdef" if sum(i.startswith(digit) for i in ids) >= 2)
    candidates = sorted(i for i in ids if i.startswith(shared))
    shown = ", ".join(i[:12] for i in candidates[:5]) + (", ..." if len(candidates) > 5 else "")
    with pytest.raises(ConfigError) as caught:
        registry.get(shared)
    assert str(caught.value) == f"version id '{shared}' is ambiguous: it starts {shown}; give more digits"


def best_by_hand(entries: list[tuple[str, float]], lowest: bool) -> str | None:
    """The first-recorded entry holding the extreme non-NaN value, by a plain scan."""
    chosen: tuple[str, float] | None = None
    for name, value in entries:
        if np.isnan(value):
            continue
        if chosen is None or (value < chosen[1] if lowest else value > chosen[1]):
            chosen = (name, value)
    return None if chosen is None else chosen[0]


@FAST
@given(
    values=st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9, float("nan"), float("inf"), -1.0]), min_size=1, max_size=6),
    lowest=st.booleans(),
)
def test_best_agrees_with_a_plain_scan(values: list[float], lowest: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        registry = ModelRegistry(Path(directory))
        for round, value in enumerate(values):
            record(registry, "run", round, small(round), metrics={"score": value})
        expected = best_by_hand([(f"run:{round}", value) for round, value in enumerate(values)], lowest)
        if expected is None:
            with pytest.raises(ConfigError, match=r"^no version in registry .* has a value for metric 'score'$"):
                registry.best("score", lowest=lowest)
        else:
            assert registry.best("score", lowest=lowest) == registry.get(expected)


def test_best_breaks_ties_by_the_earliest_and_filters_by_run(populated: ModelRegistry) -> None:
    assert populated.best("accuracy").id == populated.get("alpha:2").id
    assert populated.best("loss", lowest=True).id == populated.get("beta:2").id
    assert populated.best("accuracy", run_id="beta").id == populated.get("beta:2").id
    populated.add_metrics("beta", 1, {"accuracy": 0.80})  # ties alpha:2, recorded later
    assert populated.best("accuracy").id == populated.get("alpha:2").id
    with pytest.raises(ConfigError, match=r"^no version of run 'gamma' in registry .* has a value for metric 'loss'$"):
        populated.best("loss", run_id="gamma")


# One writer, readers meanwhile


def test_readers_see_a_consistent_registry_while_a_writer_records(registry: ModelRegistry) -> None:
    rounds = 25
    errors: list[BaseException] = []
    seen: list[int] = []

    def read() -> None:
        reader = ModelRegistry(registry.directory, create=False)
        try:
            while len(seen) == 0 or seen[-1] < rounds:
                versions = reader.versions()
                assert all(version.metrics == {"accuracy": version.round / rounds} for version in versions)
                seen.append(len(versions))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    for round in range(1, rounds + 1):
        record(registry, "run", round, small(round), metrics={"accuracy": round / rounds})
    thread.join(timeout=CLI_TIMEOUT)
    assert not thread.is_alive() and errors == []
    assert seen == sorted(seen) and seen[-1] == rounds


def test_two_registry_objects_may_write_in_turn(registry: ModelRegistry) -> None:
    other = ModelRegistry(registry.directory)
    errors: list[BaseException] = []

    def write(target: ModelRegistry, run_id: str) -> None:
        try:
            for round in range(10):
                record(target, run_id, round, small(round + (0.5 if run_id == "b" else 0.0)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=pair) for pair in ((registry, "a"), (other, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CLI_TIMEOUT)
    assert errors == []
    assert sorted((v.run_id, v.round) for v in registry.versions()) == [(r, n) for r in "ab" for n in range(10)]


# Export


def test_export_safetensors_loads_back_equal(populated: ModelRegistry, tmp_path: Path) -> None:
    from safetensors import safe_open

    version = populated.get("alpha:2")
    target = populated.export("alpha:2", tmp_path / "out" / "model.safetensors")
    with safe_open(str(target), framework="np") as handle:
        loaded = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    assert sorted(loaded) == sorted(small(2.8)) and all(
        loaded[name].tobytes() == array.tobytes() and loaded[name].dtype == array.dtype
        for name, array in small(2.8).items()
    )
    assert json.loads(metadata["syncfed"]) == {"id": version.id, "run_id": "alpha", "round": 2, "model": "digits-cnn"}
    assert metadata["format"] == "pt"


def test_export_refuses_an_unknown_format(populated: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^export format 'pickle' is not one of safetensors, onnx$"):
        populated.export("alpha:1", tmp_path / "x", "pickle")


def test_onnx_export_without_onnx_says_what_to_install(
    populated: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(
        ConfigError, match=r"^onnx export needs the onnx and onnxscript packages: pip install onnx onnxscript$"
    ):
        populated.export("alpha:1", tmp_path / "model.onnx", "onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_export_needs_an_input_shape(registry: ModelRegistry, tmp_path: Path) -> None:
    version = record(registry, "run", 1, small(1.0), settings={})
    with pytest.raises(
        ConfigError,
        match=rf"^version {version.id[:12]} records no input_shape in its settings; give one, such as 1,8,8$",
    ):
        registry.export(version, tmp_path / "model.onnx", "onnx")
    with pytest.raises(
        ConfigError, match=r"^input shape \[1, 0\] must be one or more positive sizes, without the batch$"
    ):
        registry.export(version, tmp_path / "model.onnx", "onnx", input_shape=[1, 0])


def test_onnx_export_computes_what_the_torch_model_computes(registry: ModelRegistry, tmp_path: Path) -> None:
    """The extension picks the format, and torch's exporter keeps its notes about itself (torchvision's
    operators it skips, its own deprecations) to itself: through the library, which no command line quiets."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    from syncfed.models import DigitsCNN, get_weights

    torch.manual_seed(3)
    model = DigitsCNN().eval()
    version = record(registry, "run", 5, get_weights(model))
    # Caught at torch.onnx, whose own handler (it does not propagate) writes to the stderr it found at import.
    said = CollectingHandler()
    logging.getLogger("torch.onnx").addHandler(said)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            target = registry.export(version, tmp_path / "model.onnx")
    finally:
        logging.getLogger("torch.onnx").removeHandler(said)
    assert not [record for record in said.records if "torchvision" in record.getMessage()]
    assert not [warning for warning in warned if issubclass(warning.category, FutureWarning)], warned
    assert not (tmp_path / "model.onnx.part").exists()
    graph = onnx.load(str(target))
    onnx.checker.check_model(graph)
    batch = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)  # another batch size than traced
    (output,) = ReferenceEvaluator(graph).run(None, {"input": batch})
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5)


class CollectingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Command line


def models_cli(registry: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncfed", "models", "--registry", str(registry), *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines()[1:]:
        yield line.split()


def test_cli_list_and_show(populated: ModelRegistry) -> None:
    done = models_cli(populated.directory, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "RUN", "ROUND", "MODEL", "CREATED", "(UTC)", "METRICS"]
    listed = [(row[0], row[1], row[2], row[3], row[6:]) for row in rows(done.stdout)]
    assert listed == [
        (v.id[:12], v.run_id, str(v.round), "digits-cnn", [f"{name}={value:.4g}" for name, value in v.metrics.items()])
        for v in populated.versions()
    ]
    assert listed[1][4] == ["accuracy=0.8", "loss=0.6"]

    beta = models_cli(populated.directory, "list", "--run", "beta")
    assert [row[1:3] for row in rows(beta.stdout)] == [["beta", "1"], ["beta", "2"]]

    version = populated.get("alpha:3")
    shown = models_cli(populated.directory, "show", version.id[:8])
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(":", 1) for line in shown.stdout.splitlines())
    assert {name: value.strip() for name, value in fields.items()} == {
        "id": version.id,
        "run": "alpha",
        "round": "3",
        "model": "digits-cnn",
        "created": version.created,
        "participants": "alice, bob",
        "strategy": '{"name": "fedavg"}',
        "settings": '{"input_shape": [1, 8, 8], "lr": 0.1}',
        "metrics": "accuracy=0.75 loss=0.7",
        "hash": version.hash,
        "weights": str(version.path),
    }


def test_cli_best_and_export(populated: ModelRegistry, tmp_path: Path) -> None:
    best = models_cli(populated.directory, "best", "accuracy")
    alpha2 = populated.get("alpha:2").id[:12]
    assert (best.returncode, best.stdout) == (0, f"{alpha2} (run alpha, round 2): accuracy=0.8\n")
    lowest = models_cli(populated.directory, "best", "loss", "--lowest", "--run", "alpha")
    assert lowest.stdout == f"{alpha2} (run alpha, round 2): loss=0.6\n"

    version = populated.get("beta:1")
    done = models_cli(populated.directory, "export", "beta:1", str(tmp_path / "beta1.safetensors"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"exported {version.id[:12]} (run beta, round 1) to {tmp_path / 'beta1.safetensors'}\n"
    from safetensors.numpy import load_file

    loaded = load_file(str(tmp_path / "beta1.safetensors"))
    assert all(loaded[name].tobytes() == array.tobytes() for name, array in small(1.6).items())


def test_cli_errors_are_one_line_with_the_exit_code(populated: ModelRegistry, tmp_path: Path) -> None:
    unknown = models_cli(populated.directory, "show", "alpha:9")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == (
        f"python -m syncfed models: error: no version of run 'alpha' round 9 in registry {populated.directory}\n"
    )

    version = populated.get("alpha:1")
    raw = bytearray(version.path.read_bytes())
    raw[-1] ^= 0x01
    version.path.write_bytes(bytes(raw))
    tampered = models_cli(populated.directory, "export", "alpha:1", str(tmp_path / "x.safetensors"))
    assert (tampered.returncode, tampered.stdout) == (9, "")
    assert re.fullmatch(
        rf"python -m syncfed models: error: weights of version {version.id[:12]} in {re.escape(str(version.path))}"
        rf" have hash [0-9a-f]{{12}}, the registry recorded {version.hash[:12]}: the file was changed\n",
        tampered.stderr,
    ), tampered.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("place", "action", "code", "output", "error"),
    [
        ("empty", ["list"], 0, "no versions in {empty}\n", ""),
        ("populated", ["best", "f1"], 2, "", "no version in registry {populated} has a value for metric 'f1'"),
        ("nowhere", ["list"], 2, "", "no model registry in {nowhere}: registry.sqlite3 is missing"),
    ],
)
def test_cli_outcomes_in_process(
    populated: ModelRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    place: str,
    action: list[str],
    code: int,
    output: str,
    error: str,
) -> None:
    """The same entry point as ``python -m syncfed``, without starting an interpreter for each case."""
    from syncfed.__main__ import main

    places = {
        "empty": ModelRegistry(tmp_path / "empty").directory,
        "populated": populated.directory,
        "nowhere": tmp_path / "nowhere",
    }
    assert main(["models", "--registry", str(places[place]), *action]) == code
    captured = capsys.readouterr()
    assert captured.out == output.format(**places)
    assert captured.err == (f"python -m syncfed models: error: {error.format(**places)}\n" if error else "")


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from syncfed.cli.models import main

    with pytest.raises(SystemExit) as exited:
        main(["--registry", str(tmp_path), "export", "alpha:1", "out", "--input-shape", "1,x"])
    assert exited.value.code == 2
    assert "argument --input-shape: '1,x' is not a shape such as 1,8,8" in capsys.readouterr().err
