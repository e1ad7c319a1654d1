"""The wire types of a user's own data: schemas in hello, the agreed plan in requests, per-class counts in replies."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError
from syncfed.protocol import (
    MAX_CLASSES,
    MAX_NAME,
    DataPlan,
    DataSchema,
    DatasetInfo,
    Describe,
    EvalResult,
    Evaluate,
    Feature,
    Fit,
    Info,
    Message,
    Query,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.protocol.data_messages import (
    MAX_CATEGORIES,
    MAX_STATISTICS,
    MAX_TABLE_FEATURES,
    MAX_VOCABULARY,
    encoded_width,
)
from syncfed.tensors import encode_tensor

WEIGHTS = {"w": np.arange(4, dtype=np.float32)}
TRAINING = TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.1, seed=3)
TABLE = DataPlan(
    "table", (5,), ("no", "yes"), ("age", "city", "bmi"), {"city": ("Bern", "Oslo")}, (40, 0, 0, 0, 25), (9, 1, 1, 1, 4)
)


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> dict[str, object]:
    return msgpack.unpackb(data, raw=False)  # type: ignore[no-any-return]


def envelope(kind: str, body: object, request_id: int = 9) -> bytes:
    return pack({"v": 1, "id": request_id, "kind": kind, "body": body})


def built_and_decoded(build: object, kind: str, body: dict[str, object], reason: str) -> None:
    """The same invalid message is the caller's mistake when built here and the peer's when decoded."""
    with pytest.raises(LocalProtocolError) as local:
        build()  # type: ignore[operator]
    assert str(local.value) == reason
    with pytest.raises(RemoteProtocolError) as remote:
        decode(envelope(kind, body, 42))
    assert (str(remote.value), remote.value.code, remote.value.request_id) == (reason, "malformed", 42)


# Strategies ------------------------------------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
sorted_names = st.lists(names, max_size=6, unique=True).map(lambda values: tuple(sorted(values)))
finite = st.floats(-1e6, 1e6, allow_nan=False)
positive = st.floats(1e-6, 1e6)


@st.composite
def features(draw: st.DrawFn) -> Feature:
    if draw(st.booleans()):
        return Feature(draw(names), "categorical", draw(sorted_names))
    return Feature(draw(names))


@st.composite
def schemas(draw: st.DrawFn) -> DataSchema:
    kind = draw(st.sampled_from(["images", "table", "arrays"]))
    classes = draw(st.none() | st.lists(names, min_size=1, max_size=6, unique=True).map(tuple))
    if kind == "images":
        shape = (draw(st.sampled_from([1, 3])), draw(st.integers(1, 512)), draw(st.integers(1, 512)))
        return DataSchema(kind, shape, classes)
    if kind == "table":
        columns = draw(st.lists(features(), min_size=1, max_size=6, unique_by=lambda f: f.name))
        return DataSchema(kind, (len(columns),), classes, tuple(columns), draw(st.none() | names))
    if draw(st.booleans()):
        named = draw(st.lists(names, min_size=1, max_size=6, unique=True))
        return DataSchema(kind, (len(named),), classes, tuple(Feature(name) for name in named))
    return DataSchema(kind, tuple(draw(st.lists(st.integers(1, 16), min_size=1, max_size=4))), classes)


@st.composite
def data_plans(draw: st.DrawFn) -> DataPlan:
    schema = draw(schemas())
    columns = tuple(feature.name for feature in schema.features)
    categories = {f.name: f.categories for f in schema.features if f.type == "categorical"}
    shape = (encoded_width(columns, categories),) if schema.kind == "table" else schema.input_shape
    count = shape[0] if schema.kind == "images" else math.prod(shape)
    statistics = draw(st.booleans()) and count <= 256  # hypothesis draws lists of a few thousand at most
    plan = DataPlan(schema.kind, shape, schema.classes, columns, categories, label=schema.label)
    if not statistics:
        return plan
    mean = np.array(draw(st.lists(finite, min_size=count, max_size=count)))
    std = np.array(draw(st.lists(positive, min_size=count, max_size=count)))
    if schema.kind == "table":  # statistics apply to numeric columns only: one-hot slots keep 0 and 1
        one_hot = np.ones(count, dtype=bool)
        one_hot[plan.numeric_slots()] = False
        mean[one_hot], std[one_hot] = 0.0, 1.0
    return DataPlan(
        schema.kind, shape, schema.classes, columns, categories, tuple(mean.tolist()), tuple(std.tolist()), schema.label
    )


@st.composite
def infos(draw: st.DrawFn) -> Info:
    schema = draw(schemas())
    histogram = tuple(draw(st.lists(st.integers(0, 1000), min_size=schema.num_classes, max_size=schema.num_classes)))
    entry = DatasetInfo(
        "own",
        schema.kind,
        "train",
        "sha256:0123",
        schema.input_shape,
        "float32",
        schema.num_classes,
        histogram,
        schema=schema,
    )
    return Info(
        "alice",
        "trainer",
        schema.kind,
        schema.input_shape,
        schema.num_classes,
        histogram,
        ("mlp",),
        datasets=draw(st.sampled_from([(), (entry,)])),
        schema=schema,
    )


@st.composite
def eval_results(draw: st.DrawFn) -> EvalResult:
    counts = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(lambda c: sum(c) > 0))
    correct = [draw(st.integers(0, count)) for count in counts]
    predictions = [0] * len(counts)
    predictions[0] = sum(counts)
    return EvalResult(0.5, sum(correct), sum(counts), tuple(predictions), tuple(counts), tuple(correct))


messages = st.one_of(
    infos(),
    eval_results(),
    st.builds(Fit, model=names, weights=st.just(WEIGHTS), plan=st.just(TRAINING), data=data_plans()),
    st.builds(Evaluate, model=names, weights=st.just(WEIGHTS), batch_size=st.integers(1, 100), data=data_plans()),
    st.builds(Describe, model=names, data=data_plans()),
    st.builds(Query, query=st.just("feature-stats"), features=st.just((0, 2)), data=data_plans()),
)


# Round trips -----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(message=messages)
def test_round_trip_of_messages_with_the_new_fields(message: Message) -> None:
    data = encode(7, message)
    decoded = decode(data).message
    assert decoded == message and type(decoded) is type(message)
    assert encode(7, decoded) == data  # canonical: what was decoded encodes to the same bytes


@settings(max_examples=100, deadline=None)
@given(schema=schemas(), plan=data_plans())
def test_round_trip_of_schemas_and_plans_as_bodies(schema: DataSchema, plan: DataPlan) -> None:
    assert DataSchema.from_body(unpack(pack(schema.to_body()))) == schema
    assert DataPlan.from_body(unpack(pack(plan.to_body()))) == plan
    assert DataPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_a_plan_without_optional_fields_decodes() -> None:
    """Images and unnamed arrays carry no features, and a plan before normalisation no statistics."""
    for plan in (DataPlan("images", (1, 28, 28), ("a", "b")), DataPlan("arrays", (3, 4), None)):
        assert set(plan.to_body()) == {"kind", "input_shape", "classes"}
        assert decode(encode(3, Describe("mlp", plan))).message == Describe("mlp", plan)


def test_wire_form_of_a_plan() -> None:
    """Names travel as one bin each list, joined by nul bytes; statistics as float64 tensors."""
    table = DataPlan(
        "table",
        (6,),
        ("no", "yes"),
        ("age", "city", "bmi", "zip"),
        {"city": ("Bern", "Oslo"), "zip": ()},
        (40, 0, 0, 0, 25, 0),
        (9, 1, 1, 1, 4, 1),
    )
    assert unpack(pack(table.to_body())) == {
        "kind": "table",
        "input_shape": [6],
        "classes": b"no\x00yes",
        "features": b"age\x00city\x00bmi\x00zip",
        "types": b"\x00\x01\x00\x01",
        "categories": b"Bern\x00Oslo",
        "category_counts": b"\x02\x00\x00\x00\x00\x00\x00\x00",
        "mean": {"dtype": "float64", "shape": [6], "data": np.array([40, 0, 0, 0, 25, 0], "<f8").tobytes()},
        "std": {"dtype": "float64", "shape": [6], "data": np.array([9, 1, 1, 1, 4, 1], "<f8").tobytes()},
    }
    assert DataPlan("arrays", (2,), None).to_body() == {"kind": "arrays", "input_shape": [2], "classes": None}
    assert DataPlan("arrays", (2,), None, ("a", "b")).to_body()["features"] == b"a\x00b"  # all numeric: no types


def test_wire_form_of_a_schema() -> None:
    schema = DataSchema("table", (2,), ("0", "1"), (Feature("age"), Feature("city", "categorical", ("Oslo",))))
    assert schema.to_body() == {
        "kind": "table",
        "input_shape": [2],
        "classes": b"0\x001",
        "features": b"age\x00city",
        "types": b"\x00\x01",
        "categories": b"Oslo",
        "category_counts": b"\x01\x00\x00\x00",
    }


def test_a_plan_records_itself_as_json() -> None:
    """A saved model and a checkpoint record the plan as readable JSON; the wire's bins are not JSON."""
    assert TABLE.to_json() == {
        "kind": "table",
        "input_shape": [5],
        "classes": ["no", "yes"],
        "features": ["age", "city", "bmi"],
        "categories": {"city": ["Bern", "Oslo"]},
        "mean": [40.0, 0.0, 0.0, 0.0, 25.0],
        "std": [9.0, 1.0, 1.0, 1.0, 4.0],
    }
    assert DataPlan.from_json(json.loads(json.dumps(TABLE.to_json()))) == TABLE


