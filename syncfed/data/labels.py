"""Labels of a user's own data: class names from label values, the one order every site agrees on, and the map
from a site's classes to the federation's.

Class names are text on the wire. A table's label values become names as
written (integral floats as integers, so ``1.0`` and ``1`` are one class);
a label of non-integral numbers is continuous (regression) unless the
worker's operator says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..exceptions import DatasetError
from ..protocol.base import MAX_CLASSES

__all__ = ["class_name", "class_order", "read_labels", "map_labels"]


def class_name(value: object) -> str:
    """A label value as a class name: numbers without a spurious ``.0``, text stripped of nothing."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _number(name: str) -> float | None:
    try:
        value = float(name)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` without repeats, sorted: in numeric order when every name is a number ("2" before "10"),
    else as text."""
    unique = set(names)
    numbers = {name: _number(name) for name in unique}
    if unique and all(number is not None for number in numbers.values()):
        return tuple(sorted(unique, key=lambda name: (numbers[name], name)))
    return tuple(sorted(unique))


def read_labels(values: np.ndarray, label_type: str, where: str) -> tuple[tuple[str, ...] | None, np.ndarray]:
    """A label column's class names (sorted by :func:`class_order`) and each example's index among them; or, for
    a continuous label, ``None`` and the values as float32.

    ``label_type`` is ``auto`` (continuous when the values are non-integral
    numbers), ``classes`` or ``continuous``; ``where`` names the file or
    source in error lines.

    Raises:
        DatasetError: missing values, a continuous label that is not numeric,
            or more than the protocol's limit of classes.
    """
    numeric = values.dtype.kind in "iufb"
    if numeric and values.dtype.kind == "f" and not np.isfinite(values).all():
        row = int(np.argmax(~np.isfinite(values)))
        raise DatasetError(f"{where}: label of example {row} is {values[row]}, not a finite number")
    if not numeric:
        missing = [
            i for i, value in enumerate(values) if value is None or (isinstance(value, float) and math.isnan(value))
        ]
        if missing:
            raise DatasetError(f"{where}: label of example {missing[0]} is missing")
    continuous = label_type == "continuous" or (
        label_type == "auto" and values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0)
    )
    if continuous:
        if not numeric:
            raise DatasetError(f"{where}: a continuous label must be numbers, not {values.dtype} values")
        return None, values.astype(np.float32)
    names = np.array([class_name(value) for value in values.tolist()], dtype=object)
    classes = class_order(names.tolist())
    if len(classes) > MAX_CLASSES:
        raise DatasetError(f"{where}: {len(classes)} classes exceed limit of {MAX_CLASSES}")
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.fromiter((index[name] for name in names), dtype=np.int64, count=len(names))


def map_labels(labels: np.ndarray, local: Sequence[str], agreed: Sequence[str], where: str) -> np.ndarray:
    """``labels`` (indices into this site's ``local`` classes) as indices into the federation's ``agreed`` ones.

    Raises:
        DatasetError: if a class of this site is not among the agreed ones.
    """
    position = {name: i for i, name in enumerate(agreed)}
    lost = [name for name in local if name not in position]
    if lost:
        raise DatasetError(f"{where}: class {lost[0]!r} of this site is not among the agreed classes")
    table = np.array([position[name] for name in local], dtype=np.int64)
    return table[labels] if len(table) else labels.astype(np.int64)
