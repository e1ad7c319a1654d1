"""A table file that pandas or pyarrow cannot read for want of a package or a feature stops with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from syncfed.data.base import SourceOptions
from syncfed.data.tables import TableSource
from syncfed.exceptions import DatasetError


def test_a_parquet_type_pyarrow_cannot_convert_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(path: object) -> None:
        raise pa.ArrowNotImplementedError("Unsupported cast from dense_union to utf8\nin a second line")

    monkeypatch.setattr(pd, "read_parquet", unsupported)
    with pytest.raises(DatasetError) as error:
        TableSource.read(tmp_path / "t.parquet", "parquet", SourceOptions(label_column="y"))
    assert (
        str(error.value)
        == f"{tmp_path}/t.parquet: cannot be read as parquet: Unsupported cast from dense_union to utf8"
    )


def test_a_missing_package_is_named_with_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pyarrow(path: object) -> None:
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pd, "read_parquet", no_pyarrow)
    with pytest.raises(DatasetError) as error:
        TableSource.read(tmp_path / "t.parquet", "parquet", SourceOptions(label_column="y"))
    assert str(error.value) == (
        f"{tmp_path}/t.parquet: cannot be read as parquet: it needs the pyarrow package (pip install pyarrow)"
    )
