"""Image folders (``--data images:DIR``): one subfolder per class, read from disk a batch at a time.

The layout is torchvision's ImageFolder and the public chest X-ray sets'
(``train/NORMAL/a.jpeg``, ``train/PNEUMONIA/b.jpeg``): each subfolder of
``DIR`` is a class named after it, and every image below it, however deep, is
one of its examples.

- **Files.** ``.png .jpg .jpeg .bmp .tif .tiff`` (any case) are read with
  Pillow, ``.dcm`` with pydicom (``pip install 'syncfed[dicom]'``), imported on
  first use. A file without an extension is DICOM when it carries the DICOM
  preamble (``DICM`` at byte 128), as archives often write them. Entries whose
  name starts with a dot, ``__MACOSX``, ``Thumbs.db`` and ``desktop.ini`` are
  skipped silently; any other file (a ``.txt``, a ``.gif``) is ignored, and
  the count is logged once on the ``syncfed.data`` logger. A multi-page TIFF
  gives its first page; a multi-frame DICOM stops the start. Symbolic links
  to files are followed, links to folders below a class folder are not.
- **Values.** Every image becomes float32 in ``[0, 1]``: 8-bit modes (``1``,
  ``L``, ``LA``, ``P``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``...) divided by
  255, alpha dropped; 16-bit grayscale (``I;16``, ``I;16B``, and ``I`` when
  its values fit 16 bits) divided by 65535. A DICOM stored value ``s`` of
  ``BitsStored`` bits spans ``[lo, hi]`` (``[0, 2**bits - 1]``, or
  ``[-2**(bits-1), 2**(bits-1) - 1]`` when signed); its modality value
  ``RescaleSlope * s + RescaleIntercept`` is scaled over the modality values of
  that range, so it becomes ``(s - lo) / (hi - lo)``, or one minus that for a
  negative slope (the rescale is linear, so only its sign is left).
  ``MONOCHROME1`` (white is low) is then inverted, so 1 is bright everywhere.
- **Shape.** ``--channels`` turns colour into luminance (the ITU-R 601-2 weights
  of Pillow's ``L`` conversion, in float) or repeats gray three times;
  ``--image-size`` resizes on float (``F``) planes, so 16-bit depth survives:
  a shrink filters with Lanczos-3 (Pillow's ``LANCZOS``: of its filters, the
  one that best recovers an image enlarged before it was stored), and an
  enlargement interpolates bilinearly. Without them every image of the
  folder must have one size and one channel count.

Reading is checked at start-up: every image is opened and fully decoded once,
keeping nothing but its size and channels, so a corrupt file stops the
worker then with one line, never mid-round. The source then holds only the
relative paths (one byte buffer and offsets) and the labels, never pixels:
a folder of 100,000 images fits a small machine.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..datasets import Dataset, LazyInputs
from ..exceptions import DatasetError
from ..protocol.base import MAX_CLASSES, MAX_NAME
from ..protocol.data_messages import DataPlan, DataSchema
from .base import SourceOptions, standardize
from .labels import class_order, map_labels

__all__ = ["PILLOW_EXTENSIONS", "DICOM_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageFolderSource", "ImageFiles"]

#: Files read with Pillow, by lowercase extension.
PILLOW_EXTENSIONS: Final = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Files read with pydicom, by lowercase extension (and files without one that carry the DICOM preamble).
DICOM_EXTENSIONS: Final = (".dcm",)
#: The most pixels one image may have before it is decoded: a guard against decompression bombs
#: (an 8192 x 8192 image; a 3000 x 3000 X-ray is a seventh of it). Pillow's own guard, at twice
#: ``PIL.Image.MAX_IMAGE_PIXELS``, still stops larger files when a source allows more.
MAX_IMAGE_PIXELS: Final = 8192 * 8192

_HIDDEN: Final = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_PILLOW, _DICOM = 0, 1  # a file's reader, one byte per file
_LAYOUT: Final = "one subfolder of images per class, as DIR/<class>/<image>"

_GRAY_8BIT: Final = frozenset({"1", "L", "LA", "La"})
_COLOUR_8BIT: Final = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})
_GRAY_16BIT: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
#: What a DICOM file needs for this module to read it as one image.
_DICOM_IMAGE_KEYS: Final = ("Rows", "Columns", "PhotometricInterpretation", "BitsStored", "PixelData")
_EXPECTED_MODES: Final = "expected 8-bit grayscale or colour, or 16-bit grayscale"
#: ITU-R 601-2 luma, the weights of Pillow's ``L`` conversion.
_LUMA: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)

logger = logging.getLogger("syncfed.data")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _HIDDEN


def _reader(path: str) -> int | None:
    """Which library reads the file at ``path``; ``None`` for a file that is not an image."""
    extension = os.path.splitext(path)[1].lower()
    if extension in PILLOW_EXTENSIONS:
        return _PILLOW
    if extension in DICOM_EXTENSIONS:
        return _DICOM
    if not extension:
        try:
            with open(path, "rb") as file:
                return _DICOM if file.read(132)[128:] == b"DICM" else None
        except OSError:
            return None
    return None


def _reason(exc: BaseException) -> str:
    """An exception as one short line: Pillow and pydicom messages may span lines or repeat the path."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow recognises"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _pydicom(path: str) -> Any:
    """pydicom, imported on first use: only a folder of DICOM files needs the optional extra."""
    try:
        return importlib.import_module("pydicom")
    except ImportError:
        raise DatasetError(f"{path}: reading DICOM files needs pydicom: pip install 'syncfed[dicom]'") from None


