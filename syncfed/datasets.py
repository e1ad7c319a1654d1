"""Data sets a worker can hold: scikit-learn's digits (offline) and MNIST.

- ``digits``: the 1,797 8x8 images bundled with scikit-learn, split 80/20
  into train and test, stratified, with a fixed seed. Needs no download.
- ``mnist``: the standard IDX files in torchvision's layout,
  ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``,
  downloaded (through torchvision when it imports, else from the usual
  mirrors with checksums) when missing. Any number of images works.

Images become float32 arrays of shape ``(N, 1, H, W)``, normalised with the
data set's usual mean and standard deviation; labels become int64.

A worker may hold several of them under names of its own (its data-set
registry): ``--dataset-spec digits-train=digits:train`` is a
:class:`DatasetSpec`, as is a user's own data, ``--dataset-spec north=csv:claims.csv``
(``syncfed.data``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

import numpy as np

from .exceptions import ConfigError, DatasetError
from .partition import stratified_split

__all__ = [
    "DATASETS",
    "Dataset",
    "LazyInputs",
    "Rows",
    "DatasetSpec",
    "Split",
    "check_dataset_key",
    "load_dataset",
    "parse_dataset_spec",
    "ensure_mnist",
    "read_idx",
    "mnist_paths",
]

Split = Literal["train", "test"]
DATASETS: Final = ("digits", "mnist")

# Mean and standard deviation of the pixel values, scaled to [0, 1].
_DIGITS_MEAN, _DIGITS_STD = 0.3053, 0.3760
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081

_DIGITS_SPLIT_SEED: Final = 0

_MNIST_MIRRORS: Final = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
_MNIST_FILES: Final[dict[str, str]] = {  # file name -> md5 of the gzipped file
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: Rows a :class:`Rows` view copies at once to digest them.
_FINGERPRINT_ROWS: Final = 4096
_IDX_TYPES: Final[dict[int, str]] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@runtime_checkable
class LazyInputs(Protocol):
    """Inputs read from disk a batch at a time (an image folder), so a data set never holds them all.

    ``shape`` is ``(N, *input_shape)`` and ``dtype`` float32, as an array's;
    ``take`` reads the examples at ``indices`` (in their order) as one float32
    array; ``subset`` selects examples without reading them.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> np.ndarray: ...

    def subset(self, indices: np.ndarray) -> LazyInputs: ...

    def fingerprint(self) -> str: ...


class Rows:
    """Rows of an array in memory, in a given order, as :class:`LazyInputs`: a view that copies a batch at a time.

    A worker's training and validation splits of own data share the one
    array prepared for a plan this way, rather than each holding a copy.
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array = array
        self.rows = rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[self.rows[indices]])

    def subset(self, indices: np.ndarray) -> Rows:
        return Rows(self.array, self.rows[indices])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for start in range(0, len(self.rows), _FINGERPRINT_ROWS):
            digest.update(self.take(np.arange(start, min(start + _FINGERPRINT_ROWS, len(self)))).data)
        return digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """A worker's examples: inputs in memory or read per batch (:class:`LazyInputs`), and class labels.

    ``labels`` index ``classes`` when the data names its classes (a user's own
    data, after the federation agreed on them); the bundled data sets leave
    ``classes`` empty and their labels are the digits themselves.
    """

    name: str
    images: np.ndarray | LazyInputs  # float32, (N, *input_shape): (N, 1, H, W) for the bundled images
    labels: np.ndarray  # int64, (N,)
    num_classes: int = 10
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """The inputs of the examples at ``indices``, as one float32 array."""
        if isinstance(self.images, np.ndarray):
            return np.asarray(self.images[indices])
        return self.images.take(indices)

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Inputs and labels in order, ``size`` examples at a time: a pass that never holds lazy inputs whole."""
        for start in range(0, len(self), size):
            indices = np.arange(start, min(start + size, len(self)))
            yield self.batch(indices), self.labels[indices]

    def histogram(self) -> list[int]:
        """Examples per class; a continuous label (float labels) counts all examples as one."""
        if self.labels.dtype.kind == "f":
            return [len(self)]
        return [int(n) for n in np.bincount(self.labels, minlength=self.num_classes)]

    def subset(self, indices: np.ndarray) -> Dataset:
        images = self.images[indices] if isinstance(self.images, np.ndarray) else self.images.subset(indices)
        return Dataset(self.name, images, self.labels[indices], self.num_classes, self.classes)

    def fingerprint(self) -> str:
        """A digest of the examples, their order included: the version a worker advertises, never the data."""
        digest = hashlib.sha256(f"{self.name}\0{self.num_classes}\0{self.images.shape}\0".encode())
        if isinstance(self.images, np.ndarray):
            digest.update(np.ascontiguousarray(self.images, dtype=np.float32).data)
        else:
            digest.update(self.images.fingerprint().encode())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).data)
        if self.classes:
            digest.update("\0".join(self.classes).encode())
        return "sha256:" + digest.hexdigest()[:16]


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_dataset_key(key: str) -> None:
    """Raise ConfigError unless ``key`` can name a data set: 1 to 64 letters, digits, ``_``, ``.`` or ``-``."""
    if not _KEY.fullmatch(key):
        raise ConfigError(
            f"data set key {key!r} must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set a worker holds: a split of one of :data:`DATASETS`, or a user's own data
    (``source``, a ``--data`` spec such as ``csv:claims.csv``), under a key of its own.

    Own data has no split of its own: the worker's role decides (the evaluator's is its test set).

    Raises:
        ConfigError: if the key is invalid (see :func:`check_dataset_key`), the data set
            is unknown, the split is not train or test, or a spec names both kinds of data.
    """

    key: str
    dataset: str = ""
    split: Split = "train"
    source: str | None = None

    def __post_init__(self) -> None:
        check_dataset_key(self.key)
        if self.source is not None:
            if not self.source or self.dataset:
                raise ConfigError(f"data set {self.key} must name either a bundled data set or own data, not both")
            return
        if self.dataset not in DATASETS:
            raise ConfigError(f"data set {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.split not in ("train", "test"):
            raise ConfigError(f"split {self.split!r} of data set {self.key} is not train or test")


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse ``"digits-train=digits:train"`` (key, data set, split) or ``"north=csv:claims.csv"`` (key and
    a spec of the worker's own data, any that ``--data`` takes, a bare path included) into a :class:`DatasetSpec`.

    Raises:
        ConfigError: if it does not look like ``KEY=DATASET:SPLIT`` or ``KEY=SPEC`` or a part is invalid.
    """
    key, equals, rest = text.partition("=")
    dataset, colon, split = rest.partition(":")
    if not equals or not rest.strip() or (not colon and rest.strip() in DATASETS):
        raise ConfigError(
            f"data set spec {text!r} must look like digits-train=digits:train (KEY=DATASET:SPLIT)"
            " or north=csv:claims.csv (KEY=SPEC of own data)"
        )
    if dataset.strip() not in DATASETS or not colon:
        return DatasetSpec(key.strip(), source=rest.strip())
    return DatasetSpec(key.strip(), dataset.strip(), split.strip())  # type: ignore[arg-type]  # checked on construction


