"""Peak memory of a worker over an image folder of 2,000 and of 20,000 images: it must not grow with the folder.

Usage::

    .venv/bin/python scripts/bench_images.py                     # 2,000 and 20,000 PNGs of 64x64
    .venv/bin/python scripts/bench_images.py --size 32 --keep /tmp/folders

The folders hold scikit-learn's digits, upscaled with noise to ``--size``
pixels and written as PNG files in one subfolder per digit. Only a few
hundred distinct images are encoded; each is written under many names, so
writing 20,000 files takes seconds. For each folder the script starts a real
worker process (``--data images:DIR``; its start-up check decodes every
file), then asks it over its websocket, as a coordinator would, for one fit
of ``--batches`` batches of the ``cnn`` model and one evaluation of every
image, and reads the worker's peak resident memory (VmHWM) after start-up,
after the fit and at the end.

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's syncfed

#: Distinct images encoded; the folders repeat them under other names.
DISTINCT = 300


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


def _high_water(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


async def _drive(folder: Path, batches: int, batch_size: int) -> dict[str, float]:
    """Start a real worker over ``folder`` and ask it over its websocket what a coordinator asks: one fit of
    ``batches`` batches of the ``cnn`` model and one evaluation of every image; its peak memory after each step."""
    from syncfed.data.agreement import agree
    from syncfed.models import get_weights
    from syncfed.net.link import WorkerLink
    from syncfed.net.spawn import spawn_workers
    from syncfed.protocol import DataPlan, EvalResult, Evaluate, Fit, FitResult, Hello, Info, TrainingPlan
    from syncfed.shaped_models import shaped_factory

    arguments = ["--data", f"images:{folder}", "--val-fraction", "0", "--threads", "1"]
    started = time.perf_counter()
    async with spawn_workers([("bench", arguments)], startup_timeout=600.0) as processes:
        worker = processes["bench"]
        opened = time.perf_counter()
        after_start = _high_water(worker.process.pid)
        link = WorkerLink("bench", worker.uri, max_message_size=2**30, request_timeout=3600.0)
        await link.connect()
        try:
            info = await link.request(Hello())
            assert isinstance(info, Info) and info.schema is not None
            agreed = agree({"bench": info.schema})
            plan = DataPlan(agreed.kind, agreed.input_shape, agreed.classes, mean=(0.5,), std=(0.25,))
            weights = get_weights(shaped_factory("cnn", plan)())
            training = TrainingPlan(round=1, batch_size=batch_size, num_batches=batches, lr=0.05, seed=0)
            fitted = await link.request(Fit("cnn", weights, training, data=plan), timeout=3600.0)
            assert isinstance(fitted, FitResult)
            trained = time.perf_counter()
            after_fit = _high_water(worker.process.pid)
            scored = await link.request(Evaluate("cnn", fitted.weights, 256, data=plan), timeout=3600.0)
            assert isinstance(scored, EvalResult)
            evaluated = time.perf_counter()
            peak = _high_water(worker.process.pid)
        finally:
            await link.close()
    return {
        "images": scored.num_examples,
        "start_peak_bytes": after_start,
        "fit_peak_bytes": after_fit,
        "peak_bytes": peak,
        "open_s": opened - started,
        "train_s": trained - opened,
        "evaluate_s": evaluated - trained,
        "accuracy": scored.accuracy,
    }


def measure(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    import asyncio

    return asyncio.run(_drive(folder, args.batches, args.batch_size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--counts", default="2000,20000", help="folder sizes, comma-separated (default 2000,20000)")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--batches", type=int, default=20, help="training batches per run (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--max-ratio", type=float, default=1.10, help="largest allowed peak ratio (default 1.10)")
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them (default: a temporary one)")
    args = parser.parse_args(argv)
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
                f"worker peak {figures['peak_bytes'] / 1e6:.0f} MB"
                f" (after start-up {figures['start_peak_bytes'] / 1e6:.0f},"
                f" after the fit {figures['fit_peak_bytes'] / 1e6:.0f};"
                f" the images as float32 would take {held:.0f} MB);"
                f" start-up {figures['open_s']:.1f} s, "
                f"train {figures['train_s']:.1f} s, evaluate {figures['evaluate_s']:.1f} s, "
                f"accuracy after {args.batches} batches {figures['accuracy']:.2f}",
                flush=True,
            )
    ratio = rows[-1]["peak_bytes"] / rows[0]["peak_bytes"]
    print(f"worker peak ratio {counts[-1]:,} / {counts[0]:,} images: {ratio:.3f}; allowed {args.max_ratio:.2f}")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
