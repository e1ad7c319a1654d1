"""Training, evaluation and analytics over inputs read a batch at a time (an image folder): never whole, and the
same figures as over the same inputs in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from syncfed import analytics
from syncfed.datasets import Dataset, LazyInputs
from syncfed.protocol import Query, TrainingPlan
from syncfed.shaped_models import TabularMLP
from syncfed.training import evaluate, train

COUNT, SHAPE, CLASSES = 90, (2, 3, 3), 3


class Reader:
    """Inputs of an array, read only through ``take``, which notes how many examples each read asked for."""

    def __init__(self, array: np.ndarray, reads: list[int]) -> None:
        self.array = array
        self.reads = reads

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def take(self, indices: np.ndarray) -> np.ndarray:
        self.reads.append(len(indices))
        return self.array[indices]

    def subset(self, indices: np.ndarray) -> LazyInputs:
        return Reader(self.array[indices], self.reads)

    def fingerprint(self) -> str:
        return "reader"


def datasets() -> tuple[Dataset, Dataset, list[int]]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(COUNT, *SHAPE)).astype(np.float32)
    labels = (np.arange(COUNT) % CLASSES).astype(np.int64)
    reads: list[int] = []
    return (
        Dataset("arrays", images, labels, CLASSES),
        Dataset("images", Reader(images, reads), labels, CLASSES),
        reads,
    )


def test_training_and_evaluation_read_one_batch_at_a_time_with_the_same_results() -> None:
    memory, lazy, reads = datasets()
    plan = TrainingPlan(round=1, batch_size=8, num_batches=5, lr=0.1, seed=1)
    models = []
    for data in (memory, lazy):
        torch.manual_seed(0)
        model = TabularMLP(SHAPE, CLASSES)
        loss = train(model, data, plan, torch.device("cpu")).loss
        models.append((model, loss))
    assert reads == [8] * 5
    assert models[0][1] == models[1][1]
    for (name, a), b in zip(models[0][0].state_dict().items(), models[1][0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    reads.clear()
    scored = [evaluate(models[0][0], data, 32, torch.device("cpu")) for data in (memory, lazy)]
    assert scored[0] == scored[1] and reads == [32, 32, 26]
    with torch.no_grad():
        predicted = models[0][0](torch.from_numpy(memory.images)).argmax(dim=1).numpy()
    outcome = scored[0]
    assert outcome.class_counts == [30, 30, 30] and sum(outcome.class_correct) == outcome.correct
    assert outcome.class_correct == [int(np.sum((predicted == k) & (memory.labels == k))) for k in range(CLASSES)]


def test_analytics_read_chunks_and_answer_as_over_the_whole_array(monkeypatch: pytest.MonkeyPatch) -> None:
    memory, lazy, reads = datasets()
    monkeypatch.setattr(analytics, "CHUNK", 18 * 10)  # ten examples of 18 values a chunk
    queries = [
        Query("label-histogram"),
        Query("feature-stats", (0, 5, 17)),
        Query("quantiles", (1, 4), bins=4, value_range=(-3.0, 3.0)),
    ]
    for query in queries:
        reads.clear()
        whole, chunked = analytics.answer(query, memory, 1), analytics.answer(query, lazy, 1)
        assert not isinstance(whole, Exception) and not isinstance(chunked, Exception)
        assert whole.kind == chunked.kind == "query_result", (whole, chunked)
        assert whole.tensors.keys() == chunked.tensors.keys()
        for name, array in whole.tensors.items():
            np.testing.assert_allclose(chunked.tensors[name], array, rtol=1e-12, err_msg=name)
        assert all(read <= 10 for read in reads) and sum(reads) == (0 if query.query == "label-histogram" else COUNT)
    flat = memory.images.reshape(COUNT, -1).astype(np.float64)
    stats = analytics.answer(queries[1], lazy, 1)
    assert not isinstance(stats, Exception)
    np.testing.assert_allclose(stats.tensors["mean"], flat[:, [0, 5, 17]].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.tensors["m2"], flat[:, [0, 5, 17]].var(axis=0) * COUNT, rtol=1e-12)
    np.testing.assert_allclose(stats.tensors["pooled"], [flat.mean(), flat.var() * flat.size], rtol=1e-12)


def test_a_continuous_label_has_no_label_histogram() -> None:
    data = Dataset("arrays", np.zeros((20, 2), np.float32), np.linspace(0, 1, 20, dtype=np.float32), 1)
    reply = analytics.answer(Query("label-histogram"), data, 1)
    assert (reply.kind, getattr(reply, "code", ""), getattr(reply, "reason", "")) == (
        "error",
        "incompatible",
        "this worker's label is continuous: it has no classes to count",
    )
