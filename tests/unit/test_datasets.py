"""Data sets: digits offline, MNIST from IDX files written by the tests themselves.

Nothing here touches the network: MNIST downloads are either off or made to fail.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from syncfed.datasets import DATASETS, Dataset, digits_arrays, load_dataset, mnist_paths, read_idx
from syncfed.exceptions import DatasetError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: two zero bytes, a type code, the number of dimensions, sizes, data."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, codes[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(
    root: Path, *, n_train: int = 7, n_test: int = 3, gz: bool = False, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny MNIST in torchvision's layout; return what was written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        image_path, label_path = mnist_paths(split, root)  # type: ignore[arg-type]
        write_idx(image_path, images, gz=gz)
        write_idx(label_path, labels, gz=gz)
        written[split] = (images, labels)
    return written


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


# digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, Dataset]:
    return {split: load_dataset("digits", split) for split in ("train", "test")}


def test_digits_sizes(digits: dict[str, Dataset]) -> None:
    assert len(digits["train"]) == 1437
    assert len(digits["test"]) == 360
    assert len(digits["train"]) + len(digits["test"]) == 1797


def test_digits_arrays(digits: dict[str, Dataset]) -> None:
    for split, n in (("train", 1437), ("test", 360)):
        data = digits[split]
        assert data.name == "digits"
        assert data.images.dtype == np.float32 and data.images.shape == (n, 1, 8, 8)
        assert data.labels.dtype == np.int64 and data.labels.shape == (n,)
        assert data.input_shape == (1, 8, 8)
        assert data.num_classes == 10
        assert np.isfinite(data.images).all()


def test_digits_stratified(digits: dict[str, Dataset]) -> None:
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    train, test = (np.array(digits[s].histogram()) for s in ("train", "test"))
    assert (train > 0).all() and (test > 0).all()
    np.testing.assert_array_equal(train + test, full)
    # Stratified: each class's share of the test set is about its share overall.
    np.testing.assert_allclose(test / test.sum(), full / full.sum(), atol=0.01)


def test_digits_are_the_normalised_scikit_learn_images(digits: dict[str, Dataset]) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16
    expected = np.sort(((raw / 16.0 - 0.3053) / 0.3760).reshape(len(raw), -1), axis=0)
    ours = np.concatenate([digits["train"].images, digits["test"].images]).reshape(len(raw), -1)
    # The same images, split: compare column-wise sorted pixel values.
    np.testing.assert_allclose(np.sort(ours, axis=0), expected, rtol=1e-6, atol=1e-6)


def test_digits_are_scikit_learns_own_stratified_split(digits: dict[str, Dataset]) -> None:
    """Exactly what the demo trained on when it called scikit-learn: its images, split by train_test_split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    normalized = ((bunch.images / 16.0 - 0.3053) / 0.3760)[:, None].astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        normalized, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        np.testing.assert_array_equal(digits[split].images, images)
        np.testing.assert_array_equal(digits[split].labels, labels)


def test_digits_load_without_importing_scikit_learn() -> None:
    loaded = "sorted(name for name in sys.modules if name.startswith('sklearn.'))"
    code = f"import sys; from syncfed.datasets import load_dataset; load_dataset('digits', 'train'); print({loaded})"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "[]"


def test_digits_arrays_fall_back_to_load_digits_where_the_file_is_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    again, again_labels = digits_arrays()
    bunch = load_digits()
    for got, expected in (
        (images, bunch.images),
        (again, bunch.images),
        (labels, bunch.target),
        (again_labels, bunch.target),
    ):
        np.testing.assert_array_equal(got, expected)
    assert labels.dtype == again_labels.dtype == np.int64


def test_digits_deterministic(digits: dict[str, Dataset]) -> None:
    again = load_dataset("digits", "train")
    np.testing.assert_array_equal(again.images, digits["train"].images)
    np.testing.assert_array_equal(again.labels, digits["train"].labels)


def test_digits_ignores_data_dir_and_needs_no_files(tmp_path: Path) -> None:
    data = load_dataset("digits", "test", tmp_path / "nowhere", download=False)
    assert len(data) == 360
    assert not (tmp_path / "nowhere").exists()


def test_unknown_data_set() -> None:
    assert DATASETS == ("digits", "mnist")
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", "train")
    assert str(info.value) == "data set 'cifar10' is not one of digits, mnist"


def test_subset_and_histogram() -> None:
    images = np.zeros((5, 1, 2, 2), dtype=np.float32)
    labels = np.array([0, 2, 2, 9, 0], dtype=np.int64)
    data = Dataset("x", images, labels)
    assert data.histogram() == [2, 0, 2, 0, 0, 0, 0, 0, 0, 1]
    part = data.subset(np.array([1, 3]))
    assert part.labels.tolist() == [2, 9] and len(part) == 2 and part.name == "x"