def test_a_plan_is_frozen_through_and_through() -> None:
    with pytest.raises(TypeError):
        TABLE.categories["city"] = ("Rome",)  # type: ignore[index]
    assert TABLE.without_statistics() == DataPlan(
        TABLE.kind, TABLE.input_shape, TABLE.classes, TABLE.features, TABLE.categories
    )
    assert TABLE.without_statistics().digest() != TABLE.digest()
    assert DataPlan.from_body(unpack(pack(TABLE.to_body()))).digest() == TABLE.digest()


def test_num_classes_of_a_continuous_label_is_one() -> None:
    assert DataSchema("arrays", (2,), None).num_classes == DataPlan("arrays", (2,), None).num_classes == 1
    assert DataPlan("arrays", (2,), ("a", "b", "c")).num_classes == 3


def test_recall_per_class() -> None:
    result = EvalResult(0.1, 3, 6, (2, 4, 0), (2, 4, 0), (1, 2, 0))
    assert result.recall == (0.5, 0.5, None)
    assert EvalResult(0.1, 3, 6, (2, 4)).recall is None


# Without the new fields, byte for byte as before -------------------------------------------------


def test_messages_without_the_new_fields_encode_as_before() -> None:
    plan_body = {"round": 1, "batch_size": 8, "num_batches": 2, "lr": 0.1, "seed": 3}
    weights_body = {"w": {"dtype": "float32", "shape": [4], "data": np.arange(4, dtype="<f4").tobytes()}}
    info_body = {
        "worker_id": "alice",
        "role": "trainer",
        "dataset": "digits",
        "input_shape": [1, 8, 8],
        "num_classes": 2,
        "histogram": [3, 4],
        "models": ["digits-cnn"],
        "protocol_version": 1,
    }
    entry_body = {
        "key": "d",
        "dataset": "digits",
        "split": "train",
        "version": "v1",
        "input_shape": [1, 8, 8],
        "dtype": "float32",
        "num_classes": 2,
        "histogram": [3, 4],
    }
    entry = DatasetInfo("d", "digits", "train", "v1", (1, 8, 8), "float32", 2, (3, 4))
    cases: list[tuple[Message, str, dict[str, object]]] = [
        (Fit("m", WEIGHTS, TRAINING), "fit", {"model": "m", "weights": weights_body, "plan": plan_body}),
        (Evaluate("m", WEIGHTS, 64), "evaluate", {"model": "m", "weights": weights_body, "batch_size": 64}),
        (Describe("m"), "describe", {"model": "m"}),
        (
            Query("feature-stats", (0, 1)),
            "query",
            {"query": "feature-stats", "features": [0, 1], "bins": None, "range": None},
        ),
        (
            EvalResult(0.5, 3, 4, (1, 3)),
            "eval_result",
            {"loss": 0.5, "correct": 3, "num_examples": 4, "predictions": [1, 3]},
        ),
        (Info("alice", "trainer", "digits", (1, 8, 8), 2, (3, 4), ("digits-cnn",)), "info", info_body),
        (
            Info("alice", "trainer", "digits", (1, 8, 8), 2, (3, 4), ("digits-cnn",), datasets=(entry,)),
            "info",
            {**info_body, "datasets": [entry_body]},
        ),
    ]
    for message, kind, body in cases:
        assert encode(5, message) == pack({"v": 1, "id": 5, "kind": kind, "body": body}), kind


