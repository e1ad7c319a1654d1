"""Own-data messages on the wire at each documented limit and one past it, and nothing quadratic in their sizes.

Names travel as one bin per list and statistics as float64 tensors, so a
message at the limits decodes within the decoder's budget (8 bytes per byte
plus 1 MiB); before, a hello of more than about 1,045 columns did not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from syncfed.exceptions import RemoteProtocolError
from syncfed.protocol import (
    MAX_CLASSES,
    DataPlan,
    DataSchema,
    Feature,
    Fit,
    Info,
    Message,
    Query,
    TrainingPlan,
    decode,
    encode,
    encode_fragments,
)
from syncfed.protocol.data_messages import (
    MAX_CATEGORIES,
    MAX_STATISTICS,
    MAX_TABLE_FEATURES,
    MAX_VOCABULARY,
    encoded_width,
)
from syncfed.protocol.streaming import MessageDecoder
from syncfed.protocol.unpacking import budget, decoded_cost
from syncfed.tensors import encode_tensor

WEIGHTS = {"w": np.arange(4, dtype=np.float32)}
TRAINING = TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.1, seed=3)


def envelope(kind: str, body: object) -> bytes:
    return msgpack.packb({"v": 1, "id": 9, "kind": kind, "body": body}, use_bin_type=True)  # type: ignore[no-any-return]


# On the wire at each documented limit, and one past it -------------------------------------------


def names_of(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(count))


def changed(message: Message, change: Callable[[dict[str, Any]], None]) -> bytes:
    """``message``'s frame (id 9) with its body changed first: what this side's constructor would refuse."""
    body = message.to_body()
    change(body)
    return envelope(message.kind, body)


def refused_on_the_wire(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    assert (str(info.value), info.value.request_id) == (reason, 9)


def one_more(body: dict[str, Any], field: str) -> None:
    body[field] += b"\x00one more"


def widest_table() -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """65,536 features, 20 of them categorical with 10,000 categories each: 200,000 in all."""
    features = names_of("feature_", MAX_TABLE_FEATURES)
    vocabulary = names_of("category_", MAX_CATEGORIES)
    return features, {name: vocabulary for name in features[: MAX_VOCABULARY // MAX_CATEGORIES]}


def test_a_hello_at_the_limits_of_features_vocabulary_and_classes_decodes() -> None:
    """Before names travelled as bins, a hello listing more than about 1,045 columns did not decode."""
    features, categories = widest_table()
    schema = DataSchema(
        "table",
        (MAX_TABLE_FEATURES,),
        names_of("class_", MAX_CLASSES),
        tuple(
            Feature(name, "categorical", categories[name]) if name in categories else Feature(name) for name in features
        ),
    )
    hello = Info("a", "trainer", "table", schema.input_shape, MAX_CLASSES, (1,) * MAX_CLASSES, ("mlp",), schema=schema)
    data = encode(9, hello)
    assert decoded_cost(data) <= budget(len(data))
    assert decode(data).message == hello
    limit = "must be a list of at most"
    refused_on_the_wire(
        changed(hello, lambda body: one_more(body["schema"], "features")),
        f"features {limit} {MAX_TABLE_FEATURES} names, not {MAX_TABLE_FEATURES + 1} names",
    )
    refused_on_the_wire(
        changed(hello, lambda body: one_more(body["schema"], "classes")),
        f"classes {limit} {MAX_CLASSES} names, not {MAX_CLASSES + 1} names",
    )
    refused_on_the_wire(
        changed(hello, lambda body: one_more(body["schema"], "categories")),
        f"categories {limit} {MAX_VOCABULARY} names, not {MAX_VOCABULARY + 1} names",
    )


def test_a_plan_at_its_limits_in_a_fit_decodes_streamed() -> None:
    """The worker's own decoder, fed fragments: classes, features, vocabularies and their statistics at the limits."""
    features, categories = widest_table()
    width = encoded_width(features, categories)
    plan = DataPlan(
        "table", (width,), names_of("class_", MAX_CLASSES), features, categories, np.zeros(width), np.ones(width)
    )
    fit = Fit("mlp", WEIGHTS, TRAINING, data=plan)
    decoder = MessageDecoder(max_size=2**30)
    for fragment in encode_fragments(9, fit, chunk_size=2**20).fragments():
        decoder.feed(fragment)
    assert decoder.finish().message == fit
    refused_on_the_wire(
        changed(fit, lambda body: one_more(body["data"], "features")),
        f"features must be a list of at most {MAX_TABLE_FEATURES} names, not {MAX_TABLE_FEATURES + 1} names",
    )


def test_a_plan_with_statistics_at_their_limit_decodes_in_a_query_without_weights() -> None:
    ones = np.ones(MAX_STATISTICS)
    query = Query("feature-stats", (), data=DataPlan("arrays", (MAX_STATISTICS,), None, mean=ones, std=ones))
    assert decode(encode(9, query)).message == query

    def past(body: dict[str, Any]) -> None:
        body["data"]["input_shape"] = [MAX_STATISTICS + 1]
        body["data"]["mean"] = body["data"]["std"] = encode_tensor(np.ones(MAX_STATISTICS + 1))

    refused_on_the_wire(changed(query, past), f"mean must be a list of at most {MAX_STATISTICS} finite numbers")


@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 224, 224)])
def test_statistics_queries_the_review_found_refused_now_decode(shape: tuple[int, ...]) -> None:
    """A secure pass-2 query over 96x96 arrays, and statistics for 3x224x224 arrays, in a message without weights."""
    count = math.prod(shape)
    plan = DataPlan("arrays", shape, ("a", "b"), mean=np.zeros(count), std=np.ones(count))
    query = Query("feature-stats", tuple(range(8192)), value_range=(-64.0, 64.0), data=plan)
    data = encode(9, query)
    assert decoded_cost(data) <= budget(len(data))
    assert decode(data).message == query


def test_a_category_past_its_feature_limit_is_refused_on_the_wire() -> None:
    schema = DataSchema("table", (1,), None, (Feature("c", "categorical", names_of("", MAX_CATEGORIES)),))
    hello = Info("a", "trainer", "table", (1,), 1, (3,), (), schema=schema)
    assert decode(encode(9, hello)).message == hello

    def past(body: dict[str, Any]) -> None:
        one_more(body["schema"], "categories")
        body["schema"]["category_counts"] = np.array([MAX_CATEGORIES + 1], "<u4").tobytes()

    with pytest.raises(
        RemoteProtocolError, match=f"^categories of feature c must be a list of at most {MAX_CATEGORIES}"
    ):
        decode(changed(hello, past))


# Nothing quadratic in peer-chosen sizes ------------------------------------------------------------


def test_a_plan_of_many_categorical_columns_is_checked_in_linear_time() -> None:
    """Each vocabulary's feature was looked up in the tuple of features: 32,768 x 65,536 comparisons."""
    features = names_of("feature_", MAX_TABLE_FEATURES)
    categories = dict.fromkeys(features[::2], ("x",))
    started = time.perf_counter()
    plan = DataPlan("table", (encoded_width(features, categories),), None, features, categories)
    assert len(plan.categories) == MAX_TABLE_FEATURES // 2
    assert time.perf_counter() - started < 5.0  # about 0.1 s
