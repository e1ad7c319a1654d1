"""Peak memory of a worker over an image folder of 2,000 and of 20,000 images: it must not grow with the folder.

Usage::

    .venv/bin/python scripts/bench_images.py                     # 2,000 and 20,000 PNGs of 64x64
    .venv/bin/python scripts/bench_images.py --size 32 --keep /tmp/folders

The folders hold scikit-learn's digits, upscaled with noise to ``--size``
pixels and written as PNG files in one subfolder per digit. Only a few
hundred distinct images are encoded; each is written under many names, so
writing 20,000 files takes seconds. For each folder a fresh process (this
script with ``--child``) does what a worker does: it opens the folder (the
start-up check decodes every file), prepares it for a plan, trains
``--batches`` batches of the ``cnn`` shaped model and evaluates on every
image, then reports its peak resident memory (``ru_maxrss``) and the same
figure after its imports, before any image was read.

The source holds paths and labels only and decodes images a batch at a
time, so both processes peak alike: what they hold above their imports is
torch's training and evaluation, which varies by a few tens of MB from run to
run. The script exits with status 1 when the larger folder's peak exceeds the
smaller's by more than ``--max-ratio``.
MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's syncfed, in the child too

#: Distinct images encoded; the folders repeat them under other names.
DISTINCT = 300


def peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def encoded_digits(size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``DISTINCT`` digits as (class name, PNG bytes): upscaled to ``size`` pixels with Gaussian noise."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    encoded = []
    for index in rng.choice(len(digits.images), DISTINCT, replace=False):
        small = Image.fromarray((digits.images[index] * 255 / 16).astype(np.float32))
        pixels = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))
        noisy = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "PNG")
        encoded.append((str(digits.target[index]), buffer.getvalue()))
    return encoded


def write_folder(root: Path, count: int, encoded: list[tuple[str, bytes]]) -> None:
    """``count`` PNG files under ``root/<digit>/``, cycling through the encoded images."""
    for name in {label for label, _ in encoded}:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label, data = encoded[index % len(encoded)]
        (root / label / f"{index:06d}.png").write_bytes(data)


def child(folder: Path, batches: int, batch_size: int) -> None:
    """Run as a worker would over ``folder`` and print one JSON line of figures."""
    import torch

    from syncfed.data.images import ImageFolderSource
    from syncfed.protocol import TrainingPlan
    from syncfed.protocol.data_messages import DataPlan
    from syncfed.shaped_models import shaped_factory
    from syncfed.training import evaluate, train

    baseline = peak_bytes()
    started = time.perf_counter()
    source = ImageFolderSource(folder)
    opened = time.perf_counter()
    plan = DataPlan("images", source.input_shape, source.classes, mean=(0.5,), std=(0.25,))
    data = source.prepare(plan)
    model = shaped_factory("cnn", plan)()
    training = TrainingPlan(round=1, batch_size=batch_size, num_batches=batches, lr=0.05, seed=0)
    result = train(model, data, training, torch.device("cpu"))
    trained = time.perf_counter()
    outcome = evaluate(model, data, 256, torch.device("cpu"))
    evaluated = time.perf_counter()
    figures = {
        "images": len(source),
        "input_shape": list(source.input_shape),
        "baseline_bytes": baseline,
        "peak_bytes": peak_bytes(),
        "open_s": opened - started,
        "train_s": trained - opened,
        "evaluate_s": evaluated - trained,
        "loss": result.loss,
        "accuracy": outcome.correct / outcome.num_examples,
    }
    print(json.dumps(figures))


def measure(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(folder), "--batches", str(args.batches)]
    command += ["--batch-size", str(args.batch_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--counts", default="2000,20000", help="folder sizes, comma-separated (default 2000,20000)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--batches", type=int, default=20, help="training batches per run (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--max-ratio", type=float, default=1.10, help="largest allowed peak ratio (default 1.10)")
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them (default: a temporary one)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.batches, args.batch_size)
        return 0
    counts = [int(count) for count in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        base = args.keep or Path(temporary)
        encoded = encoded_digits(args.size)
        rows = []
        for count in counts:
            folder = base / f"digits-{count}"
            started = time.perf_counter()
            write_folder(folder, count, encoded)
            written = time.perf_counter() - started
            figures = measure(folder, args)
            rows.append(figures)
            held = count * args.size * args.size * 4 / 1e6
            print(
                f"{count:>7,} images of {args.size}x{args.size} (written in {written:.1f} s): "
                f"peak {figures['peak_bytes'] / 1e6:.0f} MB, after imports {figures['baseline_bytes'] / 1e6:.0f} MB "
                f"(the images as float32 would take {held:.0f} MB); open {figures['open_s']:.1f} s, "
                f"train {figures['train_s']:.1f} s, evaluate {figures['evaluate_s']:.1f} s, "
                f"accuracy after {args.batches} batches {figures['accuracy']:.2f}",
                flush=True,
            )
    ratio = rows[-1]["peak_bytes"] / rows[0]["peak_bytes"]
    growth = (rows[-1]["peak_bytes"] - rows[-1]["baseline_bytes"]) / max(
        rows[0]["peak_bytes"] - rows[0]["baseline_bytes"], 1
    )
    print(
        f"peak ratio {counts[-1]:,} / {counts[0]:,} images: {ratio:.3f} "
        f"(growth over the imports: {growth:.2f}x); allowed {args.max_ratio:.2f}"
    )
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
