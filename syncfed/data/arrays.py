"""Arrays a worker holds in memory: ``x`` and ``y`` from a notebook, an ``.npz`` file or a Python loader."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..datasets import Dataset
from ..exceptions import DatasetError
from ..protocol.data_messages import DataPlan, DataSchema, Feature
from .base import SourceOptions, standardize
from .labels import map_labels, read_labels

__all__ = ["ArraySource"]


class ArraySource:
    """Examples ``x`` (``(N, ...)`` numbers) with labels ``y`` (``(N,)``), checked once when built.

    ``classes`` names the classes when ``y`` holds their indices; otherwise
    the class names are ``y``'s values (see :func:`~syncfed.data.labels.read_labels`).
    ``feature_names`` names the values of a 1-d input, so sites match them by name.

    Raises:
        DatasetError: if the arrays are empty, not numbers, not finite, or do not match in length.
    """

    name = "arrays"

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        where: str = "arrays",
        classes: Sequence[str] | None = None,
        feature_names: Sequence[str] | None = None,
        options: SourceOptions | None = None,
    ) -> None:
        options = options or SourceOptions()
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim < 2 or len(x) == 0:
            raise DatasetError(f"{where}: x must hold at least one example of at least one value, not shape {x.shape}")
        if x.dtype.kind not in "iufb":
            raise DatasetError(f"{where}: x must hold numbers, not {x.dtype} values")
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"{where}: y must hold one label per example ({len(x)}), not shape {y.shape}")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            row = int(np.argmax(~np.isfinite(x.reshape(len(x), -1)).any(axis=1)))
            raise DatasetError(f"{where}: example {row} of x holds a value that is not a finite number")
        if feature_names is not None and (x.ndim != 2 or len(feature_names) != x.shape[1]):
            raise DatasetError(f"{where}: {len(feature_names)} feature names for inputs of shape {x.shape[1:]}")
        self.where = where
        self.x = x
        self.feature_names = tuple(feature_names) if feature_names is not None else ()
        if classes is None:
            self.classes, self._labels = read_labels(y, options.label_type, where)
        else:
            self.classes = tuple(str(name) for name in classes)
            if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= len(self.classes))):
                raise DatasetError(f"{where}: with {len(self.classes)} class names, y must hold their indices")
            self._labels = y.astype(np.int64)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self.x)

    def schema(self) -> DataSchema:
        features = tuple(Feature(name) for name in self.feature_names)
        return DataSchema("arrays", tuple(self.x.shape[1:]), self.classes, features)

    def prepare(self, plan: DataPlan) -> Dataset:
        """The arrays as ``plan`` says (see :meth:`syncfed.data.base.Source.prepare`)."""
        if plan.kind != "arrays":
            raise DatasetError(f"{self.where}: this worker holds arrays, the plan describes {plan.kind}")
        x = self.x
        if plan.features and self.feature_names:
            position = {name: i for i, name in enumerate(self.feature_names)}
            absent = [name for name in plan.features if name not in position]
            if absent:
                raise DatasetError(f"{self.where}: this site has no feature {absent[0]!r}")
            x = x[:, [position[name] for name in plan.features]]
        if tuple(x.shape[1:]) != plan.input_shape:
            raise DatasetError(f"{self.where}: inputs of shape {x.shape[1:]}, the plan's are {plan.input_shape}")
        if plan.classes is None:
            if self.classes is not None:
                raise DatasetError(f"{self.where}: this site's label has classes, the plan's is continuous")
            labels = self._labels
        else:
            if self.classes is None:
                raise DatasetError(f"{self.where}: this site's label is continuous, the plan's has classes")
            labels = map_labels(self._labels, self.classes, plan.classes, self.where)
        return Dataset(self.name, standardize(x, plan), labels, plan.num_classes, plan.classes or ())

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.x.tobytes())
        digest.update(np.ascontiguousarray(self._labels).tobytes())
        digest.update("\0".join(self.classes or ()).encode())
        return "sha256:" + digest.hexdigest()[:16]
