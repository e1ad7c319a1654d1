"""Federated analytics on the wire: a query over a worker's data and its local statistics.

A worker answers with sums a coordinator can combine (counts, means with
sums of squared deviations, histograms), never rows; see
:mod:`syncfed.analytics` for how they are computed and combined.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np

from ..exceptions import describe
from ..tensors import Weights, decode_weights, encode_weights
from .base import (
    MAX_CLASSES,
    MAX_SHARD,
    Message,
    _check,
    _check_weights,
    _fields,
    _is_int,
    _is_number,
    _weights_equal,
)
from .data_messages import DataPlan, plan_field, plan_from
from .terms import Terms, terms_field, terms_from

__all__ = ["QUERIES", "MAX_FEATURES", "MAX_BINS", "MAX_CELLS", "Query", "QueryResult"]


#: Federated analytics queries a worker answers over the data it holds (see ``syncfed.analytics``).
QUERIES: Final = ("label-histogram", "feature-stats", "quantiles", "label-stats")
#: Bounds of a query: feature indices (into the flattened input), histogram
#: bins, and histogram cells (selected features times bins plus two).
MAX_FEATURES: Final = 2**24
MAX_BINS: Final = 4096
MAX_CELLS: Final = 2**22


@dataclass(frozen=True)
class Query(Message):
    """Ask for statistics over the worker's data, never its rows.

    ``features`` are indices into the flattened input, sorted and distinct.
    A ``quantiles`` query fixes the histogram every worker fills: ``bins``
    equal bins over ``value_range``, plus a cell below it and one above; the
    other queries leave both ``None``, but ``feature-stats`` and
    ``label-stats`` (the moments of a continuous label) may carry a range
    that every value is clipped to first.
    """

    kind: ClassVar[str] = "query"
    query: str
    features: tuple[int, ...] = ()
    bins: int | None = None
    value_range: tuple[float, float] | None = None
    data: DataPlan | None = None  # over a user's own data: the plan to prepare it with (syncfed.data.normalization)
    terms: Terms | None = None  # the job this query belongs to, for a site's policy (syncfed.policy)

    def __post_init__(self) -> None:
        _check(self.data is None or isinstance(self.data, DataPlan), "data must be a DataPlan")
        _check(self.terms is None or isinstance(self.terms, Terms), "terms must be Terms")
        _check(self.query in QUERIES, f"query must be one of {', '.join(QUERIES)}, not {describe(self.query)}")
        _check(
            isinstance(self.features, (list, tuple))
            and len(self.features) <= MAX_FEATURES
            and all(_is_int(index) and 0 <= index < MAX_FEATURES for index in self.features),
            f"features must be a list of at most {MAX_FEATURES} indices in 0..{MAX_FEATURES - 1}",
        )
        features = tuple(self.features)
        # Linear and without copies: a peer picks the list's length.
        _check(all(a < b for a, b in itertools.pairwise(features)), "features must be sorted and distinct")
        _check(self.query not in ("label-histogram", "label-stats") or not features, f"{self.query} takes no features")
        if self.query == "quantiles":
            bins, value_range = self.bins, self.value_range
            _check(
                type(bins) is int and 1 <= bins <= MAX_BINS,
                f"bins must be an integer from 1 to {MAX_BINS}, not {describe(bins)}",
            )
            _check(
                isinstance(value_range, (list, tuple))
                and len(value_range) == 2
                and all(_is_number(bound) for bound in value_range)
                and math.isfinite(float(value_range[1]) - float(value_range[0]))
                and value_range[0] < value_range[1],
                f"range must be two finite numbers low < high, not {describe(value_range)}",
            )
            assert bins is not None and value_range is not None
            _check(
                len(features) * (bins + 2) <= MAX_CELLS,
                f"{len(features)} features of {bins} bins exceed limit of {MAX_CELLS} histogram cells",
            )
            object.__setattr__(self, "value_range", (float(value_range[0]), float(value_range[1])))
            _check(
                bool((np.diff(self.edges) > 0).all()),
                f"range {describe(value_range)} is too narrow for {bins} distinct bins",
            )
        elif self.query in ("feature-stats", "label-stats") and self.value_range is not None:
            # A clipping range: workers clip every value to it (a bound for secure sums and --dp-epsilon).
            value_range = self.value_range
            _check(self.bins is None, f"{self.query} takes no bins")
            _check(
                isinstance(value_range, (list, tuple))
                and len(value_range) == 2
                and all(_is_number(bound) for bound in value_range)
                and math.isfinite(float(value_range[1]) - float(value_range[0]))
                and value_range[0] < value_range[1],
                f"clipping range must be two finite numbers low < high, not {describe(value_range)}",
            )
            object.__setattr__(self, "value_range", (float(value_range[0]), float(value_range[1])))
        else:
            _check(self.bins is None and self.value_range is None, f"{self.query} takes no bins or range")
        object.__setattr__(self, "features", features)

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` edges of a quantiles query's bins; the last bin includes its right edge."""
        assert self.bins is not None and self.value_range is not None, f"{self.query} has no bins"
        return np.linspace(*self.value_range, self.bins + 1)

    def to_body(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "features": list(self.features),
            "bins": self.bins,
            "range": None if self.value_range is None else list(self.value_range),
            **plan_field(self.data),
            **terms_field(self.terms),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Query:
        _fields(body, cls.kind, {"query", "features", "bins", "range"}, frozenset({"data", "terms"}))
        return cls(body["query"], body["features"], body["bins"], body["range"], plan_from(body), terms_from(body))


#: The tensors of each query's answer and their dtypes.
_QUERY_TENSORS: Final[dict[str, dict[str, str]]] = {
    "label-histogram": {"labels": "int64"},
    "feature-stats": {"mean": "float64", "m2": "float64", "pooled": "float64"},
    "quantiles": {"histogram": "int64", "pooled": "int64"},
    "label-stats": {"mean": "float64", "m2": "float64"},
}


@dataclass(frozen=True, eq=False)
class QueryResult(Message):
    """A worker's local statistics for a :class:`Query`, which the coordinator combines.

    ``num_examples`` is the number of examples the answer covers (the
    worker's data), ``num_features`` the size of one flattened example.
    ``tensors`` by query:

    - ``label-histogram``: ``labels`` int64 [classes], examples per class;
    - ``feature-stats``: ``mean`` and ``m2`` float64 [features], each selected
      feature's mean and sum of squared deviations from it; ``pooled``
      float64 [2], the same over every value of every feature;
    - ``quantiles``: ``histogram`` int64 [features, bins + 2], each selected
      feature's cells (below the range, the bins, above it); ``pooled``
      int64 [bins + 2], the cells of every value of every feature;
    - ``label-stats``: ``mean`` and ``m2`` float64 [1], the continuous label's
      mean and sum of squared deviations from it.
    """

    kind: ClassVar[str] = "query_result"
    query: str
    num_examples: int
    num_features: int
    tensors: Weights

    def __post_init__(self) -> None:
        _check(self.query in QUERIES, f"query must be one of {', '.join(QUERIES)}, not {describe(self.query)}")
        _check(
            _is_int(self.num_examples) and 0 < self.num_examples <= MAX_SHARD,
            f"num_examples must be an integer from 1 to {MAX_SHARD}, not {describe(self.num_examples)}",
        )
        _check(
            _is_int(self.num_features) and 0 < self.num_features <= MAX_FEATURES,
            f"num_features must be an integer from 1 to {MAX_FEATURES}, not {describe(self.num_features)}",
        )
        _check_weights(self.tensors)
        expected = _QUERY_TENSORS[self.query]
        _check(
            list(self.tensors) == list(expected),
            f"{self.query} answer has tensors {describe(list(self.tensors))}, expected {list(expected)}",
        )
        for name, dtype in expected.items():
            _check(self.tensors[name].dtype == np.dtype(dtype), f"tensor {name} must be {dtype}")
        if self.query == "label-histogram":
            labels = self.tensors["labels"]
            _check(labels.ndim == 1 and 0 < len(labels) <= MAX_CLASSES, f"labels must hold 1 to {MAX_CLASSES} counts")
            _check_histogram(labels, self.num_examples, "labels")
        elif self.query == "label-stats":
            mean, m2 = self.tensors["mean"], self.tensors["m2"]
            _check(mean.shape == m2.shape == (1,), "label-stats mean and m2 must hold one number each")
            _check(bool(np.isfinite(mean).all() and np.isfinite(m2).all()), "label statistics must be finite")
            _check(bool(m2[0] >= 0), "m2 must not be negative")
        elif self.query == "feature-stats":
            mean, m2, pooled = self.tensors["mean"], self.tensors["m2"], self.tensors["pooled"]
            _check(
                mean.ndim == 1 and mean.shape == m2.shape and len(mean) <= self.num_features and pooled.shape == (2,),
                "mean and m2 must have one entry per selected feature, and pooled two",
            )
            _check(all(np.isfinite(array).all() for array in (mean, m2, pooled)), "feature statistics must be finite")
            _check(bool((m2 >= 0).all()) and pooled[1] >= 0, "m2 must not be negative")
        else:
            histogram, pooled = self.tensors["histogram"], self.tensors["pooled"]
            _check(
                histogram.ndim == 2
                and histogram.shape[0] <= self.num_features
                and 3 <= histogram.shape[1] <= MAX_BINS + 2
                and pooled.shape == histogram.shape[1:],
                f"histogram must be [features, bins + 2] with 1 to {MAX_BINS} bins, and pooled [bins + 2]",
            )
            _check_histogram(histogram, self.num_examples, "histogram")
            _check_histogram(pooled, self.num_examples * self.num_features, "pooled")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueryResult):
            return NotImplemented
        return (self.query, self.num_examples, self.num_features) == (
            other.query,
            other.num_examples,
            other.num_features,
        ) and _weights_equal(self.tensors, other.tensors)

    def to_body(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "num_examples": self.num_examples,
            "num_features": self.num_features,
            "tensors": encode_weights(self.tensors),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> QueryResult:
        _fields(body, cls.kind, {"query", "num_examples", "num_features", "tensors"})
        return cls(body["query"], body["num_examples"], body["num_features"], decode_weights(body["tensors"]))


def _check_histogram(counts: np.ndarray, total: int, what: str) -> None:
    """Every row of ``counts`` is non-negative and sums to ``total``.

    Entries are bounded before they are summed, and a sum that could pass
    int64 is taken in Python integers, so a peer cannot make it wrap around.
    """
    _check(bool(((counts >= 0) & (counts <= total)).all()), f"{what} counts must be from 0 to {total}")
    if total * counts.shape[-1] < 2**63:
        exact = bool((counts.sum(axis=-1) == total).all())
    else:
        exact = all(sum(row) == total for row in counts.reshape(-1, counts.shape[-1]).tolist())
    _check(exact, f"{what} counts must sum to {total}")
