"""The ``--data`` spec: which reader each form reaches, the line a wrong one costs, and load_data for notebooks."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

import syncfed.data
from syncfed.data import SourceOptions, load_data, open_source
from syncfed.data.arrays import ArraySource
from syncfed.data.tables import TableSource
from syncfed.exceptions import ConfigError, DatasetError

FORMS = (
    "use one of images:DIR, csv:PATH, tsv:PATH, parquet:PATH, npz:PATH, module.path:function,"
    " or a path ending in .csv, .tsv, .parquet, .pq, .npz"
)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """One small table in every format, and arrays, under ``tmp_path``."""
    data = pd.DataFrame({"age": [30, 40, 50], "fraud": [0, 1, 1]})
    data.to_csv(tmp_path / "t.csv", index=False)
    data.to_csv(tmp_path / "t.csv.gz", index=False)
    data.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    data.to_parquet(tmp_path / "t.parquet")
    data.to_parquet(tmp_path / "t.pq")
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 2)), y=np.array([0, 1, 1]))
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("csv:{}/t.csv", TableSource),
        ("tsv:{}/t.tsv", TableSource),
        ("parquet:{}/t.parquet", TableSource),
        ("npz:{}/a.npz", ArraySource),
        ("{}/t.csv", TableSource),
        ("{}/t.csv.gz", TableSource),
        ("{}/t.tsv", TableSource),
        ("{}/t.pq", TableSource),
        ("{}/a.npz", ArraySource),
    ],
)
def test_each_form_reaches_its_reader(files: Path, spec: str, kind: type) -> None:
    source = open_source(spec.format(files), SourceOptions(label_column="fraud"))
    assert isinstance(source, kind)
    assert len(source) == 3


def test_images_reach_the_image_folder_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[Path, SourceOptions]] = []
    images = types.ModuleType("syncfed.data.images")
    images.ImageFolderSource = lambda root, options: calls.append((root, options)) or "folder"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "syncfed.data.images", images)
    options = SourceOptions(image_size=(32, 32), channels=1)
    assert open_source(f"images:{tmp_path}/xray", options) == "folder"
    assert calls == [(tmp_path / "xray", options)]


def test_a_loader_spec_calls_the_loader_with_the_data_args(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    def load(**settings: str) -> tuple[np.ndarray, np.ndarray]:
        seen.append(settings)
        return np.ones((2, 2)), np.array([0, 1])

    module = types.ModuleType("hospital_data")
    module.load = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hospital_data", module)
    source = open_source("hospital_data:load", SourceOptions(data_args={"site": "north", "year": "2024"}))
    assert isinstance(source, ArraySource)
    assert seen == [{"site": "north", "year": "2024"}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cvs:/data/t.csv", f"--data 'cvs:/data/t.csv' is not a data source (did you mean csv:?); {FORMS}"),
        ("excel:/data/t.xlsx", f"--data 'excel:/data/t.xlsx' is not a data source; {FORMS}"),
        ("/data/t.xlsx", f"--data '/data/t.xlsx' is not a data source; {FORMS}"),
        ("/data/xray", f"--data '/data/xray' is not a data source; {FORMS}"),
        ("csv:", f"--data 'csv:' names no path; {FORMS}"),
        ("images:", f"--data 'images:' names no path; {FORMS}"),
    ],
)
def test_a_spec_of_no_accepted_form_lists_the_forms(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_source(spec, SourceOptions())
    assert str(caught.value) == message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        open_source(f"csv:{tmp_path}/absent.csv", SourceOptions(label_column="fraud"))
    assert str(caught.value) == f"{tmp_path}/absent.csv: no such file"


def test_a_path_under_home_is_expanded(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(files))
    assert len(open_source("csv:~/t.csv", SourceOptions(label_column="fraud"))) == 3


# load_data


def test_load_data_takes_specs_paths_frames_and_arrays(files: Path) -> None:
    assert isinstance(load_data(f"csv:{files}/t.csv", label_column="fraud"), TableSource)
    assert isinstance(load_data(files / "t.parquet", label_column="fraud"), TableSource)
    frame = pd.DataFrame({"age": [1, 2], "region": ["n", "s"], "fraud": ["no", "yes"]})
    table = load_data(frame, label_column="fraud", categorical_columns=["region"], min_group_size=1)
    assert table.schema().classes == ("no", "yes")
    assert [feature.type for feature in table.schema().features] == ["numeric", "categorical"]
    assert load_data(frame, label_column="fraud", feature_columns="age").schema().input_shape == (1,)
    x, y = np.zeros((4, 3)), np.array([0.5, 1.5, 2.5, 3.5])
    assert load_data((x, y)).schema().classes is None
    assert load_data((x, y), label_type="classes").schema().classes == ("0.5", "1.5", "2.5", "3.5")


def test_load_data_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SourceOptions] = []
    images = types.ModuleType("syncfed.data.images")
    images.ImageFolderSource = lambda root, options: seen.append(options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "syncfed.data.images", images)
    load_data("images:/data/xray", image_size=224, channels=1)
    load_data("images:/data/xray", image_size=[64, 32])
    assert [options.image_size for options in seen] == [(224, 224), (64, 32)]
    with pytest.raises(ConfigError) as caught:
        load_data("csv:t.csv", label="fraud")
    assert str(caught.value).startswith("load_data() has no option 'label'; the options are image_size, channels,")
    with pytest.raises(ConfigError, match="missing-value policy 'skip' is not one of error, mean, drop"):
        load_data("csv:t.csv", missing="skip")


def test_the_package_exports_the_api() -> None:
    assert set(syncfed.data.__all__) == {"SourceOptions", "Source", "open_source", "load_data"}


def test_importing_syncfed_data_imports_neither_pandas_nor_pillow() -> None:
    code = "import sys, syncfed, syncfed.data; print(sorted({'pandas', 'PIL', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_reading_a_table_needs_no_torch(files: Path) -> None:
    code = (
        "import sys; from syncfed.data import open_source, SourceOptions;"
        f" open_source('{files}/t.csv', SourceOptions(label_column='fraud')); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
