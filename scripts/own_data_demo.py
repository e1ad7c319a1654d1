"""Write the "bring your own data" demo files from data bundled with scikit-learn (no download).

- ``breast_cancer/``: the 569 Wisconsin breast-cancer records as CSV files, one per
  "hospital", non-IID (each hospital sees a different share of malignant cases),
  plus ``test.csv`` for the evaluator. The label column is ``diagnosis``
  (``malignant`` or ``benign``); the 30 features keep scikit-learn's names.
- ``digits_png/``: the 1,797 8x8 digits as image folders, one subfolder per
  class, split like the classic demo (alice 0-3, bob 4-6, charlie 7-9, testing
  all), each site in its own size and format: alice 8x8 grayscale PNG, bob
  16x16 colour JPEG, charlie 32x32 grayscale BMP, testing 24x24 16-bit TIFF.
- ``diabetes/``: the 442 diabetes records (10 features in their raw units, the
  label ``progression``, a continuous measure of disease progression after one
  year) as three "clinics" cut by body-mass index (lowest third, middle,
  highest: their features and targets differ), plus ``test.csv``.

Usage::

    python scripts/own_data_demo.py --out demo-data

then the commands the README's "Bring your own data" section gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: Share of malignant records each hospital receives; the rest of its records are benign.
HOSPITALS = {"hospital_a": 0.7, "hospital_b": 0.35, "hospital_c": 0.1}
TEST_FRACTION = 0.2
SEED = 0

#: Image sites: (classes, size, Pillow mode, file extension). The mode "I;16" is written as 16-bit TIFF.
IMAGE_SITES = {
    "alice": (range(0, 4), 8, "L", "png"),
    "bob": (range(4, 7), 16, "RGB", "jpg"),
    "charlie": (range(7, 10), 32, "L", "bmp"),
    "testing": (range(0, 10), 24, "I;16", "tif"),
}


def write_breast_cancer(out: Path) -> dict[str, int]:
    """Split the records into a stratified test set and three hospitals of different malignant shares."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["diagnosis"] = [bunch.target_names[t] for t in bunch.target]
    train, test = train_test_split(frame, test_size=TEST_FRACTION, random_state=SEED, stratify=frame["diagnosis"])
    rng = np.random.default_rng(SEED)
    malignant = list(rng.permutation(train.index[train["diagnosis"] == "malignant"]))
    benign = list(rng.permutation(train.index[train["diagnosis"] == "benign"]))
    size = len(train) // len(HOSPITALS)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for number, (name, share) in enumerate(HOSPITALS.items()):
        last = number == len(HOSPITALS) - 1
        take_m = len(malignant) if last else min(round(size * share), len(malignant))
        take_b = len(benign) if last else size - take_m
        rows = malignant[:take_m] + benign[:take_b]
        del malignant[:take_m], benign[:take_b]
        part = train.loc[rows].sample(frac=1.0, random_state=SEED)
        part.to_csv(out / f"{name}.csv", index=False)
        counts[name] = len(part)
    test.to_csv(out / "test.csv", index=False)
    counts["test"] = len(test)
    return counts


#: The diabetes clinics, each the records of one third of the training records' body-mass index.
CLINICS = ("clinic_a", "clinic_b", "clinic_c")
DIABETES_LABEL = "progression"


def write_diabetes(out: Path) -> dict[str, int]:
    """Split the records into a random test set and three clinics by tertile of body-mass index."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    frame = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": DIABETES_LABEL})
    train, test = train_test_split(frame, test_size=TEST_FRACTION, random_state=SEED)
    ordered = train.sort_values("bmi", kind="stable")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in zip(CLINICS, np.array_split(np.arange(len(ordered)), len(CLINICS)), strict=True):
        ordered.iloc[part].sample(frac=1.0, random_state=SEED).to_csv(out / f"{name}.csv", index=False)
        counts[name] = len(part)
    test.to_csv(out / "test.csv", index=False)
    counts["test"] = len(test)
    return counts


def write_digits(out: Path, sites: Mapping[str, tuple[range, int, str, str]] = IMAGE_SITES) -> dict[str, int]:
    """Write each site's digits as ``<site>/<digit>/<index>.<ext>`` in its size and format (``sites``: as
    :data:`IMAGE_SITES`)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    indices = np.arange(len(bunch.target))
    train, test = train_test_split(indices, test_size=0.2, random_state=SEED, stratify=bunch.target)
    counts = {}
    for site, (classes, size, mode, extension) in sites.items():
        chosen = [i for i in (test if site == "testing" else train) if bunch.target[i] in classes]
        for index in chosen:
            pixels = bunch.images[index] / 16.0  # scikit-learn's digits are 0..16
            image = Image.fromarray((pixels * 255).round().astype(np.uint8), "L")
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            if mode == "RGB":
                image = image.convert("RGB")
            elif mode == "I;16":
                wide = np.asarray(image, dtype=np.uint16) * 257  # 0..255 -> 0..65535
                image = Image.fromarray(wide)  # uint16: Pillow makes it I;16
            folder = out / site / str(bunch.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.{extension}")
        counts[site] = len(chosen)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-data"), help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    tables = write_breast_cancer(args.out / "breast_cancer")
    images = write_digits(args.out / "digits_png")
    diabetes = write_diabetes(args.out / "diabetes")
    print(
        f"breast cancer CSV files in {args.out / 'breast_cancer'}: " + ", ".join(f"{k} {v}" for k, v in tables.items())
    )
    print(f"digit image folders in {args.out / 'digits_png'}: " + ", ".join(f"{k} {v}" for k, v in images.items()))
    print(f"diabetes CSV files in {args.out / 'diabetes'}: " + ", ".join(f"{k} {v}" for k, v in diabetes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