# Validation: each rule at its limit and one past it ----------------------------------------------


def test_feature_rules() -> None:
    assert Feature("x" * MAX_NAME).name == "x" * MAX_NAME
    with pytest.raises(LocalProtocolError, match=f"^feature name must be a string of 1 to {MAX_NAME} characters"):
        Feature("x" * (MAX_NAME + 1))
    vocabulary = tuple(str(i) for i in range(MAX_CATEGORIES))
    assert len(Feature("c", "categorical", vocabulary).categories) == MAX_CATEGORIES
    with pytest.raises(LocalProtocolError) as info:
        Feature("c", "categorical", (*vocabulary, "one more"))
    assert str(info.value) == (
        f"categories of feature c must be a list of at most {MAX_CATEGORIES} names, not ('0', '1', '2', '3', '4', "
        "'5', '6', '7', ...)"
    )
    cases = {
        "feature x's type must be one of numeric, categorical, not 'text'": lambda: Feature("x", "text"),
        "numeric feature x has no categories": lambda: Feature("x", "numeric", ("a",)),
        "categories of feature x must be distinct": lambda: Feature("x", "categorical", ("a", "a")),
        "each of categories of feature x must be a string of 1 to 256 characters, not ''": lambda: Feature(
            "x", "categorical", ("",)
        ),
    }
    for reason, build in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            build()
        assert str(info.value) == reason


