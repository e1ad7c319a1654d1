"""Arrays from .npz files and from Python loaders: what they may return, and one line for each bad input."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from syncfed.data.arrays import ArraySource
from syncfed.data.base import SourceOptions
from syncfed.data.loaders import call_loader, read_npz, source_from
from syncfed.data.tables import TableSource
from syncfed.exceptions import DatasetError
from syncfed.protocol.data_messages import DataPlan, Feature

_NUMBERS = itertools.count()

#: A loader module's file: what each test writes before it asks for one of its functions.
Loader = Callable[[str], str]


@pytest.fixture
def loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Loader:
    """Write ``source`` as a new importable module; return its name, for ``name:function`` specs."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"site_loader_{next(_NUMBERS)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


def arrays(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % 2


# .npz files


def test_npz_round_trip_with_class_and_feature_names(tmp_path: Path) -> None:
    x, y = arrays()
    path = tmp_path / "site.npz"
    np.savez(path, x=x, y=y, classes=np.array(["healthy", "sick"]), feature_names=np.array(["a", "b", "c"]))
    source = read_npz(path, SourceOptions())
    assert isinstance(source, ArraySource)
    assert source.schema().classes == ("healthy", "sick")
    assert source.schema().features == (Feature("a"), Feature("b"), Feature("c"))
    dataset = source.prepare(DataPlan("arrays", (3,), ("healthy", "other", "sick"), ("c", "a", "b")))
    np.testing.assert_array_equal(dataset.images, x[:, [2, 0, 1]])
    assert dataset.labels.tolist() == [0, 2, 0, 2, 0, 2]


def test_npz_labels_become_class_names(tmp_path: Path) -> None:
    x, _ = arrays(4)
    np.savez(tmp_path / "site.npz", x=x, y=np.array(["b", "a", "b", "c"]))
    source = read_npz(tmp_path / "site.npz", SourceOptions())
    assert source.schema().classes == ("a", "b", "c")
    assert source.labels.tolist() == [1, 0, 1, 2]


def test_npz_without_x_names_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, inputs=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DatasetError) as caught:
        read_npz(path, SourceOptions())
    assert str(caught.value) == f"{path}: no array 'x'; the file holds 'inputs', 'y'"


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.array([{"label": 1}, {"label": 0}], dtype=object))
    with pytest.raises(DatasetError) as caught:
        read_npz(path, SourceOptions())
    assert str(caught.value) == (
        f"{path}: array 'y' holds Python objects, which a worker never unpickles; save numbers, and names as strings"
    )


def test_files_that_are_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DatasetError) as caught:
        read_npz(path, SourceOptions())
    assert str(caught.value).startswith(f"{path}: not an .npz file: ")
    assert "\n" not in str(caught.value)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DatasetError) as caught:
        read_npz(single, SourceOptions())
    assert str(caught.value) == f"{single}: one array, not an .npz file of arrays x and y (np.savez(path, x=x, y=y))"


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        read_npz(tmp_path / "absent.npz", SourceOptions())
    assert str(caught.value) == f"{tmp_path / 'absent.npz'}: no such file"


def test_npz_arrays_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(DatasetError) as caught:
        read_npz(path, SourceOptions())
    assert str(caught.value) == f"{path}: y must hold one label per example (3), not shape (2,)"


# Python loaders


def test_a_loader_gets_the_data_args_and_returns_arrays(loader: Loader) -> None:
    module = loader(
        """
        import numpy as np

        def load(site, rows="4"):
            x = np.full((int(rows), 2), 1.0 if site == "north" else 2.0)
            return x, np.array([0, 1] * (int(rows) // 2)), {"classes": ["no", "yes"], "feature_names": ["u", "v"]}
        """
    )
    source = call_loader(f"{module}:load", SourceOptions(data_args={"site": "north", "rows": "6"}))
    assert len(source) == 6
    assert source.schema().classes == ("no", "yes")
    assert source.schema().features == (Feature("u"), Feature("v"))
    assert source.prepare(DataPlan("arrays", (2,), ("no", "yes"))).images.max() == 1.0


def test_a_loader_that_raises_costs_one_line(loader: Loader) -> None:
    module = loader(
        """
        def load(site):
            raise ValueError(f"no such site {site!r}\\nsecond line")
        """
    )
    with pytest.raises(DatasetError) as caught:
        call_loader(f"{module}:load", SourceOptions(data_args={"site": "z"}))
    assert str(caught.value) == f"loader {module}:load failed: ValueError: no such site 'z'"
    with pytest.raises(DatasetError) as caught:
        call_loader(f"{module}:load", SourceOptions(data_args={"place": "z"}))
    assert str(caught.value).startswith(f"loader {module}:load failed: TypeError: load() got an unexpected keyword")


def test_a_loader_returning_wrong_shapes_costs_one_line(loader: Loader) -> None:
    module = loader(
        """
        import numpy as np

        def short_y():
            return np.zeros((10, 3)), np.zeros(9)

        def flat_x():
            return np.zeros(10), np.zeros(10)

        def text_x():
            return np.array([["a"]] * 2), np.zeros(2)

        def ragged():
            return [[1.0, 2.0], [3.0]], [0, 1]

        def listed():
            return [np.zeros((2, 2)), np.zeros(2)]

        def names():
            return np.zeros((2, 2)), np.zeros(2), {"classes": ["a"], "colour": "red"}
        """
    )
    expected = {
        "short_y": "y must hold one label per example (10), not shape (9,)",
        "flat_x": "x must hold at least one example of at least one value, not shape (10,)",
        "text_x": "x must hold numbers, not <U1 values",
        "ragged": "x is not an array: ",
        "listed": "list is not (x, y), (x, y, info), a pandas DataFrame or a torch Dataset",
        "names": "info must be a dict of optional classes and feature_names, not {'classes': ['a'], 'colour': 'red'}",
    }
    for function, message in expected.items():
        with pytest.raises(DatasetError) as caught:
            call_loader(f"{module}:{function}", SourceOptions())
        assert str(caught.value).startswith(f"loader {module}:{function}: {message}"), function
        assert "\n" not in str(caught.value)