def _check_pixels(path: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise DatasetError(
            f"{path}: image of {height}x{width} pixels (height x width) exceeds limit of {max_pixels} pixels"
        )


def _read_pillow(path: str, max_pixels: int | None) -> np.ndarray:
    with Image.open(path) as image:
        _check_pixels(path, image.width, image.height, max_pixels)
        image.load()
        mode = image.mode
        if mode in _GRAY_8BIT:
            return np.asarray(image.convert("L"), dtype=np.float32)[:, :, None] / 255
        if mode in _COLOUR_8BIT:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        if mode in _GRAY_16BIT:
            return np.asarray(image).astype(np.float32)[:, :, None] / 65535
        if mode == "I":  # 16-bit PNG and TIFF files may open as 32-bit integers
            low, high = image.getextrema()
            if 0 <= low and high <= 65535:  # type: ignore[operator]  # an I image's extrema are two ints
                return np.asarray(image).astype(np.float32)[:, :, None] / 65535
            mode = "I (32-bit values)"
    raise DatasetError(f"{path}: unsupported image mode {mode!r}; {_EXPECTED_MODES}")


def _read_dicom(path: str, max_pixels: int | None) -> np.ndarray:
    pydicom = _pydicom(path)
    try:
        dataset = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:  # its message suggests force=True, which is no help here
        raise DatasetError(f"{path}: cannot decode image: not a DICOM file") from None
    absent = [key for key in _DICOM_IMAGE_KEYS if key not in dataset]
    if absent:
        raise DatasetError(f"{path}: cannot decode image: DICOM file has no {absent[0]}")
    _check_pixels(path, int(dataset.Columns), int(dataset.Rows), max_pixels)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DatasetError(f"{path}: DICOM file holds {frames} frames; expected one image per file")
    photometric = str(dataset.PhotometricInterpretation)
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise DatasetError(f"{path}: unsupported image mode {photometric!r} (DICOM); {_EXPECTED_MODES}")
    stored: np.ndarray = dataset.pixel_array
    if stored.dtype.kind not in "iu":
        raise DatasetError(f"{path}: unsupported image mode '{photometric} {stored.dtype}' (DICOM); {_EXPECTED_MODES}")
    bits = int(dataset.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dataset.PixelRepresentation == 1 else (0, 2**bits - 1)
    values: np.ndarray = np.clip((stored.astype(np.float32) - low) / (high - low), 0, 1)
    if float(dataset.get("RescaleSlope", 1) or 1) < 0:
        values = 1 - values
    if photometric == "MONOCHROME1":
        values = 1 - values
    return values if values.ndim == 3 else values[:, :, None]


def _read(path: str, reader: int, max_pixels: int | None) -> np.ndarray:
    """The image at ``path`` as float32 ``(H, W, C)`` in ``[0, 1]``, ``C`` 1 or 3 as the file holds it.

    Raises:
        DatasetError: if it cannot be decoded, is too large or has a mode this module does not read.
    """
    try:
        return _read_dicom(path, max_pixels) if reader == _DICOM else _read_pillow(path, max_pixels)
    except DatasetError:
        raise
    except Exception as exc:  # Pillow and pydicom raise many types for a bad file; each ends in this line
        raise DatasetError(f"{path}: cannot decode image: {_reason(exc)}") from None


def _fit(pixels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``pixels`` (``(h, w, c)``) as ``shape`` (``(C, H, W)``): luminance or repeated gray, then resized."""
    channels, height, width = shape
    if pixels.shape[2] == 3 and channels == 1:
        pixels = (pixels @ _LUMA)[:, :, None]
    planes = pixels.transpose(2, 0, 1)
    if planes.shape[1:] != (height, width):
        shrink = planes.shape[1] >= height and planes.shape[2] >= width
        method = Image.Resampling.LANCZOS if shrink else Image.Resampling.BILINEAR
        planes = np.stack(
            [
                np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((width, height), method))
                for plane in planes
            ]
        )
    if planes.shape[0] != channels:
        planes = np.repeat(planes, channels, axis=0)
    return planes


@dataclass(frozen=True, eq=False)
class _Listing:
    """Every image file of a folder: relative paths in one byte buffer with end offsets, and a reader byte each."""

    root: Path
    names: bytes
    ends: np.ndarray  # int64, where each path ends in ``names``
    readers: np.ndarray  # uint8, _PILLOW or _DICOM

    def __len__(self) -> int:
        return len(self.ends)

    def name(self, index: int) -> str:
        """The path of image ``index`` relative to the root."""
        start = int(self.ends[index - 1]) if index else 0
        return os.fsdecode(self.names[start : int(self.ends[index])])

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.name(index))

    def read(self, index: int, max_pixels: int | None) -> np.ndarray:
        return _read(self.path(index), int(self.readers[index]), max_pixels)


class ImageFiles:
    """The :class:`~syncfed.datasets.LazyInputs` of an image folder: images decoded, shaped and standardised
    a batch at a time, from paths only."""

    def __init__(
        self,
        listing: _Listing,
        rows: np.ndarray,
        shape: tuple[int, int, int],
        plan: DataPlan,
        max_pixels: int | None,
        digest: str,
    ) -> None:
        self._listing = listing
        self._rows = rows
        self._shape = shape
        self._plan = plan
        self._max_pixels = max_pixels
        self._digest = digest

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._rows), *self._shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices``, in their order, as float32 ``(len(indices), C, H, W)``.

        Raises:
            DatasetError: if a file no longer decodes (it changed since start-up).
        """
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        batch = np.empty((len(rows), *self._shape), dtype=np.float32)
        for position, row in enumerate(rows.tolist()):
            batch[position] = _fit(self._listing.read(row, self._max_pixels), self._shape)
        return standardize(batch, self._plan)

    def subset(self, indices: np.ndarray) -> LazyInputs:
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        digest = hashlib.sha256(self._digest.encode() + np.ascontiguousarray(rows).tobytes()).hexdigest()[:32]
        return ImageFiles(self._listing, rows, self._shape, self._plan, self._max_pixels, digest)

    def fingerprint(self) -> str:
        return self._digest


def _list(root: Path) -> tuple[tuple[str, ...], _Listing, np.ndarray, tuple[int, str]]:
    """The class names, the image files of each class in order, their labels, and how many other files lie there
    with the first of them.

    Raises:
        DatasetError: if the folder is missing, has no class subfolders, or a class folder holds no images.
    """
    if not root.is_dir():
        raise DatasetError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; expected {_LAYOUT}")
    try:
        entries = [(entry.name, entry.is_dir()) for entry in os.scandir(root) if not _hidden(entry.name)]
    except OSError as exc:
        raise DatasetError(f"{root}: cannot read folder: {exc.strerror}") from None
    folders = [name for name, is_folder in entries if is_folder]
    loose = [os.path.join(root, name) for name, is_folder in entries if not is_folder]
    if not folders:
        raise DatasetError(f"{root}: found {len(loose)} files and no class subfolders; expected {_LAYOUT}")
    if len(folders) > MAX_CLASSES:
        raise DatasetError(f"{root}: {len(folders)} class folders exceed limit of {MAX_CLASSES}")
    for name in folders:
        _check_class_name(root / name)
    classes = class_order(folders)
    ignored, first_ignored = len(loose), loose[0] if loose else ""
    names, ends, readers, counts = bytearray(), array("q"), array("B"), []
    for name in classes:
        found = len(ends)
        for folder, subfolders, files in os.walk(root / name, onerror=_unreadable):
            subfolders[:] = sorted(entry for entry in subfolders if not _hidden(entry))
            for file in sorted(entry for entry in files if not _hidden(entry)):
                path = os.path.join(folder, file)
                reader = _reader(path)
                if reader is None:
                    ignored, first_ignored = ignored + 1, first_ignored or path
                    continue
                names += os.fsencode(os.path.relpath(path, root))
                ends.append(len(names))
                readers.append(reader)
        counts.append(len(ends) - found)
        if not counts[-1]:
            raise DatasetError(
                f"{root / name}: class folder holds no images ({', '.join(PILLOW_EXTENSIONS + DICOM_EXTENSIONS)}); "
                f"expected {_LAYOUT}"
            )
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    listing = _Listing(root, bytes(names), np.frombuffer(ends, dtype=np.int64), np.frombuffer(readers, dtype=np.uint8))
    return classes, listing, labels, (ignored, first_ignored)


def _check_class_name(folder: Path) -> None:
    """A class folder's name must be a class name the protocol carries: 1 to MAX_NAME characters of UTF-8."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"{folder}: a class folder's name must be UTF-8 text") from None
    if len(folder.name) > MAX_NAME:
        raise DatasetError(
            f"{folder}: a class folder's name of {len(folder.name)} characters exceeds limit of {MAX_NAME}"
        )


def _unreadable(exc: OSError) -> None:
    raise DatasetError(f"{exc.filename}: cannot read folder: {exc.strerror}")


class ImageFolderSource:
    """An image folder, listed and fully decoded once when built; see the module docstring for the rules.

    ``max_pixels`` (``None``: no limit) refuses larger images before they are
    decoded. Usage::

        source = ImageFolderSource(Path("xray/train"), SourceOptions(image_size=(224, 224), channels=1))
        data = source.prepare(plan)  # a Dataset whose images are read per batch

    Raises:
        DatasetError: one line naming the folder or file: a missing folder, no
            class subfolders, an empty class folder, an image that cannot be
            decoded, is too large or has an unsupported mode, and images of
            different sizes (without ``image_size``) or channels (without ``channels``).
    """

    name = "images"

    def __init__(
        self,
        root: str | os.PathLike[str],
        options: SourceOptions | None = None,
        *,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.options = options or SourceOptions()
        self.max_pixels = max_pixels
        self.classes, self._listing, self._labels, (ignored, example) = _list(self.root)
        if ignored:  # counted and named once: a user who meant them as images learns why they are missing
            logger.warning("%s: ignored files that are not images (%d), such as %s", self.root, ignored, example)
        self.input_shape, self._digest = self._check()

    def _check(self) -> tuple[tuple[int, int, int], str]:
        """Decode every image once; return the input shape and the fingerprint of paths, sizes, times and options."""
        digest = hashlib.sha256(repr((self.options.image_size, self.options.channels, self.classes)).encode())
        first: tuple[str, int, int, int] | None = None  # path, height, width, channels
        for index in range(len(self._listing)):
            path = self._listing.path(index)
            try:
                status = os.stat(path)
            except OSError as exc:
                raise DatasetError(f"{path}: cannot read image: {exc.strerror}") from None
            height, width, channels = self._listing.read(index, self.max_pixels).shape
            digest.update(f"{self._listing.name(index)}\0{status.st_size}\0{status.st_mtime_ns}\0".encode())
            if first is None:
                first = (path, height, width, channels)
                continue
            if self.options.image_size is None and (height, width) != first[1:3]:
                raise DatasetError(
                    f"{self.root}: images differ in size: {first[0]} is {first[1]}x{first[2]}, {path} is "
                    f"{height}x{width} (height x width); give them one size with --image-size"
                )
            if self.options.channels is None and channels != first[3]:
                raise DatasetError(
                    f"{self.root}: images differ in channels: {first[0]} has {first[3]}, {path} has {channels}; "
                    f"give them one count with --channels 1 or --channels 3"
                )
        assert first is not None  # _list found at least one image
        height, width = self.options.image_size or first[1:3]
        return (self.options.channels or first[3], height, width), "sha256:" + digest.hexdigest()[:16]

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def schema(self) -> DataSchema:
        return DataSchema("images", self.input_shape, self.classes)

    def prepare(self, plan: DataPlan) -> Dataset:
        """The images as ``plan`` says (see :meth:`syncfed.data.base.Source.prepare`), read per batch."""
        if plan.kind != "images":
            raise DatasetError(f"{self.root}: this worker holds images, the plan describes {plan.kind}")
        if plan.input_shape != self.input_shape:
            fix = ""
            if len(plan.input_shape) == 3:
                channels, height, width = plan.input_shape
                flags = [f"--channels {channels}"] if channels != self.input_shape[0] else []
                flags += [f"--image-size {height},{width}"] if (height, width) != self.input_shape[1:] else []
                fix = f"; start this worker with {' '.join(flags)}"
            raise DatasetError(
                f"{self.root}: images of shape {self.input_shape}, the plan's are {plan.input_shape}{fix}"
            )
        if plan.classes is None:
            raise DatasetError(f"{self.root}: this site's images have classes, the plan's label is continuous")
        labels = map_labels(self._labels, self.classes, plan.classes, str(self.root))
        rows = np.arange(len(self._listing), dtype=np.int64)
        digest = hashlib.sha256(f"{self._digest}\0{plan.digest()}".encode()).hexdigest()[:32]
        inputs = ImageFiles(self._listing, rows, self.input_shape, plan, self.max_pixels, digest)
        return Dataset(self.name, inputs, labels, plan.num_classes, plan.classes)

    def fingerprint(self) -> str:
        return self._digest