def test_a_string_of_categories_is_refused_not_split_into_letters() -> None:
    record = {"kind": "table", "input_shape": [2], "classes": None, "features": ["x"], "categories": {"x": "a"}}
    with pytest.raises(LocalProtocolError, match="^categories of feature x must be a list of at most"):
        DataPlan.from_json(record)
    with pytest.raises(LocalProtocolError) as info:
        DataPlan.from_body({"kind": "arrays", "input_shape": [2], "classes": "ab"})
    assert str(info.value) == "classes must be a bin of names separated by nul bytes, not 'ab'"


def test_schema_shape_rules() -> None:
    assert DataSchema("arrays", (1,) * 8, None).input_shape == (1,) * 8
    assert DataSchema("arrays", (2**31,), None).input_shape == (2**31,)
    cases = {
        "input_shape must be a list of 1 to 8 positive sizes, not (1, 1, 1, 1, 1, 1, 1, 1, ...)": (1,) * 9,
        "input_shape must be a list of 1 to 8 positive sizes, not ()": (),
        "input_shape must be a list of 1 to 8 positive sizes, not (3, 0)": (3, 0),
        "input_shape (2147483649,) exceeds limit of 2**31 values per example": (2**31 + 1,),
    }
    for reason, shape in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            DataSchema("arrays", shape, None)
        assert str(info.value) == reason
    with pytest.raises(LocalProtocolError) as info:
        DataSchema("images", (28, 28), ("a",))
    assert str(info.value) == "images' input_shape must be (channels, height, width), not (28, 28)"


