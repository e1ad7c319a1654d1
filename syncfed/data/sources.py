"""Opening a worker's own data from its spec (``--data``), and from Python (:func:`load_data`).

A stand-in until the tables and image readers land: it opens ``npz:PATH``
(arrays ``x`` and ``y``) and arrays given in Python, and refuses every other
spec with one line.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import ConfigError, DatasetError
from .arrays import ArraySource
from .base import Source, SourceOptions

__all__ = ["open_source", "load_data"]


def open_source(spec: str, options: SourceOptions) -> Source:
    """The source ``spec`` names (``npz:PATH``), read and checked with ``options``.

    Raises:
        ConfigError: if the spec names no known kind of data.
        DatasetError: if the file cannot be read or does not hold what the kind needs.
    """
    kind, colon, where = spec.partition(":")
    if kind != "npz" or not colon or not where:
        raise ConfigError(f"data spec {spec!r} is not npz:PATH")
    return _npz(Path(where), options)


def _npz(path: Path, options: SourceOptions) -> ArraySource:
    """Arrays ``x`` and ``y`` of an ``.npz`` file, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = sorted(arrays.files)
            if "x" not in names or "y" not in names:
                held = ", ".join(names) or "no arrays"
                raise DatasetError(f"{path}: an npz file of own data needs arrays x and y; it holds {held}")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a missing, truncated or pickled file
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DatasetError(f"cannot read {path}: {reason}") from None
    return ArraySource(x, y, where=str(path), options=options)


def load_data(
    data: str | os.PathLike[str] | tuple[Any, Any],
    *,
    classes: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    **options: Any,
) -> Source:
    """A worker's own data from Python: a spec such as ``"npz:arrays.npz"``, or arrays ``(x, y)``.

    ``options`` are :class:`~syncfed.data.base.SourceOptions` fields.

    Raises:
        ConfigError: if the options or the spec are invalid.
        DatasetError: if the data cannot be read or is not what the kind needs.
    """
    settings = SourceOptions(**options)
    if isinstance(data, tuple):
        x, y = data
        return ArraySource(np.asarray(x), np.asarray(y), classes=classes, feature_names=feature_names, options=settings)
    return open_source(os.fspath(data), settings)
