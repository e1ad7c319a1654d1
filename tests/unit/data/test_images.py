"""Image folders: every format and mode read to the values an independent numpy computation gives, the shape
options, lazy reading, the plan, and each bad input's one line.

Every file is written by the test itself, with Pillow or pydicom, into ``tmp_path``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from syncfed.data.base import SourceOptions
from syncfed.data.images import ImageFolderSource
from syncfed.datasets import Dataset, LazyInputs
from syncfed.exceptions import DatasetError
from syncfed.protocol.data_messages import DataPlan

RNG = np.random.default_rng(16)
GRAY8 = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (12, 10), dtype=np.uint16)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
LUMA = np.array([0.299, 0.587, 0.114])


def save(path: Path, image: Image.Image | np.ndarray, **params: object) -> Path:
    """Write an image (a Pillow image or an array) to ``path``, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **params)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    slope: float | None = None,
    frames: int = 1,
) -> Path:
    """A DICOM Part 10 file (secondary capture, explicit VR little endian) holding ``pixels``."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        dataset.PlanarConfiguration = 0
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = int(pixels.dtype.kind == "i")
    if frames != 1:
        dataset.NumberOfFrames = frames
    if slope is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, -1024
    dataset.PixelData = pixels.tobytes() * frames
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def plan_for(
    source: ImageFolderSource,
    classes: tuple[str, ...] | None = None,
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
) -> DataPlan:
    """The plan a federation of this site alone agrees: its shape, its classes (or ``classes``), no statistics."""
    return DataPlan("images", source.input_shape, classes or source.classes, mean=mean, std=std)


def read_all(source: ImageFolderSource) -> np.ndarray:
    data = source.prepare(plan_for(source))
    return data.batch(np.arange(len(data)))


def chw(pixels: np.ndarray) -> np.ndarray:
    """An ``(H, W)`` or ``(H, W, C)`` array as ``(C, H, W)`` float64."""
    pixels = np.asarray(pixels, dtype=np.float64)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _lanczos(x: float) -> float:
    """Lanczos-3: sinc(x) sinc(x / 3) within three pixels."""
    return float(np.sinc(x) * np.sinc(x / 3)) if -3 <= x < 3 else 0.0


#: Pillow's filters as (support in pixels, kernel).
KERNELS = {"bilinear": (1.0, lambda x: max(0.0, 1 - abs(x))), "lanczos": (3.0, _lanczos)}


def resampled(values: np.ndarray, size: int, axis: int, kernel: str) -> np.ndarray:
    """Resampling along ``axis`` as Pillow computes it: the filter stretched by the scale when shrinking,
    its weights normalised over the pixels inside the image."""
    reach, weight = KERNELS[kernel]
    length = values.shape[axis]
    scale = length / size
    stretch = max(scale, 1.0)
    support = reach * stretch
    rows = np.zeros((size, length))
    for out in range(size):
        center = (out + 0.5) * scale
        for x in range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), length)):
            rows[out, x] = weight((x - center + 0.5) / stretch)
        rows[out] /= rows[out].sum()
    return np.moveaxis(np.tensordot(rows, np.moveaxis(values, axis, 0), axes=1), 0, axis)


def shrunk(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """``values`` shrunk to ``height x width`` with Lanczos-3, as a worker shrinks images."""
    return resampled(resampled(values, height, 0, "lanczos"), width, 1, "lanczos")


def palette_image() -> Image.Image:
    image = Image.frombytes("P", (10, 12), INDEX.tobytes())
    image.putpalette(PALETTE.tobytes())
    return image


#: (file name, writer, expected values (C, H, W)): each format and mode the module reads.
FORMATS: dict[str, tuple[str, Callable[[Path], object], np.ndarray]] = {
    "png gray": ("a.png", lambda p: save(p, GRAY8), chw(GRAY8) / 255),
    "png rgb": ("a.png", lambda p: save(p, RGB8), chw(RGB8) / 255),
    "png rgba": ("a.PNG", lambda p: save(p, np.dstack([RGB8, GRAY8])), chw(RGB8) / 255),
    "png palette": ("a.png", lambda p: save(p, palette_image()), chw(PALETTE[INDEX]) / 255),
    "png bilevel": ("a.png", lambda p: save(p, Image.fromarray(GRAY8 > 127)), chw(GRAY8 > 127)),
    "png 16-bit": ("a.png", lambda p: save(p, GRAY16), chw(GRAY16) / 65535),
    "bmp rgb": ("a.bmp", lambda p: save(p, RGB8), chw(RGB8) / 255),
    "tiff gray": ("a.tif", lambda p: save(p, GRAY8), chw(GRAY8) / 255),
    "tiff rgb": ("a.TIFF", lambda p: save(p, RGB8), chw(RGB8) / 255),
    "tiff 16-bit": ("a.tiff", lambda p: save(p, GRAY16), chw(GRAY16) / 65535),
    "tiff 32-bit integers within 16 bits": ("a.tiff", lambda p: save(p, GRAY16.astype(np.int32)), chw(GRAY16) / 65535),
    "dicom monochrome2 8-bit": ("a.dcm", lambda p: write_dicom(p, GRAY8), chw(GRAY8) / 255),
    "dicom monochrome2 16-bit": ("a.dcm", lambda p: write_dicom(p, GRAY16), chw(GRAY16) / 65535),
    "dicom monochrome1 12-bit": (
        "a.DCM",
        lambda p: write_dicom(p, GRAY16 >> 4, "MONOCHROME1", bits_stored=12),
        1 - chw(GRAY16 >> 4) / 4095,
    ),
    "dicom signed 16-bit": (
        "a.dcm",
        lambda p: write_dicom(p, (GRAY16.astype(np.int32) - 32768).astype(np.int16)),
        chw(GRAY16) / 65535,
    ),
    "dicom negative rescale slope": (
        "a.dcm",
        lambda p: write_dicom(p, GRAY16 >> 4, bits_stored=12, slope=-1.0),
        1 - chw(GRAY16 >> 4) / 4095,
    ),
    "dicom rgb": ("a.dcm", lambda p: write_dicom(p, RGB8, "RGB"), chw(RGB8) / 255),
    "dicom without extension": ("IM0001", lambda p: write_dicom(p, GRAY8), chw(GRAY8) / 255),
}


@pytest.mark.parametrize("case", FORMATS)
def test_each_format_reads_to_values_in_0_1(tmp_path: Path, case: str) -> None:
    name, write, expected = FORMATS[case]
    write(tmp_path / "cls" / name)
    source = ImageFolderSource(tmp_path)
    assert source.input_shape == expected.shape
    values = read_all(source)
    assert values.dtype == np.float32 and values.shape == (1, *expected.shape)
    np.testing.assert_allclose(values[0], expected, atol=1e-6)


def test_jpeg_decodes_close_to_what_was_written(tmp_path: Path) -> None:
    smooth = np.add.outer(np.arange(12), np.arange(10)).astype(np.uint8) * 10
    save(tmp_path / "cls" / "a.jpg", smooth, quality=95)
    save(tmp_path / "cls" / "b.JPEG", np.dstack([smooth] * 3), quality=95)
    values = read_all(ImageFolderSource(tmp_path, SourceOptions(channels=1)))
    np.testing.assert_allclose(values[:, 0], np.stack([smooth, smooth]) / 255, atol=0.03)


def test_images_below_a_class_folder_belong_to_it_and_classes_sort_as_numbers(tmp_path: Path) -> None:
    for name in ("10/a.png", "2/deeper/b.png", "2/c.png", "10/d.png"):
        save(tmp_path / name, GRAY8)
    source = ImageFolderSource(tmp_path)
    assert source.classes == ("2", "10")
    assert source.labels.tolist() == [0, 0, 1, 1]
    assert source.schema().classes == ("2", "10") and source.schema().kind == "images"
    assert len(source) == 4 and source.name == "images"


def test_hidden_entries_are_skipped_and_other_files_ignored_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path / "cls" / "a.png", GRAY8)
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._a.png"):
        (tmp_path / "cls" / name).write_bytes(b"junk")
    save(tmp_path / "__MACOSX" / "cls" / "a.png", GRAY8)
    save(tmp_path / ".hidden" / "a.png", GRAY8)
    (tmp_path / "cls" / "notes.txt").write_text("x")
    (tmp_path / "cls" / "b.gif").write_bytes(b"GIF89a")
    (tmp_path / "README").write_text("x")
    with caplog.at_level(logging.WARNING, logger="syncfed.data"):
        source = ImageFolderSource(tmp_path)
    assert source.classes == ("cls",) and len(source) == 1
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path}: ignored files that are not images (3), such as {tmp_path / 'README'}"
    ]


def test_mixed_sizes_stop_without_image_size_and_are_resized_with_it(tmp_path: Path) -> None:
    first = save(tmp_path / "a" / "x.png", GRAY8)
    second = save(tmp_path / "b" / "y.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: images differ in size: {first} is 12x10, {second} is 6x8 (height x width); "
        "give them one size with --image-size"
    )
    source = ImageFolderSource(tmp_path, SourceOptions(image_size=(6, 5)))
    assert source.input_shape == (1, 6, 5)
    values = read_all(source)
    np.testing.assert_allclose(values[0, 0], shrunk(GRAY8 / 255, 6, 5), atol=1e-6)
    np.testing.assert_allclose(values[1, 0], np.zeros((6, 5)))


def test_enlarging_interpolates_bilinearly(tmp_path: Path) -> None:
    save(tmp_path / "cls" / "small.png", GRAY8)
    enlarged = read_all(ImageFolderSource(tmp_path, SourceOptions(image_size=(24, 15))))[0, 0]
    expected = resampled(resampled(GRAY8 / 255, 24, 0, "bilinear"), 15, 1, "bilinear")
    np.testing.assert_allclose(enlarged, expected, atol=1e-6)


def test_resizing_16_bit_images_keeps_their_depth(tmp_path: Path) -> None:
    save(tmp_path / "cls" / "a.tiff", GRAY16)
    values = read_all(ImageFolderSource(tmp_path, SourceOptions(image_size=(5, 7))))
    np.testing.assert_allclose(values[0, 0], shrunk(GRAY16 / 65535, 5, 7), atol=1e-6)
    assert not np.allclose(values * 255, np.round(values * 255), atol=1e-3)  # not quantised to 8 bits


def test_mixed_channels_stop_without_channels_and_are_converted_with_it(tmp_path: Path) -> None:
    gray = save(tmp_path / "a" / "gray.png", GRAY8)
    colour = save(tmp_path / "b" / "colour.png", RGB8)
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: images differ in channels: {gray} has 1, {colour} has 3; "
        "give them one count with --channels 1 or --channels 3"
    )
    one = read_all(ImageFolderSource(tmp_path, SourceOptions(channels=1)))
    np.testing.assert_allclose(one[0, 0], GRAY8 / 255, atol=1e-6)
    np.testing.assert_allclose(one[1, 0], RGB8 @ LUMA / 255, atol=1e-5)
    three = read_all(ImageFolderSource(tmp_path, SourceOptions(channels=3)))
    np.testing.assert_allclose(three[0], np.stack([GRAY8 / 255] * 3), atol=1e-6)
    np.testing.assert_allclose(three[1], chw(RGB8) / 255, atol=1e-6)


def folder_of_four(root: Path) -> list[np.ndarray]:
    """Classes a (two images) and c (two), each image a different constant gray."""
    images = [np.full((4, 4), 40 * (i + 1), np.uint8) for i in range(4)]
    for name, image in zip(("a/0.png", "a/1.png", "c/2.png", "c/3.png"), images, strict=True):
        save(root / name, image)
    return [chw(image) / 255 for image in images]


def test_take_reads_the_examples_asked_in_their_order_and_subset_selects_without_reading(tmp_path: Path) -> None:
    expected = folder_of_four(tmp_path)
    source = ImageFolderSource(tmp_path)
    data = source.prepare(plan_for(source))
    assert isinstance(data.images, LazyInputs) and data.images.shape == (4, 1, 4, 4)
    np.testing.assert_allclose(data.batch(np.array([3, 0, 2])), np.stack([expected[3], expected[0], expected[2]]))
    part = data.subset(np.array([2, 1]))
    assert len(part) == 2 and part.labels.tolist() == [1, 0] and part.images.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(part.batch(np.array([1, 0])), np.stack([expected[1], expected[2]]))
    assert part.fingerprint() != data.fingerprint()
    (tmp_path / "a" / "0.png").unlink()  # selecting reads nothing; only reading that file would fail
    assert len(data.subset(np.array([1, 2]))) == 2


def test_prepare_maps_labels_to_the_plan_classes_and_standardises_per_channel(tmp_path: Path) -> None:
    expected = folder_of_four(tmp_path)
    source = ImageFolderSource(tmp_path, SourceOptions(channels=3))
    data = source.prepare(plan_for(source, classes=("a", "b", "c"), mean=(0.5, 0.25, 0.0), std=(0.5, 2.0, 1.0)))
    assert isinstance(data, Dataset)
    assert data.labels.tolist() == [0, 0, 2, 2] and data.num_classes == 3 and data.classes == ("a", "b", "c")
    assert data.histogram() == [2, 0, 2]
    values = data.batch(np.arange(4))
    for got, image in zip(values, expected, strict=True):
        np.testing.assert_allclose(got[0], (image[0] - 0.5) / 0.5, atol=1e-6)
        np.testing.assert_allclose(got[1], (image[0] - 0.25) / 2.0, atol=1e-6)
        np.testing.assert_allclose(got[2], image[0], atol=1e-6)


def test_prepare_refuses_a_plan_of_another_shape_kind_or_label(tmp_path: Path) -> None:
    save(tmp_path / "a" / "x.png", GRAY8)
    source = ImageFolderSource(tmp_path)
    wrong = DataPlan("images", (3, 64, 64), ("a",))
    with pytest.raises(DatasetError) as error:
        source.prepare(wrong)
    assert str(error.value) == (
        f"{tmp_path}: images of shape (1, 12, 10), the plan's are (3, 64, 64); "
        "start this worker with --channels 3 --image-size 64,64"
    )
    with pytest.raises(DatasetError) as error:
        source.prepare(DataPlan("images", (1, 8, 8), ("a",)))
    assert str(error.value).endswith("; start this worker with --image-size 8,8")
    with pytest.raises(DatasetError, match=r"this worker holds images, the plan describes arrays$"):
        source.prepare(DataPlan("arrays", (1, 12, 10), ("a",)))
    with pytest.raises(DatasetError, match=r"this site's images have classes, the plan's label is continuous$"):
        source.prepare(DataPlan("images", (1, 12, 10), None))
    with pytest.raises(DatasetError, match=r"class 'a' of this site is not among the agreed classes$"):
        source.prepare(DataPlan("images", (1, 12, 10), ("b",)))


def test_fingerprint_follows_paths_sizes_times_and_options_not_a_rescan(tmp_path: Path) -> None:
    path = save(tmp_path / "a" / "x.png", GRAY8)
    first = ImageFolderSource(tmp_path).fingerprint()
    assert ImageFolderSource(tmp_path).fingerprint() == first
    assert ImageFolderSource(tmp_path, SourceOptions(channels=3)).fingerprint() != first
    os.utime(path, ns=(0, 0))
    assert ImageFolderSource(tmp_path).fingerprint() != first


#: A 64x64 colour pattern: its files encode the same way every time, so a cut one fails the same way.
PATTERN = (np.add.outer(np.arange(64), np.arange(64))[:, :, None] * np.array([1, 3, 7])).astype(np.uint8)


def encoded(form: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PATTERN).save(buffer, form)
    return buffer.getvalue()


def bad_folder(root: Path, name: str, content: bytes) -> Path:
    save(root / "a" / "good.png", RGB8[:8, :8])
    path = root / "a" / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "not an image file Pillow recognises"),
        ("noise.jpg", bytes(range(256)), "not an image file Pillow recognises"),
        ("truncated.jpg", encoded("JPEG")[:-600], "image file is truncated (9 bytes not processed)"),
        ("truncated.png", encoded("PNG")[:-100], "image file is truncated"),
        ("truncated.tiff", encoded("TIFF")[:-100], "image file is truncated (92 bytes not processed)"),
        ("truncated.bmp", encoded("BMP")[:-100], "image file is truncated (92 bytes not processed)"),
    ],
)
def test_a_corrupt_or_truncated_image_stops_the_start(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = bad_folder(tmp_path, name, content)
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == f"{path}: cannot decode image: {reason}"


def test_a_corrupt_or_truncated_dicom_stops_the_start(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a" / "x.dcm", GRAY16)
    content = path.read_bytes()
    path.write_bytes(content[:-100])
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{path}: cannot decode image: The number of bytes of pixel data is less than expected (140 vs 240 bytes) "
        "- the dataset may be corrupted, have an invalid group 0028 element value, or the transfer syntax may be "
        "incorrect"
    )
    path.write_bytes(content[:-300])
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == f"{path}: cannot decode image: DICOM file has no Columns"
    path.write_bytes(bytes(300))
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == f"{path}: cannot decode image: not a DICOM file"


def test_an_image_of_an_unsupported_mode_stops_the_start(tmp_path: Path) -> None:
    path = save(tmp_path / "a" / "float.tiff", GRAY8.astype(np.float32))
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{path}: unsupported image mode 'F'; expected 8-bit grayscale or colour, or 16-bit grayscale"
    )
    path.unlink()
    path = save(tmp_path / "a" / "deep.tiff", np.full((4, 4), 70_000, np.int32))
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{path}: unsupported image mode 'I (32-bit values)'; expected 8-bit grayscale or colour, or 16-bit grayscale"
    )


def test_an_unsupported_dicom_stops_the_start(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a" / "palette.dcm", GRAY8, "PALETTE COLOR")
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{path}: unsupported image mode 'PALETTE COLOR' (DICOM); "
        "expected 8-bit grayscale or colour, or 16-bit grayscale"
    )
    path.unlink()
    path = write_dicom(tmp_path / "a" / "cine.dcm", GRAY8, frames=2)
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == f"{path}: DICOM file holds 2 frames; expected one image per file"


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = save(tmp_path / "a" / "big.png", GRAY8)
    dicom = write_dicom(tmp_path / "b" / "big.dcm", GRAY8)
    assert len(ImageFolderSource(tmp_path, max_pixels=120)) == 2  # at the limit
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path, max_pixels=119)
    assert str(error.value) == f"{path}: image of 12x10 pixels (height x width) exceeds limit of 119 pixels"
    path.unlink()
    path.parent.rmdir()
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path, max_pixels=119)
    assert str(error.value) == f"{dicom}: image of 12x10 pixels (height x width) exceeds limit of 119 pixels"


def test_an_empty_class_folder_stops_the_start(tmp_path: Path) -> None:
    save(tmp_path / "NORMAL" / "a.png", GRAY8)
    (tmp_path / "PNEUMONIA").mkdir()
    (tmp_path / "PNEUMONIA" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'PNEUMONIA'}: class folder holds no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .dcm); "
        "expected one subfolder of images per class, as DIR/<class>/<image>"
    )


def test_a_folder_without_class_subfolders_stops_the_start(tmp_path: Path) -> None:
    save(tmp_path / "a.png", GRAY8)
    save(tmp_path / "b.png", GRAY8)
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: found 2 files and no class subfolders; "
        "expected one subfolder of images per class, as DIR/<class>/<image>"
    )


def test_a_missing_folder_or_a_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path / "nowhere")
    assert str(error.value) == (
        f"{tmp_path / 'nowhere'}: no such folder; expected one subfolder of images per class, as DIR/<class>/<image>"
    )
    path = save(tmp_path / "a.png", GRAY8)
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(path)
    assert str(error.value) == (
        f"{path}: not a folder; expected one subfolder of images per class, as DIR/<class>/<image>"
    )


def test_a_dicom_folder_without_pydicom_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "a" / "x.dcm", GRAY8)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(DatasetError) as error:
        ImageFolderSource(tmp_path)
    assert str(error.value) == f"{path}: reading DICOM files needs pydicom: pip install 'syncfed[dicom]'"


def test_a_file_changed_after_start_up_fails_the_batch_with_one_line(tmp_path: Path) -> None:
    folder_of_four(tmp_path)
    source = ImageFolderSource(tmp_path)
    data = source.prepare(plan_for(source))
    (tmp_path / "c" / "3.png").write_bytes(b"gone")
    np.testing.assert_allclose(data.batch(np.array([0])).shape, (1, 1, 4, 4))
    with pytest.raises(DatasetError, match=r"3\.png: cannot decode image: not an image file Pillow recognises$"):
        data.batch(np.array([3]))