def test_schema_class_rules() -> None:
    many = tuple(str(i) for i in range(MAX_CLASSES))
    assert DataSchema("arrays", (2,), many).num_classes == MAX_CLASSES
    with pytest.raises(LocalProtocolError, match=f"^classes must be a list of at most {MAX_CLASSES} names"):
        DataSchema("arrays", (2,), (*many, "one more"))
    cases = {
        "classes must not be empty (a continuous label has none: null)": (),
        "classes must be distinct": ("a", "a"),
        "each of classes must be a string of 1 to 256 characters, not ''": ("",),
    }
    for reason, classes in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            DataSchema("arrays", (2,), classes)
        assert str(info.value) == reason


def test_schema_feature_rules() -> None:
    columns = tuple(Feature(f"f{i}") for i in range(MAX_TABLE_FEATURES))
    assert len(DataSchema("table", (MAX_TABLE_FEATURES,), None, columns).features) == MAX_TABLE_FEATURES
    with pytest.raises(LocalProtocolError) as info:
        DataSchema("table", (MAX_TABLE_FEATURES + 1,), None, (*columns, Feature("one more")))
    assert str(info.value) == f"features must be a list of at most {MAX_TABLE_FEATURES} features"
    # The categories of all columns together: at the limit, and one past it.
    wide = tuple(
        Feature(f"c{i}", "categorical", tuple(str(j) for j in range(MAX_CATEGORIES)))
        for i in range(MAX_VOCABULARY // MAX_CATEGORIES)
    )
    assert len(DataSchema("table", (len(wide),), None, wide).features) == len(wide)
    with pytest.raises(LocalProtocolError) as info:
        DataSchema("table", (len(wide) + 1,), None, (*wide, Feature("more", "categorical", ("x",))))
    assert str(info.value) == f"the features' categories exceed limit of {MAX_VOCABULARY}"
    cases = {
        "feature names must be distinct": lambda: DataSchema("table", (2,), None, (Feature("a"), Feature("a"))),
        "a table's input_shape must be (number of features,), not (3,)": lambda: DataSchema(
            "table", (3,), None, (Feature("a"),)
        ),
        "named array features must be numeric, one per input value": lambda: DataSchema(
            "arrays", (2, 2), None, (Feature("a"), Feature("b"))
        ),
        "images have no named features": lambda: DataSchema("images", (1, 1, 1), None, (Feature("a"),)),
        "data kind must be one of images, table, arrays, not 'video'": lambda: DataSchema("video", (2,), None),
    }
    for reason, build in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            build()
        assert str(info.value) == reason


def test_plan_rules() -> None:
    cases = {
        "categories name 'zip', which is not a feature": lambda: DataPlan(
            "table", (2,), None, ("age",), {"zip": ("1",)}
        ),
        "a table plan's input_shape must be (4,), its encoded width, not (3,)": lambda: DataPlan(
            "table", (3,), None, ("age", "city"), {"city": ("a", "b")}
        ),
        "arrays have no categorical features": lambda: DataPlan("arrays", (1,), None, ("a",), {"a": ("x",)}),
        "only arrays name their features, one per input value": lambda: DataPlan("arrays", (3,), None, ("a", "b")),
        "mean and std must have the same length": lambda: DataPlan("arrays", (2,), None, mean=(1, 2), std=(1,)),
        "mean and std must hold 3 values (one per channel), not 2": lambda: DataPlan(
            "images", (3, 8, 8), None, mean=(0, 0), std=(1, 1)
        ),
        "mean and std must hold 6 values (one per input value), not 2": lambda: DataPlan(
            "arrays", (2, 3), None, mean=(0, 0), std=(1, 1)
        ),
        "std values must be positive": lambda: DataPlan("arrays", (2,), None, mean=(0, 0), std=(1, 0)),
        f"mean must be a list of at most {MAX_STATISTICS} finite numbers": lambda: DataPlan(
            "arrays", (2,), None, mean=(0, math.nan), std=(1, 1)
        ),
    }
    for reason, build in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            build()
        assert str(info.value) == reason


def test_plan_limits_at_and_one_past() -> None:
    vocabulary = tuple(str(j) for j in range(MAX_CATEGORIES))
    columns = tuple(f"c{i}" for i in range(MAX_VOCABULARY // MAX_CATEGORIES))
    at = DataPlan("table", (MAX_VOCABULARY + len(columns),), None, columns, dict.fromkeys(columns, vocabulary))
    assert sum(map(len, at.categories.values())) == MAX_VOCABULARY
    with pytest.raises(LocalProtocolError) as info:
        DataPlan(
            "table",
            (MAX_VOCABULARY + len(columns) + 2,),
            None,
            (*columns, "more"),
            {**dict.fromkeys(columns, vocabulary), "more": ("x",)},
        )
    assert str(info.value) == f"the vocabularies exceed limit of {MAX_VOCABULARY} categories"
    ones = (1.0,) * MAX_STATISTICS
    assert len(DataPlan("arrays", (MAX_STATISTICS,), None, mean=ones, std=ones).mean) == MAX_STATISTICS
    with pytest.raises(LocalProtocolError) as info:
        DataPlan("arrays", (MAX_STATISTICS + 1,), None, mean=(*ones, 1.0), std=(*ones, 1.0))
    assert str(info.value) == f"mean must be a list of at most {MAX_STATISTICS} finite numbers"


def test_info_schema_must_agree_with_its_fields() -> None:
    schema = DataSchema("images", (1, 8, 8), ("a", "b"))
    with pytest.raises(LocalProtocolError) as info:
        Info("alice", "trainer", "images", (1, 8, 9), 2, (1, 1), (), schema=schema)
    assert str(info.value) == "input_shape (1, 8, 9) differs from the schema's (1, 8, 8)"
    with pytest.raises(LocalProtocolError) as info:
        Info("alice", "trainer", "images", (1, 8, 8), 3, (1, 1, 1), (), schema=schema)
    assert str(info.value) == "num_classes 3 differs from the schema's 2"
    continuous = DataSchema("arrays", (4,), None)
    assert Info("alice", "trainer", "arrays", (4,), 1, (7,), (), schema=continuous).schema == continuous


def test_eval_result_class_counts_rules() -> None:
    cases = {
        "class_counts and class_correct go together": lambda: EvalResult(0.1, 1, 2, (1, 1), (1, 1)),
        "class_counts and class_correct must have one entry per class of predictions": lambda: EvalResult(
            0.1, 1, 2, (1, 1), (2,), (1,)
        ),
        "class_counts must sum to num_examples": lambda: EvalResult(0.1, 1, 2, (1, 1), (1, 2), (1, 0)),
        "class_correct must sum to correct": lambda: EvalResult(0.1, 1, 2, (1, 1), (1, 1), (1, 1)),
        "class_correct must not exceed class_counts": lambda: EvalResult(0.1, 2, 2, (1, 1), (0, 2), (1, 1)),
        f"class_counts must be a list of at most {MAX_CLASSES} non-negative integers": lambda: EvalResult(
            0.1, 0, 2, (1, 1), (3, -1), (0, 0)
        ),
    }
    for reason, build in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            build()
        assert str(info.value) == reason
    at = (0,) * (MAX_CLASSES - 1) + (1,)
    assert EvalResult(0.1, 1, 1, at, at, at).class_counts == at
    past = (0,) * MAX_CLASSES + (1,)
    with pytest.raises(LocalProtocolError, match="^predictions must be a list of at most"):
        EvalResult(0.1, 1, 1, past, past, past)


# A peer's bodies: the same rules raise as the peer's mistake ------------------------------------


def test_a_peer_plan_that_breaks_a_rule_is_remote() -> None:
    body = {
        **Fit("m", {}, TRAINING).to_body(),
        "data": {
            "kind": "arrays",
            "input_shape": [2],
            "classes": None,
            "mean": encode_tensor(np.zeros(2)),
            "std": encode_tensor(np.array([1.0, 0.0])),
        },
    }
    body["plan"] = TRAINING.to_body()
    built_and_decoded(
        lambda: DataPlan("arrays", (2,), None, mean=(0, 0), std=(1, 0)), "fit", body, "std values must be positive"
    )


def test_a_peer_schema_that_breaks_a_rule_is_remote() -> None:
    schema = {"kind": "table", "input_shape": [1], "classes": b"a\x00b\x00a", "features": b"x"}
    body = {
        "worker_id": "bob",
        "role": "trainer",
        "dataset": "table",
        "input_shape": [1],
        "num_classes": 3,
        "histogram": [4, 1, 2],
        "models": [],
        "protocol_version": 1,
        "schema": schema,
    }
    built_and_decoded(
        lambda: DataSchema("table", (1,), ("a", "b", "a"), (Feature("x"),)), "info", body, "classes must be distinct"
    )


def test_peer_class_counts_that_do_not_add_up_are_remote() -> None:
    body = {
        "loss": 0.1,
        "correct": 1,
        "num_examples": 2,
        "predictions": [1, 1],
        "class_counts": [1, 2],
        "class_correct": [1, 0],
    }
    built_and_decoded(
        lambda: EvalResult(0.1, 1, 2, (1, 1), (1, 2), (1, 0)),
        "eval_result",
        body,
        "class_counts must sum to num_examples",
    )


def test_unknown_fields_of_a_plan_or_schema_are_refused() -> None:
    plan = {"kind": "arrays", "input_shape": [2], "classes": None, "scale": 2}
    with pytest.raises(RemoteProtocolError) as info:
        decode(envelope("describe", {"model": "m", "data": plan}))
    assert str(info.value) == (
        "data plan body has fields ['classes', 'input_shape', 'kind', 'scale'], expected ['classes', 'input_shape',"
        " 'kind'] and optionally ['categories', 'category_counts', 'features', 'label', 'mean', 'std', 'types']"
    )


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(plan=data_plans(), schema=schemas(), data=st.data())
def test_fuzzed_plans_and_schemas_raise_only_protocol_error(
    plan: DataPlan, schema: DataSchema, data: st.DataObject
) -> None:
    """A field changed to any value, or dropped: a protocol error with the request's id, never another exception."""
    bodies = {"plan": plan.to_body(), "schema": schema.to_body()}
    which = data.draw(st.sampled_from(sorted(bodies)))
    body: dict[str, object] = dict(bodies[which])
    field = data.draw(st.sampled_from(sorted(body)))
    if data.draw(st.booleans()):
        del body[field]
    else:
        body[field] = data.draw(msgpack_values)
    if which == "plan":
        frame = envelope("describe", {"model": "m", "data": body}, 11)
    else:
        info = {
            "worker_id": "a",
            "role": "trainer",
            "dataset": schema.kind,
            "input_shape": list(schema.input_shape),
            "num_classes": schema.num_classes,
            "histogram": [1] * schema.num_classes,
            "models": [],
            "protocol_version": 1,
            "schema": body,
        }
        frame = envelope("info", info, 11)
    try:
        decode(frame)
    except ProtocolError as exc:
        # mean and std are tensors: one that is not is a bad tensor
        assert exc.request_id == 11 and exc.code in ("malformed", "bad_tensor" if field in ("mean", "std") else "")


# Names on the wire: nul-separated UTF-8, types and counts that agree -----------------------------


def test_a_name_may_not_hold_the_separator() -> None:
    cases = {
        "each of classes must not contain a nul character, not 'a\\x00b'": lambda: DataSchema(
            "arrays", (1,), ("a\x00b",)
        ),
        "feature name must not contain a nul character, not 'a\\x00b'": lambda: Feature("a\x00b"),
        "each of categories of feature c must not contain a nul character, not '\\x00'": lambda: Feature(
            "c", "categorical", ("\x00",)
        ),
        "each of features must not contain a nul character, not 'x\\x00'": lambda: DataPlan(
            "arrays", (1,), None, ("x\x00",)
        ),
    }
    for reason, build in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            build()
        assert str(info.value) == reason


def test_columns_that_do_not_add_up_are_refused() -> None:
    table = {"kind": "table", "input_shape": [2], "classes": None, "features": b"a\x00b"}
    typed = {**table, "types": b"\x00\x01", "categories": b"x\x00y", "category_counts": b"\x02\x00\x00\x00"}
    assert DataSchema.from_body(typed).features == (Feature("a"), Feature("b", "categorical", ("x", "y")))
    cases: dict[str, dict[str, Any]] = {
        "types, categories and category_counts go together": {**table, "types": b"\x00\x01"},
        "types must be a bin of one byte (0 numeric, 1 categorical) for each of the 2 features": {
            **typed,
            "types": b"\x00\x02",
        },
        "category_counts must be a bin of one uint32 for each of the 1 categorical features": {
            **typed,
            "category_counts": b"\x02\x00\x00",
        },
        "category_counts add up to 3, but categories holds 2": {**typed, "category_counts": b"\x03\x00\x00\x00"},
        "categories must be utf-8 names separated by nul bytes": {**typed, "categories": b"\xff\x00y"},
        "each of categories of feature b must be a string of 1 to 256 characters, not ''": {
            **typed,
            "categories": b"x\x00",
            "category_counts": b"\x02\x00\x00\x00",
        },
    }
    for reason, body in cases.items():
        with pytest.raises(LocalProtocolError) as info:
            DataSchema.from_body(body)
        assert str(info.value) == reason


# A table plan standardises numeric columns only --------------------------------------------------


def test_a_plan_that_scales_a_one_hot_slot_is_refused() -> None:
    """A coordinator could weigh one slot to read a rare category's count out of pooled sums."""
    columns, categories = ("age", "city", "bmi"), {"city": ("Bern", "Oslo")}  # city's slots: 1, 2 and "other" 3
    cases = {
        "one-hot slot 1 of feature city has mean 0.5 and std 1.0": ((40, 0, 0.5, 0, 25), (9, 1, 1, 1, 4)),
        "one-hot slot 2 of feature city has mean 0.0 and std 3.0": ((40, 0, 0, 0, 25), (9, 1, 1, 3, 4)),
    }
    for slot, (mean, std) in cases.items():
        body = {
            **Fit("m", {}, TRAINING).to_body(),
            "data": {
                **TABLE.to_body(),
                "mean": encode_tensor(np.array(mean, "<f8")),
                "std": encode_tensor(np.array(std, "<f8")),
            },
        }
        built_and_decoded(
            lambda: DataPlan("table", (5,), None, columns, categories, mean, std),  # noqa: B023
            "fit",
            body,
            f"{slot}, not 0 and 1: a plan standardises numeric features only",
        )
    assert DataPlan("table", (5,), TABLE.classes, columns, categories, (40, 0, 0, 0, 25), (9, 1, 1, 1, 4)) == TABLE
