"""What the analytics tests share: data sets built from arrays, answers sent through the codec,
the pooled data cut into shards, and the query that asks workers to clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

from syncfed.analytics import answer
from syncfed.datasets import Dataset
from syncfed.protocol import Query, QueryResult, decode, encode

__all__ = ["answered", "clipping_query", "dataset", "pooled_data", "split"]


def dataset(values: np.ndarray, labels: np.ndarray | None = None, num_classes: int = 10) -> Dataset:
    """A data set whose flattened features are the columns of ``values`` ([examples, features])."""
    images = np.asarray(values, dtype=np.float32).reshape(len(values), 1, 1, -1)
    if labels is None:
        labels = np.zeros(len(values), dtype=np.int64)
    return Dataset("test", images, np.asarray(labels, dtype=np.int64), num_classes)


def answered(query: Query, shards: Sequence[Dataset], min_group_size: int = 1) -> dict[str, QueryResult]:
    """Each shard's answer, sent through the codec as a worker's reply would be."""
    results = {}
    for index, shard in enumerate(shards):
        reply = answer(query, shard, min_group_size)
        assert isinstance(reply, QueryResult), reply
        results[f"w{index}"] = decode(encode(index + 1, reply)).message  # type: ignore[assignment]
    return results  # type: ignore[return-value]


def split(pooled: np.ndarray, cuts: Sequence[int]) -> list[np.ndarray]:
    """``pooled`` cut into consecutive non-empty parts at the given row positions."""
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(pooled)}), len(pooled)]
    return [pooled[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def pooled_data(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    """Examples x features in float32, hard for naive sums of squares, and where to cut them."""
    rows = draw(st.integers(1, 60))
    features = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 1.0, -300.0, 1e4]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    values = offset + scale * rng.standard_normal((rows, features))
    if draw(st.booleans()):  # few distinct values: ties, constant columns
        values = np.round(values / scale) * scale
    cuts = draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=5))
    return values.astype(np.float32), cuts


def clipping_query(features: tuple[int, ...], clip: tuple[float, float]) -> Query:
    """A feature-stats query that asks workers to clip to ``clip``, as ``--dp-epsilon`` sends it."""
    return Query("feature-stats", features, None, clip)
