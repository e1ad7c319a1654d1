"""Update compression and streamed messages in real runs over real worker processes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from conftest import config, run

from syncfed.coordinator import Coordinator
from syncfed.net.spawn import WorkerProcess


def rounds(metrics: Path) -> list[dict]:  # type: ignore[type-arg]
    return [event for line in metrics.read_text().splitlines() if (event := json.loads(line))["event"] == "round"]


def test_compressed_updates_cut_the_bytes_and_report_their_error(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    base = config(digits_workers, training_rounds=3, eval_every=2)
    received: dict[str, int] = {}
    finals = {}
    for method in ("none", "fp16", "int8"):
        metrics = tmp_path / f"{method}.jsonl"
        result = run(Coordinator(replace(base, compress=method, metrics_out=metrics), report=lambda _: None).run())
        events = rounds(metrics)
        received[method] = sum(event["bytes_received"] for event in events)
        finals[method] = result.accuracy(3)
        errors = [error for event in events for error in event.get("compression_error", {}).values()]
        if method == "none":
            assert errors == []
        else:
            assert len(errors) == 9 and all(0 < error < (1e-3 if method == "fp16" else 5e-2) for error in errors)
        assert all(np.all(np.isfinite(array)) for array in result.weights.values())
    print(f"\nbytes received over 3 rounds: {received}; accuracy at round 3: {finals}")
    # float32 -> 2 bytes (fp16) or 1 byte (int8) per parameter, plus framing.
    assert received["fp16"] < 0.55 * received["none"]
    assert received["int8"] < 0.3 * received["none"]
    assert abs(finals["fp16"] - finals["none"]) < 0.05


def test_a_run_streams_every_message_in_small_fragments(digits_workers: dict[str, WorkerProcess]) -> None:
    """With 64 KiB fragments every 2.4 MB fit request is streamed; the result is the same bits."""
    base = config(digits_workers, evaluator=False, training_rounds=2)
    whole = run(Coordinator(base, report=lambda _: None).run())
    streamed = run(Coordinator(replace(base, chunk_size=64 * 2**10), report=lambda _: None).run())
    for name, array in whole.weights.items():
        np.testing.assert_array_equal(streamed.weights[name], array, err_msg=name)
