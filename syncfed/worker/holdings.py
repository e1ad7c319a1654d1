"""What a worker serves: its data sets, each with its held-out validation split, and the models it can build.

Pure data loading, no I/O beyond reading the data files: the server and the
compute take what is loaded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import WorkerConfig
from ..datasets import Dataset, DatasetSpec, load_dataset
from ..evaluation import holdout, validation_seed
from ..models import BENCH_MODELS, DEMO_MODELS, ModelFactory, resolve_model
from ..partition import class_indices, default_classes, iid_shard
from ..protocol import DatasetInfo

__all__ = ["Holding", "advertised_holdings", "load_holdings", "load_shard", "model_factories"]


@dataclass(frozen=True)
class Holding:
    """A data set a worker serves: what it trains on (the evaluator: scores on) and its held-out validation split.

    ``spec`` names it in the worker's data-set registry (``--dataset-spec``);
    a worker started without one holds a single data set with no name.
    ``version`` is the digest of its examples that the registry advertises.
    """

    data: Dataset
    validation: Dataset | None = None
    spec: DatasetSpec | None = None
    version: str = ""

    @property
    def validation_size(self) -> int:
        return 0 if self.validation is None else len(self.validation)

    def describe(self, withhold: bool = False) -> DatasetInfo:
        """The registry entry :class:`Info` advertises for a named data set (see :func:`advertised_holdings`)."""
        assert self.spec is not None, "only a named data set is advertised"
        return DatasetInfo(
            key=self.spec.key,
            dataset=self.data.name,
            split=self.spec.split,
            version=self.version,
            input_shape=self.data.input_shape,
            dtype=self.data.images.dtype.name,
            num_classes=self.data.num_classes,
            **advertised_holdings(self.data.histogram(), self.validation_size, withhold),
        )


def advertised_holdings(histogram: Sequence[int], validation_size: int, withhold: bool) -> dict[str, Any]:
    """What hello says about a worker's examples: the class histogram, or with ``withhold`` only
    a power of two at least their number, and whether it holds a validation split (docs/privacy.md)."""
    if not withhold:
        return {"histogram": tuple(histogram), "validation_size": validation_size}
    return {
        "histogram": None,
        "max_examples": 1 << max(sum(histogram) - 1, 0).bit_length(),
        "validation_size": min(validation_size, 1),
    }


def load_shard(config: WorkerConfig, spec: DatasetSpec | None = None) -> Holding:
    """Load one data set this worker serves: ``spec``'s, or the split of ``config.dataset`` its role holds.

    The evaluator holds the whole split (the test set by default); a trainer
    its classes or IID shard of it, of which it then holds out
    ``config.val_fraction`` for validation, seeded by ``config.val_seed`` or
    its id, and never trains on those.
    """
    name = config.dataset if spec is None else spec.dataset
    split = spec.split if spec is not None else "test" if config.testing else "train"
    data = load_dataset(name, split, config.data_dir, download=config.download)
    if config.shard is not None:
        shard, count = config.shard
        data = data.subset(iid_shard(len(data), shard, count, np.random.default_rng(config.shard_seed)))
    else:
        classes = config.digits
        if classes is None and not config.testing:
            classes = default_classes(config.worker_id)
        data = data if classes is None else data.subset(class_indices(data.labels, classes))
    version = data.fingerprint() if spec is not None else ""
    if config.testing or config.val_fraction == 0:
        return Holding(data, None, spec, version)
    seed = validation_seed(config.worker_id) if config.val_seed is None else config.val_seed
    train, held = holdout(len(data), config.val_fraction, np.random.default_rng(seed))
    return Holding(data.subset(train), data.subset(held) if len(held) else None, spec, version)


def load_holdings(config: WorkerConfig) -> list[Holding]:
    """Every data set this worker serves: one per ``--dataset-spec``, in order, else the one of ``--dataset``."""
    return [load_shard(config, spec) for spec in config.datasets] or [load_shard(config)]


def model_factories(import_paths: tuple[str, ...], *, bench: bool = False) -> dict[str, ModelFactory]:
    """The demo models, the benchmark models with ``bench``, and the models this worker was started with."""
    factories = {**DEMO_MODELS, **(BENCH_MODELS if bench else {})}
    for path in import_paths:
        factories[path] = resolve_model(path)
    return factories
