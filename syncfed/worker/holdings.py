"""What a worker serves: its data sets, each with its held-out validation split, and the models it can build.

Pure data loading, no I/O beyond reading the data files: the server and the
compute take what is loaded here. A bundled data set (digits, MNIST) is a
:class:`Holding`; a user's own data (``--data``, ``syncfed.data``) is a
:class:`SourceHolding`, which prepares its examples anew for each data plan
a federation agrees on.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import numpy as np

from ..config import DEFAULT_MAX_PREPARED_BYTES, WorkerConfig
from ..data.base import Source
from ..data.sources import open_source
from ..datasets import Dataset, DatasetSpec, Rows, load_dataset
from ..evaluation import holdout, validation_seed
from ..exceptions import ConfigError, DatasetError
from ..partition import class_indices, default_classes, iid_shard
from ..protocol import DataPlan, DatasetInfo

__all__ = [
    "Holding",
    "SourceHolding",
    "Served",
    "advertised_holdings",
    "hold_source",
    "load_holdings",
    "load_shard",
]


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

    def summary(self, withhold: bool = False) -> dict[str, Any]:
        """What hello says about this data set (see :func:`advertised_holdings` for ``withhold``)."""
        return {
            "dataset": self.data.name,
            "input_shape": self.data.input_shape,
            "num_classes": self.data.num_classes,
            **advertised_holdings(self.data.histogram(), self.validation_size, withhold),
        }

    def describe(self, withhold: bool = False) -> DatasetInfo:
        """The registry entry :class:`Info` advertises for a named data set (see :func:`advertised_holdings`)."""
        assert self.spec is not None, "only a named data set is advertised"
        return DatasetInfo(
            key=self.spec.key,
            split=self.spec.split,
            version=self.version,
            dtype=self.data.images.dtype.name,
            **self.summary(withhold),
        )


class SourceHolding:
    """A user's own data a worker serves: the source, which of its examples it trains on (the evaluator:
    scores on) and which it holds out, and those examples prepared per data plan.

    Preparing follows the plan (class order, feature encoding, statistics),
    so it happens per request, in the compute's thread; the last
    ``cache_size`` plans' examples are kept (a lazy image folder costs
    nothing to keep, a table its encoded copy). A table's encoding is sized
    by the plan's vocabularies, so it is refused before it is made when it
    would pass ``max_prepared_bytes``, and the tables kept stay within it
    too: the least recently used make room. The training and validation
    splits are views of the one prepared array.
    """

    def __init__(
        self,
        source: Source,
        train: np.ndarray,
        held: np.ndarray,
        *,
        spec: DatasetSpec | None = None,
        testing: bool = False,
        # Limits
        cache_size: int = 2,
        max_prepared_bytes: int = DEFAULT_MAX_PREPARED_BYTES,
    ) -> None:
        """``train`` and ``held``: indices of the source's examples, disjoint."""
        if cache_size < 1:
            raise ConfigError(f"cache size {cache_size} must be at least 1")
        if max_prepared_bytes < 1:
            raise ConfigError(f"max prepared bytes {max_prepared_bytes} is below the minimum of 1 byte")
        self.source = source
        self.train = train
        self.held = held
        self.spec = spec
        self.split = "test" if testing else "train"
        self.schema = source.schema()
        self.version = source.fingerprint()
        self.cache_size = cache_size
        self.max_prepared_bytes = max_prepared_bytes
        # Per plan digest: the prepared splits, and the bytes of the table encoding they view (0 for others).
        self._prepared: OrderedDict[str, tuple[tuple[Dataset, Dataset | None], int]] = OrderedDict()
        self._lock = threading.Lock()  # a query's thread may prepare beside a fit's

    @property
    def name(self) -> str:
        """The kind of data, as hello names the data set: images, table or arrays."""
        return self.source.name

    @property
    def validation_size(self) -> int:
        return len(self.held)

    def histogram(self) -> list[int]:
        """Examples trained on (the evaluator: scored on) per class of the schema; all in one for a continuous label."""
        if self.schema.classes is None:
            return [len(self.train)]
        labels = self.source.labels[self.train]
        return [int(n) for n in np.bincount(labels, minlength=len(self.schema.classes))]

    def summary(self, withhold: bool = False) -> dict[str, Any]:
        """What hello says about this data: its kind, its schema and how many examples of each class it holds."""
        return {
            "dataset": self.name,
            "input_shape": self.schema.input_shape,
            "num_classes": self.schema.num_classes,
            "schema": self.schema,
            **advertised_holdings(self.histogram(), self.validation_size, withhold),
        }

    def describe(self, withhold: bool = False) -> DatasetInfo:
        """The registry entry :class:`Info` advertises for named own data."""
        assert self.spec is not None, "only a named data set is advertised"
        return DatasetInfo(
            key=self.spec.key, split=self.split, version=self.version, dtype="float32", **self.summary(withhold)
        )

    def prepared(self, plan: DataPlan) -> tuple[Dataset, Dataset | None]:
        """The examples trained on (the evaluator: scored on) and the validation split, as ``plan`` says.

        Raises:
            DatasetError: if the plan does not fit this data, or its table encoding would pass
                ``max_prepared_bytes``.
        """
        key = plan.digest()
        with self._lock:
            cached = self._prepared.get(key)
            if cached is not None:
                self._prepared.move_to_end(key)
                return cached[0]
            size = self._encoded_size(plan)
            while self._prepared and sum(kept for _, kept in self._prepared.values()) + size > self.max_prepared_bytes:
                self._prepared.popitem(last=False)
            data = self.source.prepare(plan)
            if isinstance(data.images, np.ndarray):
                data = replace(data, images=Rows(data.images, np.arange(len(data))))
            train = data if len(self.train) == len(data) else data.subset(self.train)
            prepared = train, data.subset(self.held) if len(self.held) else None
            self._prepared[key] = prepared, size
            while len(self._prepared) > self.cache_size:
                self._prepared.popitem(last=False)
            return prepared

    def _encoded_size(self, plan: DataPlan) -> int:
        """The bytes of the table ``plan`` encodes this data into, checked against the limit; 0 for other kinds,
        whose size the data held decides (an image folder is read per batch, arrays keep their shape).

        Raises:
            DatasetError: if the table would pass ``max_prepared_bytes``.
        """
        if plan.kind != "table":
            return 0
        size = len(self.source) * math.prod(plan.input_shape) * np.dtype(np.float32).itemsize
        if size > self.max_prepared_bytes:
            raise DatasetError(
                f"table of {len(self.source)} rows encoded in {math.prod(plan.input_shape)} values each takes"
                f" {size} bytes, exceeds limit of {self.max_prepared_bytes} bytes (the worker's --max-prepared-bytes)"
            )
        return size


