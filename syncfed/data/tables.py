"""Tables a worker holds: a CSV, TSV or Parquet file (read with pandas and pyarrow), or a notebook's DataFrame.

A table is read and checked once, at start-up, into float32 numbers and
integer category codes; the DataFrame is not kept. Each feature is a number
(ints, floats, bools as 0/1) unless ``--categorical-columns`` names it; a
categorical value becomes text as a class name does (``1.0`` is ``"1"``).

Rows in error lines count the data rows from 1, as a spreadsheet's row
numbers less the header: row 1 is the first row under a CSV's header, which
is line 2 of the file. ``--missing mean`` fills a number with this site's
own column mean (not the federation's), and sends a missing category to the
"other" slot.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from ..datasets import Dataset
from ..exceptions import ConfigError, DatasetError, ProtocolError, describe
from ..protocol.data_messages import DataPlan, DataSchema, Feature
from .base import SourceOptions
from .labels import class_name, class_order, plan_labels, read_labels
from .loaders import reason

__all__ = ["TABLE_FORMATS", "TableSource"]

#: The file formats a table is read from; ``tsv`` is a CSV separated by tabs.
TABLE_FORMATS: Final = ("csv", "tsv", "parquet")

#: How many of a table's column names an error line lists.
_LISTED_COLUMNS: Final = 20

#: The package pandas needs to decompress a file of each suffix that the standard library cannot.
_PACKAGES: Final = {".zst": "zstandard"}

#: The name pandas gives a CSV column with an empty header, as the index column of ``DataFrame.to_csv``.
_UNNAMED = re.compile(r"Unnamed: \d+")

logger = logging.getLogger("syncfed.data")


class TableSource:
    """A table's feature columns and label, as a worker serves them (see :class:`syncfed.data.base.Source`).

    Build one with :meth:`read` (a file) or :meth:`from_frame` (a DataFrame)::

        source = TableSource.read("claims.csv", "csv", SourceOptions(label_column="fraud"))
    """

    name = "table"

    def __init__(
        self,
        where: str,
        schema: DataSchema,
        numeric: np.ndarray,
        codes: np.ndarray,
        levels: dict[str, tuple[str, ...]],
        labels: np.ndarray,
        min_group_size: int,
    ) -> None:
        """The parts :func:`_parse` read: ``numeric`` (float32, one column per numeric feature, in the
        schema's order), ``codes`` (int32, one column per categorical feature: an index into its
        ``levels``, every value this site holds, or -1 for a missing one) and the labels;
        ``min_group_size``, the fewest examples of a category the schema names."""
        self.where = where
        self.min_group_size = min_group_size
        self.classes = schema.classes
        self._schema = schema
        self._labels = labels
        self._numeric = numeric
        self._codes = codes
        self._levels = levels
        numeric_names = [feature.name for feature in schema.features if feature.type == "numeric"]
        self._numeric_column = {name: i for i, name in enumerate(numeric_names)}
        self._code_column = {name: i for i, name in enumerate(levels)}

    @classmethod
    def read(cls, path: str | Path, format: str, options: SourceOptions) -> TableSource:
        """The table in the file at ``path``, a ``csv``, ``tsv`` or ``parquet`` file.

        Raises:
            DatasetError: one line naming the file (and the row and column) if it
                cannot be read or a value does not fit ``options``.
            ConfigError: if ``format`` is unknown or ``options`` names no label column.
        """
        if format not in TABLE_FORMATS:
            raise ConfigError(f"table format {format!r} is not one of {', '.join(TABLE_FORMATS)}")
        return cls.from_frame(_read_file(Path(path), format), options, where=str(path))

    @classmethod
    def from_frame(cls, frame: Any, options: SourceOptions, where: str = "DataFrame") -> TableSource:
        """The table a pandas DataFrame holds; ``where`` names it in error lines.

        Raises:
            DatasetError: as :meth:`read`, naming ``where``.
            ConfigError: if ``options`` names no label column.
        """
        return _parse(frame, options, where)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def schema(self) -> DataSchema:
        return self._schema

    def prepare(self, plan: DataPlan) -> Dataset:
        """The rows encoded as ``plan`` says (see :meth:`syncfed.data.base.Source.prepare`): features matched by
        name in the plan's order, a number as one column standardised with the plan's statistics, a category
        one-hot over the plan's vocabulary and a last "other" slot, each slot 0 or 1.

        The one array is filled in place: a plan's vocabularies can make it wide, and a worker bounds its
        size before asking for it (``--max-prepared-bytes``).
        """
        if plan.kind != "table":
            raise DatasetError(f"{self.where}: this worker holds a table, the plan describes {plan.kind}")
        labels = plan_labels(self._labels, self.classes, plan.classes, self.where)
        vocabularies = plan.categories or {}
        mean = np.asarray(plan.mean, dtype=np.float32)
        std = np.asarray(plan.std, dtype=np.float32)
        x = np.zeros((len(self), plan.input_shape[0]), dtype=np.float32)
        offset = 0
        for name in plan.features:
            if name in self._numeric_column:
                if name in vocabularies:
                    raise DatasetError(
                        f"{self.where}: column {name!r} is categorical in the plan, numeric here:"
                        f" start this worker with --categorical-columns {name}"
                    )
                column = self._numeric[:, self._numeric_column[name]]
                x[:, offset] = (column - mean[offset]) / std[offset] if plan.mean else column
                offset += 1
            elif name in self._code_column:
                if name not in vocabularies:
                    raise DatasetError(
                        f"{self.where}: column {name!r} is numeric in the plan, categorical here:"
                        " leave it out of --categorical-columns"
                    )
                vocabulary = vocabularies[name]
                position = {category: i for i, category in enumerate(vocabulary)}
                # Each value of this site to its slot; the last entry, "other", is also where code -1 (missing) lands.
                slots = [position.get(level, len(vocabulary)) for level in self._levels[name]] + [len(vocabulary)]
                codes = self._codes[:, self._code_column[name]]
                x[np.arange(len(x)), offset + np.asarray(slots, dtype=np.int64)[codes]] = 1.0
                offset += len(vocabulary) + 1
            else:
                raise DatasetError(f"{self.where}: this site's table has no column {name!r}")
        return Dataset(self.name, x, labels, plan.num_classes, plan.classes or ())

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self._numeric.tobytes())
        digest.update(self._codes.tobytes())
        digest.update(np.ascontiguousarray(self._labels).tobytes())
        names = [*self._numeric_column, *(f"{name}={','.join(v)}" for name, v in self._levels.items())]
        digest.update("\0".join([*names, *(self.classes or ())]).encode())
        return "sha256:" + digest.hexdigest()[:16]


def _read_file(path: Path, format: str) -> Any:
    """The file as a DataFrame, or one line saying why it cannot be read."""
    try:
        if format == "parquet":
            return pd.read_parquet(path)
        separator = "\t" if format == "tsv" else ","
        try:
            return pd.read_csv(path, sep=separator, low_memory=False, skipinitialspace=True)
        except UnicodeDecodeError:
            # Latin-1 decodes any bytes; older exports (spreadsheets, UCI files) are often written in it.
            logger.warning("%s: not UTF-8 text, read as Latin-1", path)
            return pd.read_csv(path, sep=separator, low_memory=False, skipinitialspace=True, encoding="latin-1")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: a folder, not a {format} file") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file is empty") from None
    except ImportError as exc:  # pandas imports what a file needs (zstandard, pyarrow) only when it reads one
        package = "pyarrow" if format == "parquet" else _PACKAGES.get(path.suffix.lower())
        needs = f"it needs the {package} package (pip install {package})" if package else reason(exc)
        raise DatasetError(f"{path}: cannot be read as {format}: {needs}") from None
    # pyarrow's ArrowInvalid is a ValueError, its ArrowNotImplementedError (a type or codec it lacks) this one
    except (OSError, ValueError, NotImplementedError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot be read as {format}: {reason(exc)}") from None


def _listing(columns: Sequence[str]) -> str:
    more = f" and {len(columns) - _LISTED_COLUMNS} more" if len(columns) > _LISTED_COLUMNS else ""
    return ", ".join(columns[:_LISTED_COLUMNS]) + more


def _columns_line(name: str, what: str, columns: Sequence[str], where: str) -> str:
    """The error line for a column the table lacks: a close match, and the columns it has."""
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: no {what} column {name!r}{hint}; the columns are: {_listing(columns)}"


def _choose_columns(columns: list[str], options: SourceOptions, where: str) -> tuple[str, list[str], set[str]]:
    """The label column, the feature columns in order, and the categorical ones, each checked against the table."""
    label = options.label_column
    if label is None:
        raise ConfigError(f"{where}: which column is the label? pass --label-column, one of: {_listing(columns)}")
    if label not in columns:
        raise DatasetError(_columns_line(label, "label", columns, where))
    if options.feature_columns is None:
        unnamed = [column for column in columns if _UNNAMED.fullmatch(column)]
        if unnamed:
            logger.info("%s: columns without a header (%s) are not features", where, ", ".join(unnamed))
        features = [column for column in columns if column != label and column not in unnamed]
    else:
        features = list(options.feature_columns)
        for name in features:
            if name not in columns:
                raise DatasetError(_columns_line(name, "feature", columns, where))
            if name == label:
                raise DatasetError(f"{where}: column {name!r} is the label; it cannot be a feature too")
            if features.count(name) > 1:
                raise DatasetError(f"{where}: feature column {name!r} is named twice")
    if not features:
        raise DatasetError(f"{where}: no feature columns besides the label {label!r}")
    for name in options.categorical_columns:
        if name not in columns:
            raise DatasetError(_columns_line(name, "categorical", columns, where))
        if name not in features:
            raise DatasetError(f"{where}: categorical column {name!r} is not one of the feature columns")
    return label, features, set(options.categorical_columns)


def _parse(frame: Any, options: SourceOptions, where: str) -> TableSource:
    """Read a DataFrame into a :class:`TableSource`, checking every value once (see the module docstring)."""
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(f"{where}: a table must be a pandas DataFrame, not {type(frame).__name__}")
    columns = [str(column) for column in frame.columns]
    twice = next((name for i, name in enumerate(columns) if name in columns[:i]), None)
    if twice is not None:
        raise DatasetError(f"{where}: column {twice!r} appears twice")
    frame = frame.set_axis(columns, axis=1)
    label, features, categorical = _choose_columns(columns, options, where)
    if len(frame) == 0:
        raise DatasetError(f"{where}: the table has no rows")
    used = [*features, label]
    missing = frame[used].isna().to_numpy()
    rows = np.arange(len(frame))  # each row's number in the file, less one, for error lines
    if missing.any():
        if options.missing == "drop":
            keep = ~missing.any(axis=1)
            if not keep.any():
                raise DatasetError(f"{where}: no rows left after dropping {len(frame)} rows with missing values")
            logger.info("%s: dropped %d of %d rows with a missing value", where, len(frame) - keep.sum(), len(frame))
            frame, rows = frame[keep], rows[keep]
        else:
            _refuse_missing(missing, used, label, options.missing, where)
    numeric, codes, levels, described = [], [], {}, []
    try:  # a name too long for the wire, or more categories than it allows, stops here
        for name in features:
            if name in categorical:
                code, levels[name], counts = _categories(frame[name])
                codes.append(code)
                shown = zip(levels[name], counts, strict=True)
                described.append(
                    Feature(name, "categorical", tuple(v for v, n in shown if n >= options.min_group_size))
                )
            else:
                numeric.append(_numbers(frame[name], name, rows, where))
                described.append(Feature(name, "numeric"))
        classes, labels = read_labels(_label_values(frame[label]), options.label_type, where)
        schema = DataSchema("table", (len(features),), classes, tuple(described), label)
    except ProtocolError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return TableSource(
        where,
        schema,
        np.stack(numeric, axis=1) if numeric else np.zeros((len(frame), 0), dtype=np.float32),
        np.stack(codes, axis=1) if codes else np.zeros((len(frame), 0), dtype=np.int32),
        levels,
        labels,
        options.min_group_size,
    )


def _refuse_missing(missing: np.ndarray, used: list[str], label: str, policy: str, where: str) -> None:
    """Under ``error``, stop at the first missing value; under ``mean``, at the first missing label."""
    if policy == "mean":
        missing = missing[:, [used.index(label)]]
        used = [label]
    if not missing.any():
        return
    row, column = np.argwhere(missing)[0]
    name = used[column]
    if name == label:
        raise DatasetError(f"{where}: row {row + 1}, label column {name!r} has no value; --missing drop skips the row")
    raise DatasetError(f"{where}: row {row + 1}, column {name!r} has no value; --missing mean or drop accepts it")


def _numbers(column: Any, name: str, rows: np.ndarray, where: str) -> np.ndarray:
    """A numeric feature as float32, a missing value filled with the column's mean at this site."""
    absent = column.isna().to_numpy()
    read = column
    if column.dtype.kind not in "iufb":  # text, dates, pandas categories: each value must read as a number
        read = pd.to_numeric(column.astype(object), errors="coerce")
    values: np.ndarray = read.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    wrong = np.isnan(values) & ~absent
    if wrong.any():
        row = int(np.argmax(wrong))
        raise DatasetError(
            f"{where}: row {rows[row] + 1}, column {name!r}: {describe(column.iloc[row])} is not a number;"
            f" if the column is categorical, pass --categorical-columns {name}"
        )
    if np.isinf(values).any():
        row = int(np.argmax(np.isinf(values)))
        raise DatasetError(f"{where}: row {rows[row] + 1}, column {name!r}: {values[row]} is not a finite number")
    if absent.any():
        if absent.all():
            raise DatasetError(f"{where}: column {name!r} has no values to take a mean of")
        logger.info("%s: %d missing values of column %r filled with this site's mean", where, absent.sum(), name)
        values[absent] = values[~absent].mean()
    return values.astype(np.float32)


def _categories(column: Any) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """A categorical feature as codes (-1: missing), its values as text in class order, and each one's count.

    Values that read the same (``1`` and ``1.0``) are one category.
    """
    found, unique = pd.factorize(column, use_na_sentinel=True)
    names = [class_name(value) for value in unique.tolist()]
    levels = class_order(names)
    position = {level: i for i, level in enumerate(levels)}
    # Each factorized value to its level; the appended -1 keeps code -1 (missing) as it is.
    table = np.asarray([position[name] for name in names] + [-1], dtype=np.int32)
    codes = table[found]
    return codes, levels, np.bincount(codes[codes >= 0], minlength=len(levels))


def _label_values(column: Any) -> np.ndarray:
    """The label column as numpy values for :func:`~syncfed.data.labels.read_labels` (no value is missing here)."""
    kind = column.dtype.kind
    if kind == "b":
        return np.asarray(column.to_numpy(dtype=bool))
    if kind in "iu":
        return np.asarray(column.to_numpy(dtype=np.int64))
    if kind == "f":
        return np.asarray(column.to_numpy(dtype=np.float64))
    return np.asarray(column.to_numpy(dtype=object))
