"""A worker's own data: the source protocol every reader implements, and the options a worker reads it with.

Pure: reading files is this layer's only I/O, and nothing here knows about
the network. A source is read and checked once, when the worker starts (a
bad file stops the start with one line naming it, never half a data set);
it then describes itself (:meth:`Source.schema`) for hello, and prepares its
examples the way the federation agreed (:meth:`Source.prepare`) for every
request that carries a :class:`~syncfed.protocol.data_messages.DataPlan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np

from ..datasets import Dataset
from ..exceptions import ConfigError
from ..protocol.data_messages import DataPlan, DataSchema

__all__ = ["MISSING_POLICIES", "LABEL_TYPES", "SourceOptions", "Source", "standardize"]

#: What a table's missing values become: a stop naming the file, row and column; the column's mean; or no row.
MISSING_POLICIES: Final = ("error", "mean", "drop")
#: How a label column is read: decided from its values, as class names, or as a continuous number.
LABEL_TYPES: Final = ("auto", "classes", "continuous")


@dataclass(frozen=True)
class SourceOptions:
    """How a worker reads its own data: the ``--data`` companions of the worker's command line.

    ``image_size`` is ``(H, W)`` and ``channels`` 1 or 3; ``None`` keeps the
    files' own (then every image of the folder must agree). ``data_args``
    are ``--data-arg key=value`` settings for a Python loader.
    """

    # Images
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    # Tables
    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = None  # None: every column but the label
    categorical_columns: tuple[str, ...] = ()
    missing: str = "error"
    label_type: str = "auto"
    # Loaders
    data_args: Mapping[str, str] = field(default_factory=dict)
    # Privacy: a category held by fewer examples is not named in the schema
    min_group_size: int = 10

    def __post_init__(self) -> None:
        if self.image_size is not None and (
            len(self.image_size) != 2 or not all(isinstance(n, int) and 1 <= n <= 8192 for n in self.image_size)
        ):
            raise ConfigError(f"image size {self.image_size} must be two sizes from 1 to 8192 pixels")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels {self.channels} must be 1 (grayscale) or 3 (RGB)")
        if self.missing not in MISSING_POLICIES:
            raise ConfigError(f"missing-value policy {self.missing!r} is not one of {', '.join(MISSING_POLICIES)}")
        if self.label_type not in LABEL_TYPES:
            raise ConfigError(f"label type {self.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        if self.min_group_size < 1:
            raise ConfigError(f"minimum group size {self.min_group_size} must be at least 1")


class Source(Protocol):
    """A worker's own data, read and checked at start-up.

    ``labels`` are the site's own: indices into ``schema().classes``, or
    float32 values for a continuous label. They drive the validation
    hold-out and the histogram hello sends; the model only ever sees the
    labels :meth:`prepare` maps to the plan's classes.
    """

    #: What the worker logs and ``info`` names as the data set: ``images``, ``table`` or ``arrays``.
    name: str

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def schema(self) -> DataSchema:
        """The data's schema for hello; a categorical column names only categories of at least
        ``min_group_size`` examples."""
        ...

    def prepare(self, plan: DataPlan) -> Dataset:
        """Every example as ``plan`` says: features in its order and encoding, standardised with its
        statistics, labels as indices into its classes.

        Raises:
            DatasetError: if the plan does not fit this data (a missing feature,
                a class of this site that the plan lacks, another input shape).
        """
        ...

    def fingerprint(self) -> str:
        """A digest of the examples: the version a worker advertises for a named data set."""
        ...


def standardize(values: np.ndarray, plan: DataPlan) -> np.ndarray:
    """``values`` (a batch, ``(N, *plan.input_shape)``) standardised with the plan's statistics, as float32:
    per channel for images, per input value otherwise; unchanged when the plan has none."""
    values = np.asarray(values, dtype=np.float32)
    if not plan.mean:
        return values
    mean = np.asarray(plan.mean, dtype=np.float32)
    std = np.asarray(plan.std, dtype=np.float32)
    if plan.kind == "images":
        shape = (1, len(mean)) + (1,) * (values.ndim - 2)
        return (values - mean.reshape(shape)) / std.reshape(shape)
    return (values - mean.reshape(1, *plan.input_shape)) / std.reshape(1, *plan.input_shape)