def test_a_loader_that_cannot_be_found(loader: Loader) -> None:
    with pytest.raises(DatasetError) as caught:
        call_loader("no_such_package_here.data:load", SourceOptions())
    assert str(caught.value) == (
        "loader no_such_package_here.data:load: cannot import no_such_package_here.data:"
        " No module named 'no_such_package_here'"
    )
    module = loader("VALUE = 1\n")
    for attribute in ("load", "VALUE"):
        with pytest.raises(DatasetError) as caught:
            call_loader(f"{module}:{attribute}", SourceOptions())
        assert str(caught.value) == f"loader {module}:{attribute}: module {module} has no function {attribute!r}"
    broken = loader("raise RuntimeError('the module itself fails')\n")
    with pytest.raises(DatasetError) as caught:
        call_loader(f"{broken}:load", SourceOptions())
    assert str(caught.value) == f"loader {broken}:load failed: RuntimeError: the module itself fails"


def test_a_loader_returning_a_dataframe_is_a_table(loader: Loader) -> None:
    module = loader(
        """
        import pandas as pd

        def load():
            return pd.DataFrame({"age": [30, 40], "region": ["n", "s"], "fraud": [0, 1]})
        """
    )
    options = SourceOptions(label_column="fraud", categorical_columns=("region",), min_group_size=1)
    source = call_loader(f"{module}:load", options)
    assert isinstance(source, TableSource)
    assert source.schema().features == (Feature("age"), Feature("region", "categorical", ("n", "s")))
    with pytest.raises(DatasetError) as caught:
        call_loader(f"{module}:load", SourceOptions(label_column="fruad"))
    assert str(caught.value).startswith(f"loader {module}:load: no label column 'fruad' (did you mean 'fraud'?)")


TORCH_LOADERS = """
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

class Named(Dataset):
    classes = ["cat", "dog"]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i), requires_grad=True), i % 2

class Stream(IterableDataset):
    def __iter__(self):
        for i in range(3):
            yield torch.zeros(2), torch.tensor(i)

class Triples(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.zeros(2), 0, "extra"

class Ragged(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.zeros(2 + i), 0

class Failing(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise OSError(f"cannot read image {i}")

def named():
    return Named()

def stream():
    return Stream()

def tensors():
    return TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0.5, 1.5, 2.5]))

def triples():
    return Triples()

def ragged():
    return Ragged()

def failing():
    return Failing()
"""


def test_a_loader_returning_a_torch_dataset_is_read_into_arrays(loader: Loader) -> None:
    module = loader(TORCH_LOADERS)
    named = call_loader(f"{module}:named", SourceOptions())
    assert named.schema().input_shape == (1, 2, 2)
    assert named.schema().classes == ("cat", "dog")
    assert named.labels.tolist() == [0, 1, 0, 1]
    assert named.prepare(DataPlan("arrays", (1, 2, 2), ("cat", "dog"))).images[3].tolist() == [[[3.0, 3.0], [3.0, 3.0]]]
    stream = call_loader(f"{module}:stream", SourceOptions())
    assert stream.schema().classes == ("0", "1", "2")
    regression = call_loader(f"{module}:tensors", SourceOptions())
    assert regression.schema().classes is None
    assert regression.labels.tolist() == [0.5, 1.5, 2.5]


def test_a_torch_dataset_of_bad_items_costs_one_line(loader: Loader) -> None:
    module = loader(TORCH_LOADERS)
    expected = {
        "triples": f"loader {module}:triples: item 0 is a tuple, not an (input, label) pair",
        "ragged": f"loader {module}:ragged: item 1's input has shape (3,), item 0's (2,)",
        "failing": f"loader {module}:failing failed: OSError: cannot read image 0",
    }
    for function, message in expected.items():
        with pytest.raises(DatasetError) as caught:
            call_loader(f"{module}:{function}", SourceOptions())
        assert str(caught.value) == message


# Data a notebook holds


def test_source_from_arrays_a_dataframe_and_other_values() -> None:
    x, y = arrays()
    assert isinstance(source_from((x, y), SourceOptions()), ArraySource)
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": ["u", "v"]})
    table = source_from(frame, SourceOptions(label_column="y"))
    assert isinstance(table, TableSource)
    assert table.where == "DataFrame"
    with pytest.raises(DatasetError) as caught:
        source_from({"x": x}, SourceOptions())
    assert str(caught.value) == "arrays: dict is not (x, y), (x, y, info), a pandas DataFrame or a torch Dataset"


def test_class_names_the_wire_cannot_carry_stop_the_start(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.array([0, 1]), classes=np.array(["a", "a"]))
    with pytest.raises(DatasetError) as caught:
        read_npz(path, SourceOptions())
    assert str(caught.value) == f"{path}: classes must be distinct"