# MNIST from IDX files -----------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    written = write_mnist(tmp_path, n_train=7, n_test=3, gz=gz)
    for split, n in (("train", 7), ("test", 3)):
        data = load_dataset("mnist", split, tmp_path, download=False)
        images, labels = written[split]
        assert data.name == "mnist"
        assert data.images.dtype == np.float32 and data.images.shape == (n, 1, 28, 28)
        assert data.labels.dtype == np.int64
        np.testing.assert_array_equal(data.labels, labels.astype(np.int64))
        expected = (images.astype(np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
        np.testing.assert_allclose(data.images[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_mnist_accepts_string_data_dir_and_mixed_compression(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)  # the training split; the test split is replaced below
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3], dtype=np.uint8)
    image_path, label_path = mnist_paths("test", tmp_path)
    write_idx(image_path, images, gz=True)
    label_path.with_name(label_path.name + ".gz").unlink()
    write_idx(label_path, labels, gz=False)
    data = load_dataset("mnist", "test", str(tmp_path), download=False)
    assert data.labels.tolist() == [0, 9, 3, 3]
    assert data.histogram() == [1, 0, 0, 2, 0, 0, 0, 0, 0, 1]


def test_mnist_with_zero_images(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=0, n_test=0)
    data = load_dataset("mnist", "train", tmp_path, download=False)
    assert data.images.shape == (0, 1, 28, 28) and len(data) == 0


def test_mnist_paths_follow_torchvision_layout(tmp_path: Path) -> None:
    assert mnist_paths("train", tmp_path) == (
        tmp_path / "MNIST/raw/train-images-idx3-ubyte",
        tmp_path / "MNIST/raw/train-labels-idx1-ubyte",
    )
    assert mnist_paths("test", tmp_path)[1] == tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte"


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 7], dtype=np.int8),
        np.array([[-300, 2], [5, 70]], dtype=np.int16),
        np.array([2**30, -1], dtype=np.int32),
        np.zeros((0, 5), dtype=np.uint8),
    ],
)
def test_read_idx_types(tmp_path: Path, array: np.ndarray) -> None:
    path = write_idx(tmp_path / "x-idx", array)
    result = read_idx(path)
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_read_idx_gz(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "y", array, gz=True)), array)


@pytest.mark.parametrize(
    "header",
    [b"\x00\x01\x08\x01", b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x0a\x01", b"PK\x03\x04", b"\x00\x00"],
)
def test_bad_magic(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(header + struct.pack(">I", 3) + b"\x01\x02\x03")
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(info.value) == f"{path} is not an IDX file (bad magic number)"


def test_truncated_and_overlong_data(tmp_path: Path) -> None:
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    short, long = tmp_path / "short", tmp_path / "long"
    short.write_bytes(good[:-1])
    long.write_bytes(good + b"\x00")
    with pytest.raises(DatasetError) as info:
        read_idx(short)
    assert str(info.value) == f"{short} has {len(good) - 1} bytes, its header says {len(good)}"
    with pytest.raises(DatasetError, match="its header says"):
        read_idx(long)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "header"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))  # says 3 sizes, gives 1
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(info.value) == f"{path} is truncated in its header"


def test_truncated_gz(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "z", np.arange(1000, dtype=np.int32), gz=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(path)


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.arange(3, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(path)


# Regression test for a bug once in syncfed/datasets.py, read_idx.
def test_corrupt_gz_stream(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "c", np.arange(1000, dtype=np.int32), gz=True)
    data = bytearray(path.read_bytes())
    for i in range(12, len(data) - 8):  # keep the 10-byte header and the 8-byte trailer
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(path)


def test_truncated_mnist_file_fails_the_load(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    image_path, _ = mnist_paths("train", tmp_path)
    image_path.write_bytes(image_path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="its header says"):
        load_dataset("mnist", "train", tmp_path, download=False)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)  # both splits, then the training split is replaced
    image_path, label_path = mnist_paths("train", tmp_path)
    write_idx(image_path, np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(label_path, np.zeros(2, dtype=np.uint8))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", "train", tmp_path, download=False)
    assert str(info.value) == f"{image_path} holds 3 images but {label_path} holds 2 labels"


def test_mnist_labels_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path)  # both splits, then the training split is replaced
    image_path, label_path = mnist_paths("train", tmp_path)
    write_idx(image_path, np.zeros((2, 28, 28), dtype=np.uint8))
    write_idx(label_path, np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DatasetError, match="labels outside 0..9"):
        load_dataset("mnist", "train", tmp_path, download=False)


def test_mnist_wrong_dimensions(tmp_path: Path) -> None:
    write_mnist(tmp_path)  # both splits, then the training split is replaced
    image_path, label_path = mnist_paths("train", tmp_path)
    write_idx(image_path, np.zeros((2, 784), dtype=np.uint8))
    write_idx(label_path, np.array([3, 1], dtype=np.uint8))
    with pytest.raises(DatasetError, match="must hold 3-d images"):
        load_dataset("mnist", "train", tmp_path, download=False)


@pytest.mark.parametrize("present", [(), ("images",), ("labels",)])
def test_missing_files_without_download(tmp_path: Path, present: tuple[str, ...]) -> None:
    image_path, label_path = mnist_paths("test", tmp_path)
    if "images" in present:
        write_idx(image_path, np.zeros((1, 28, 28), dtype=np.uint8))
    if "labels" in present:
        write_idx(label_path, np.zeros(1, dtype=np.uint8))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", "test", tmp_path, download=False)
    message = str(info.value)
    assert message == f"MNIST files not found in {raw_dir(tmp_path)}; use --dataset digits to work offline"
    assert str(raw_dir(tmp_path)) in message and "--dataset digits" in message


def test_failed_download_gives_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> object:
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # force the plain-urllib path
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", "train", tmp_path, download=True)
    message = str(info.value)
    assert calls, "the download was not attempted through urllib"
    assert all(url.endswith("-ubyte.gz") for url in calls)
    assert message.startswith(f"MNIST files not found in {raw_dir(tmp_path)} and the download failed (")
    assert "network is unreachable" in message
    assert message.endswith("); put the IDX files there, or use --dataset digits to work offline")
    assert "\n" not in message
    assert not list(raw_dir(tmp_path).glob("*.gz"))
