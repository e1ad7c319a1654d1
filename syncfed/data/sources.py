"""Which source a worker's ``--data`` names, and :func:`load_data`, the same for a notebook.

The forms, tried in this order:

- ``images:DIR`` (one subfolder per class), ``csv:PATH``, ``tsv:PATH``,
  ``parquet:PATH`` and ``npz:PATH``: a known prefix, then the path;
- ``module.path:function``: a Python loader (anything else of that shape,
  so a module named like a prefix cannot be a loader);
- a bare path ending in ``.csv``, ``.tsv``, ``.parquet``, ``.pq`` or ``.npz``
  (a CSV or TSV may also end in ``.gz``, ``.bz2``, ``.xz``, ``.zip`` or ``.zst``:
  pandas decompresses it). A word and a colon before it (``cvs:a.csv``) is a
  mistyped prefix, not a path.

Readers import what they need (pandas, Pillow) only when a spec asks for
them, so a worker over images never imports pandas.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Final

from ..exceptions import ConfigError
from .base import Source, SourceOptions
from .loaders import call_loader, read_npz, source_from

__all__ = ["DATA_FORMS", "open_source", "load_data"]

#: The forms of ``--data``, for help texts and error lines.
DATA_FORMS: Final = ("images:DIR", "csv:PATH", "tsv:PATH", "parquet:PATH", "npz:PATH", "module.path:function")

_PREFIXES: Final = ("images", "csv", "tsv", "parquet", "npz")
_SUFFIXES: Final = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_COMPRESSED: Final = (".gz", ".bz2", ".xz", ".zip", ".zst")
#: A prefix, as in ``cvs:claims.csv``: a word before the colon, where a path would have a slash or a dot.
_WORD: Final = re.compile(r"\w+")
_LOADER: Final = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def open_source(spec: str, options: SourceOptions) -> Source:
    """Read and check the source ``spec`` names (see the module docstring), once, at start-up::

        source = open_source("csv:/data/claims.csv", SourceOptions(label_column="fraud"))

    Raises:
        ConfigError: if ``spec`` has none of the accepted forms (one line listing them).
        DatasetError: one line naming the file if its data cannot be read or do not fit ``options``.
    """
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in _PREFIXES:
        if not rest:
            raise ConfigError(f"--data {spec!r} names no path; {_forms()}")
        return _read(prefix, Path(rest).expanduser(), options)
    if _LOADER.fullmatch(spec):
        return call_loader(spec, options)
    kind = None if colon and _WORD.fullmatch(prefix) else _kind_of(Path(spec))
    if kind is None:
        close = difflib.get_close_matches(prefix, _PREFIXES, n=1, cutoff=0.6) if colon else []
        hint = f" (did you mean {close[0]}:?)" if close else ""
        raise ConfigError(f"--data {spec!r} is not a data source{hint}; {_forms()}")
    return _read(kind, Path(spec).expanduser(), options)


def _forms() -> str:
    return f"use one of {', '.join(DATA_FORMS)}, or a path ending in {', '.join(_SUFFIXES)}"


def _kind_of(path: Path) -> str | None:
    """A bare path's kind from its suffix: ``a.csv`` and ``a.csv.gz`` are CSV files."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in _COMPRESSED and _SUFFIXES.get(suffixes[-2]) in ("csv", "tsv"):
        return _SUFFIXES[suffixes[-2]]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _read(kind: str, path: Path, options: SourceOptions) -> Source:
    if kind == "images":
        # Pillow is imported only for an image folder.
        images = importlib.import_module("syncfed.data.images")
        source: Source = images.ImageFolderSource(path, options)
        return source
    if kind == "npz":
        return read_npz(path, options)
    from .tables import TableSource  # pandas is imported only for a table

    return TableSource.read(path, kind, options)


def load_data(data: Any, **options: Any) -> Source:
    """A worker's own data from Python: a ``--data`` spec (or a path), a pandas DataFrame, ``(x, y)`` or
    ``(x, y, info)`` arrays, or a torch Dataset; the keyword options are :class:`SourceOptions`' fields::

        source = load_data("csv:claims.csv", label_column="fraud", categorical_columns=["region"])
        source = load_data(frame, label_column="fraud")
        source = load_data((x, y), label_type="continuous")

    Raises:
        ConfigError: for an unknown option or spec.
        DatasetError: one line naming the data if they cannot be read or do not fit the options.
    """
    settings = _options(options)
    if isinstance(data, (str, os.PathLike)):
        return open_source(os.fspath(data), settings)
    return source_from(data, settings)


def _options(options: dict[str, Any]) -> SourceOptions:
    """Keyword options as :class:`SourceOptions`, taking lists for tuples and one size for a square image."""
    fields = [field.name for field in dataclasses.fields(SourceOptions)]
    unknown = [name for name in options if name not in fields]
    if unknown:
        raise ConfigError(f"load_data() has no option {unknown[0]!r}; the options are {', '.join(fields)}")
    for name in ("feature_columns", "categorical_columns"):
        if isinstance(options.get(name), str):
            options[name] = (options[name],)
        elif options.get(name) is not None:
            options[name] = tuple(options[name])
    size = options.get("image_size")
    if isinstance(size, int):
        options["image_size"] = (size, size)
    elif size is not None:
        options["image_size"] = tuple(size)
    return SourceOptions(**options)