#: A data set a worker serves, bundled or its own.
Served: TypeAlias = Holding | SourceHolding


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


def _holdout(config: WorkerConfig, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, validation)`` among a trainer's ``count`` examples: ``config.val_fraction`` held out,
    seeded by ``config.val_seed`` or its id, so a restarted worker holds out the same ones."""
    seed = validation_seed(config.worker_id) if config.val_seed is None else config.val_seed
    return holdout(count, config.val_fraction, np.random.default_rng(seed))


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
    train, held = _holdout(config, len(data))
    return Holding(data.subset(train), data.subset(held) if len(held) else None, spec, version)


def hold_source(config: WorkerConfig, source: Source, spec: DatasetSpec | None = None) -> SourceHolding:
    """Serve ``source``, a user's own data, as ``config`` says: its IID shard with ``config.shard``, of which a
    trainer holds out ``config.val_fraction`` for validation as for a bundled data set (:func:`load_shard`).

    Raises:
        ConfigError: if the shard holds no examples, or ``source`` names categories of fewer examples than
            ``config.min_group_size`` (a table read with a smaller minimum, as ``load_data`` can).
    """
    # A table's schema names the categories its reading let through; hello would reveal them as they are.
    read_with = getattr(source, "min_group_size", config.min_group_size)
    if read_with < config.min_group_size:
        raise ConfigError(
            f"the data were read with a minimum group size of {read_with}, below this worker's"
            f" {config.min_group_size}: read them with load_data(..., min_group_size={config.min_group_size})"
        )
    examples = np.arange(len(source))
    if config.shard is not None:
        shard, count = config.shard
        examples = iid_shard(len(source), shard, count, np.random.default_rng(config.shard_seed))
        if not len(examples):
            raise ConfigError(
                f"worker {config.worker_id} holds no examples: shard {shard + 1}/{count} of {len(source)} is empty"
            )
    if config.testing or config.val_fraction == 0:
        train, held = examples, examples[:0]
    else:
        positions, held_positions = _holdout(config, len(examples))
        train, held = examples[positions], examples[held_positions]
    return SourceHolding(
        source, train, held, spec=spec, testing=config.testing, max_prepared_bytes=config.max_prepared_bytes
    )


def load_holdings(config: WorkerConfig) -> list[Served]:
    """Every data set this worker serves: one per ``--dataset-spec``, in order, else its ``--data`` or ``--dataset``.

    Own data is read and checked whole here, before the worker listens: a
    bad file stops the start, never a request.

    Raises:
        ConfigError: if a spec names no known kind of data, or a shard is empty.
        DatasetError: if a data file cannot be read or does not hold valid examples.
    """
    specs: Sequence[DatasetSpec | None] = config.datasets or [None]
    return [_load(config, spec) for spec in specs]


def _load(config: WorkerConfig, spec: DatasetSpec | None) -> Served:
    own = config.data if spec is None else spec.source
    if own is None:
        return load_shard(config, spec)
    # The one place a worker opens its own data.
    return hold_source(config, open_source(own, config.source_options), spec)
