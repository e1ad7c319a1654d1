"""bench.py's time-to-accuracy section reads the coordinator's console lines and draws its curves.

The section itself runs the demo for minutes (``bench.py --only accuracy``);
here only what ties it to the coordinator's output is checked, cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from programs import script_module

from syncfed.coordinator.evaluation import score_line
from syncfed.protocol import EvalResult


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with script_module("bench") as module:
        yield module


@pytest.mark.parametrize("step", ["round", "version"])
def test_an_evaluation_heading_gives_its_round_in_either_mode(bench: ModuleType, step: str) -> None:
    match = bench._EVALUATION.match(f"Evaluation at {step} 17/80:")
    assert match is not None and match.group(1) == "17"


def test_the_federated_score_line_gives_its_accuracy(bench: ModuleType) -> None:
    reply = EvalResult(0.1234, 343, 360, (36,) * 10)
    match = bench._FEDERATED.match(f"Federated model: {score_line(reply)}")
    assert match is not None and (match.group(1), match.group(2)) == ("343", "360")
    assert bench._FEDERATED.match(f"Model update alice: {score_line(reply)}") is None


def test_the_curves_are_drawn_whether_or_not_a_mode_reached_the_target(bench: ModuleType, tmp_path: Path) -> None:
    rows = [
        {"mode": "sync", "points": [(1, 9.0, 0.5), (2, 9.6, 0.96)], "reached_round": 2, "reached_s": 9.6},
        {"mode": "async", "points": [(1, 9.5, 0.3)], "reached_round": None, "reached_s": None},
    ]
    bench.plot_accuracy(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
