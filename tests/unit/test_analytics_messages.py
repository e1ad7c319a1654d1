"""Federated analytics on the wire: the query and its result, their round trips, and the checks
that refuse an invalid one, limits at and one past their value."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from analytics_kit import dataset, pooled_data
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.analytics import answer
from syncfed.exceptions import ProtocolError
from syncfed.protocol import (
    ERROR_CODES,
    MAX_BINS,
    MAX_CELLS,
    PROTOCOL_VERSION,
    REQUESTS,
    Query,
    QueryResult,
    decode,
    encode,
)


def envelope(kind: str, body: object) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "id": 9, "kind": kind, "body": body}, use_bin_type=True)


def test_query_is_a_request_answered_by_query_result_and_refused_is_an_error_code() -> None:
    assert REQUESTS["query"] == "query_result"
    assert "refused" in ERROR_CODES


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["label-histogram", "feature-stats", "quantiles"]),
    features=st.lists(st.integers(0, 2**24 - 1), max_size=8, unique=True),
    bins=st.integers(1, MAX_BINS),
    low=st.floats(-1e6, 1e6),
    width=st.floats(1e-2, 1e6),
)
def test_query_round_trip(kind: str, features: list[int], bins: int, low: float, width: float) -> None:
    if kind == "quantiles":
        query = Query(kind, tuple(sorted(features)), bins, (low, low + width))
    else:
        query = Query(kind, () if kind == "label-histogram" else tuple(sorted(features)))
    data = encode(11, query)
    received = decode(data)
    assert received.id == 11 and received.message == query
    assert encode(11, received.message) == data


@settings(max_examples=30, deadline=None)
@given(pooled_data(), st.sampled_from(["label-histogram", "feature-stats", "quantiles"]))
def test_query_result_round_trip(case: tuple[np.ndarray, list[int]], kind: str) -> None:
    values, _ = case
    labels = np.arange(len(values)) % 3
    query = {
        "label-histogram": Query("label-histogram"),
        "feature-stats": Query("feature-stats", (0,)),
        "quantiles": Query("quantiles", (0,), 8, (-1.0, 1.0)),
    }[kind]
    result = answer(query, dataset(values, labels, num_classes=3), 1)
    assert isinstance(result, QueryResult)
    received = decode(encode(4, result)).message
    assert received == result and received is not result


VALID_QUERY = {"query": "quantiles", "features": [0, 3], "bins": 4, "range": [0.0, 1.0]}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"query": "median"},
            "query must be one of label-histogram, feature-stats, quantiles, label-stats, not 'median'",
        ),
        ({"features": [3, 0]}, "features must be sorted and distinct"),
        ({"features": [3, 3]}, "features must be sorted and distinct"),
        ({"features": [-1]}, "features must be a list of at most 16777216 indices in 0..16777215"),
        ({"features": [True]}, "features must be a list of at most 16777216 indices in 0..16777215"),
        ({"bins": 0}, "bins must be an integer from 1 to 4096, not 0"),
        ({"bins": MAX_BINS + 1}, "bins must be an integer from 1 to 4096, not 4097"),
        ({"bins": None}, "bins must be an integer from 1 to 4096, not None"),
        ({"range": [1.0, 0.0]}, "range must be two finite numbers low < high, not [1.0, 0.0]"),
        ({"range": [0.0, math.inf]}, "range must be two finite numbers low < high, not [0.0, inf]"),
        ({"range": [-1e308, 1e308]}, "range must be two finite numbers low < high, not [-1e+308, 1e+308]"),
        ({"range": [1e16, 1e16 + 2]}, "range [1e+16, 1.0000000000000002e+16] is too narrow for 4 distinct bins"),
        ({"range": None}, "range must be two finite numbers low < high, not None"),
        ({"query": "feature-stats"}, "feature-stats takes no bins"),
        (
            {"query": "feature-stats", "bins": None, "range": [1.0, 0.0]},
            "clipping range must be two finite numbers low < high, not [1.0, 0.0]",
        ),
        ({"query": "label-histogram", "features": []}, "label-histogram takes no bins or range"),
        ({"query": "label-histogram", "bins": None, "range": None}, "label-histogram takes no features"),
        (
            {"features": list(range(1025)), "bins": MAX_BINS},
            "1025 features of 4096 bins exceed limit of 4194304 histogram cells",
        ),
        (
            {"extra": 1},
            "query body has fields ['bins', 'extra', 'features', 'query', 'range'],"
            " expected ['bins', 'features', 'query', 'range'] and optionally ['data', 'terms']",
        ),
    ],
)
def test_invalid_queries_cannot_be_decoded(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(envelope("query", {**VALID_QUERY, **changes}))
    assert str(raised.value) == reason
    assert raised.value.code == "malformed" and raised.value.request_id == 9


def test_cells_limit_at_and_one_past() -> None:
    bins = MAX_CELLS // 1024 - 2  # 1024 features of 4094 bins: exactly the limit
    assert len(Query("quantiles", tuple(range(1024)), bins, (0.0, 1.0)).features) == 1024
    with pytest.raises(ProtocolError, match="exceed limit of 4194304 histogram cells"):
        Query("quantiles", tuple(range(1024)), bins + 1, (0.0, 1.0))


def tensor(array: np.ndarray) -> dict[str, object]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


def result_body(
    kind: str, tensors: dict[str, np.ndarray], num_examples: int = 6, num_features: int = 2
) -> dict[str, object]:
    return {
        "query": kind,
        "num_examples": num_examples,
        "num_features": num_features,
        "tensors": {name: tensor(array) for name, array in tensors.items()},
    }


I64, F64 = np.int64, np.float64


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (result_body("label-histogram", {"labels": np.array([2, 4], I64)}), None),
        (result_body("label-histogram", {"labels": np.array([2, 3], I64)}), "labels counts must sum to 6"),
        (result_body("label-histogram", {"labels": np.array([8, -2], I64)}), "labels counts must be from 0 to 6"),
        (result_body("label-histogram", {"labels": np.array([2, 4], np.int32)}), "tensor labels must be int64"),
        (
            result_body("label-histogram", {"counts": np.array([6], I64)}),
            "label-histogram answer has tensors ['counts'], expected ['labels']",
        ),
        (
            result_body("label-histogram", {"labels": np.array([6], I64)}, num_examples=0),
            "num_examples must be an integer from 1 to 4294967296, not 0",
        ),
        (result_body("feature-stats", {"mean": np.zeros(2), "m2": np.ones(2), "pooled": np.ones(2)}), None),
        (
            result_body("feature-stats", {"mean": np.zeros(3), "m2": np.ones(3), "pooled": np.ones(2)}),
            "mean and m2 must have one entry per selected feature, and pooled two",
        ),
        (
            result_body("feature-stats", {"mean": np.zeros(2), "m2": -np.ones(2), "pooled": np.ones(2)}),
            "m2 must not be negative",
        ),
        (
            result_body("feature-stats", {"mean": np.array([0, np.nan]), "m2": np.ones(2), "pooled": np.ones(2)}),
            "feature statistics must be finite",
        ),
        (
            result_body("feature-stats", {"mean": np.zeros(2, np.float32), "m2": np.ones(2), "pooled": np.ones(2)}),
            "tensor mean must be float64",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5, 0]], I64), "pooled": np.array([2, 10, 0], I64)}),
            None,
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5]], I64), "pooled": np.array([2, 10], I64)}),
            "histogram must be [features, bins + 2] with 1 to 4096 bins, and pooled [bins + 2]",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 4, 0]], I64), "pooled": np.array([2, 10, 0], I64)}),
            "histogram counts must sum to 6",
        ),
        (
            result_body("quantiles", {"histogram": np.array([[1, 5, 0]], I64), "pooled": np.array([2, 9, 0], I64)}),
            "pooled counts must sum to 12",
        ),
    ],
)
def test_query_results_are_validated(body: dict[str, object], reason: str | None) -> None:
    if reason is None:
        assert decode(envelope("query_result", body)).message.kind == "query_result"
        return
    with pytest.raises(ProtocolError) as raised:
        decode(envelope("query_result", body))
    assert str(raised.value) == reason


def test_counts_that_would_wrap_around_int64_are_rejected() -> None:
    total = 2**56  # the most values one answer may hold: 2**32 examples of 2**24 features
    pooled = np.zeros(MAX_BINS + 2, I64)
    pooled[:257] = total  # each entry within bounds; the true sum 257 * 2**56 wraps around to 2**56 in int64
    assert pooled.sum() == total
    body = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    with pytest.raises(ProtocolError, match=f"^pooled counts must sum to {total}$"):
        decode(envelope("query_result", body))
    pooled[1:257] = 0
    valid = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    assert decode(envelope("query_result", valid)).message.kind == "query_result"
    pooled[0] = total + 1
    over = result_body("quantiles", {"histogram": np.zeros((0, MAX_BINS + 2), I64), "pooled": pooled}, 2**32, 2**24)
    with pytest.raises(ProtocolError, match=f"^pooled counts must be from 0 to {total}$"):
        decode(envelope("query_result", over))