def load_dataset(
    name: str, split: Split, data_dir: str | os.PathLike[str] = "data", *, download: bool = True
) -> Dataset:
    """Load ``split`` of the named data set.

    Raises:
        DatasetError: if the name is unknown or the files cannot be read or fetched.
    """
    if name == "digits":
        return _load_digits(split)
    if name == "mnist":
        return _load_mnist(split, Path(data_dir), download=download)
    raise DatasetError(f"data set {name!r} is not one of {', '.join(DATASETS)}")


def _load_digits(split: Split) -> Dataset:
    images, labels = digits_arrays()
    train, test = stratified_split(labels, 0.2, _DIGITS_SPLIT_SEED)
    chosen = train if split == "train" else test
    normalized = (images[chosen] / 16.0 - _DIGITS_MEAN) / _DIGITS_STD
    return Dataset("digits", normalized[:, None].astype(np.float32), labels[chosen].astype(np.int64))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: 1,797 images of 8x8 pixels in 0-16 (float64), and their labels.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) without importing
    scikit-learn: 1.5 s with scipy, most of a worker's start after torch. Through ``load_digits`` where
    that file is not found.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = [] if spec is None or spec.submodule_search_locations is None else spec.submodule_search_locations
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def mnist_paths(split: Split, data_dir: Path) -> tuple[Path, Path]:
    """Base paths (without ``.gz``) of the image and label files of ``split``."""
    prefix = "train" if split == "train" else "t10k"
    raw = data_dir / "MNIST" / "raw"
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


def _existing(base: Path) -> Path | None:
    for path in (base, base.with_name(base.name + ".gz")):
        if path.is_file():
            return path
    return None


def ensure_mnist(data_dir: Path, *, download: bool = True) -> None:
    """Make sure both splits' IDX files are in ``data_dir``, downloading them if allowed.

    Raises:
        DatasetError: if files are missing and cannot be fetched, in one line
            saying where they were looked for and why the download failed.
    """
    bases = [*mnist_paths("train", data_dir), *mnist_paths("test", data_dir)]
    if any(_existing(base) is None for base in bases):
        where = bases[0].parent
        if not download:
            raise DatasetError(f"MNIST files not found in {where}; use --dataset digits to work offline")
        try:
            _download_mnist(data_dir)
        except Exception as exc:  # any failure to fetch ends in the same clear line
            raise DatasetError(
                f"MNIST files not found in {where} and the download failed ({exc}); "
                f"put the IDX files there, or use --dataset digits to work offline"
            ) from None


def _load_mnist(split: Split, data_dir: Path, *, download: bool) -> Dataset:
    ensure_mnist(data_dir, download=download)
    image_path, label_path = (_existing(base) for base in mnist_paths(split, data_dir))
    assert image_path is not None and label_path is not None
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{image_path} must hold 3-d images and {label_path} 1-d labels")
    if len(images) != len(labels):
        raise DatasetError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{label_path} holds labels outside 0..9")
    pixels = (images.astype(np.float32) / 255.0 - _MNIST_MEAN) / _MNIST_STD
    return Dataset("mnist", pixels[:, None], labels.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in ``.gz``).

    Raises:
        DatasetError: if the header or the size is wrong.
    """
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated in its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path} has {len(data)} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _download_mnist(data_dir: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except Exception:  # torchvision is optional and may fail to import beside CPU torch
        MNIST = None
    if MNIST is not None:
        for train in (True, False):
            MNIST(str(data_dir), train=train, download=True)
        return
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, md5 in _MNIST_FILES.items():
        target = raw / f"{name}.gz"
        if target.is_file() or (raw / name).is_file():
            continue
        errors = []
        for mirror in _MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + target.name, timeout=30) as response:
                    payload = response.read(100 * 2**20)
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
                continue
            if hashlib.md5(payload).hexdigest() != md5:
                errors.append(f"{mirror}: checksum mismatch for {target.name}")
                continue
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(payload)
            partial.replace(target)
            break
        else:
            raise DatasetError("; ".join(errors))
