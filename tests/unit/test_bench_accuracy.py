"""bench.py's time-to-accuracy section reads the coordinator's console lines and draws its curves.

The section (``scripts/benchkit/accuracy.py``) runs the demo for minutes (``bench.py --only accuracy``);
here only what ties it to the coordinator's output is checked, cheaply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from programs import script_module

from syncfed.coordinator.evaluation import score_line
from syncfed.protocol import EvalResult


@pytest.fixture(scope="module")
def benchkit() -> Iterator[ModuleType]:
    """scripts/benchkit, bench.py's parts, as bench.py imports them (loading bench.py puts scripts/ on the path)."""
    with script_module("bench"):
        yield importlib.import_module("benchkit")


@pytest.mark.parametrize("step", ["round", "version"])
def test_an_evaluation_heading_gives_its_round_in_either_mode(benchkit: ModuleType, step: str) -> None:
    match = benchkit.accuracy._EVALUATION.match(f"Evaluation at {step} 17/80:")
    assert match is not None and match.group(1) == "17"


def test_the_federated_score_line_gives_its_accuracy(benchkit: ModuleType) -> None:
    reply = EvalResult(0.1234, 343, 360, (36,) * 10)
    match = benchkit.accuracy._FEDERATED.match(f"Federated model: {score_line(reply)}")
    assert match is not None and (match.group(1), match.group(2)) == ("343", "360")
    assert benchkit.accuracy._FEDERATED.match(f"Model update alice: {score_line(reply)}") is None


def test_the_curves_are_drawn_whether_or_not_a_mode_reached_the_target(benchkit: ModuleType, tmp_path: Path) -> None:
    rows = [
        benchkit.accuracy.curve("sync", "syncfed sync", [(1, 9.0, 0.5), (2, 9.6, 0.96)]),
        benchkit.accuracy.curve("async", "syncfed async", [(1, 9.5, 0.3)]),
        benchkit.accuracy.curve("flower", "Flower 1.42.0", [(1, 12.0, 0.4), (2, 12.5, 0.95)]),
    ]
    benchkit.accuracy.plot_accuracy(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_curve_says_where_it_first_reached_the_target(benchkit: ModuleType) -> None:
    points = [(1, 9.0, 0.5), (2, 9.6, benchkit.accuracy.ACCURACY_TARGET), (3, 10.1, 0.99)]
    row = benchkit.accuracy.curve("flower", "Flower 1.42.0", points)
    assert (row["first_evaluation_s"], row["reached_round"], row["reached_s"]) == (9.0, 2, 9.6)
    assert benchkit.accuracy.curve("sync", "syncfed sync", points[:1])["reached_round"] is None


def test_a_named_flower_python_without_flwr_is_an_error_not_a_skip(benchkit: ModuleType, tmp_path: Path) -> None:
    """--flower-python names a venv on purpose: where flwr does not import there, the run says so."""
    (tmp_path / "flwr.py").write_text("raise ImportError('no flwr in this venv')\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    with pytest.raises(RuntimeError, match="flwr does not import: .*no flwr in this venv"):
        benchkit.flower.flower_version(str(python))


def test_the_flower_curve_reads_its_servers_evaluation_lines(benchkit: ModuleType, tmp_path: Path) -> None:
    """Flower's run without flwr: a stand-in server prints two evaluations and exits; the curve stops at the target."""
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        '[ "$2" = flower-server ] || exit 0\n'
        f"echo '{benchkit.flower.FLOWER_EVALUATION} 1 180 360'\n"
        f"echo '{benchkit.flower.FLOWER_EVALUATION} 2 350 360'\n"
        "echo 'never read: the run stops at the target'\n"
    )
    python.chmod(0o755)
    plan = dataclasses.replace(benchkit.plan.QUICK, flower_python=str(python))
    row = asyncio.run(benchkit.accuracy.flower_accuracy_curve(plan, "0.0-test"))
    assert row["label"] == "Flower 0.0-test"
    assert [(point[0], point[2]) for point in row["points"]] == [(1, 0.5), (2, 350 / 360)]
    assert row["reached_round"] == 2 and row["points"][0][1] <= row["reached_s"]


def test_the_demos_reader_gives_each_federated_score_its_headings_round(benchkit: ModuleType) -> None:
    read = benchkit.accuracy.demo_accuracy()
    reply = EvalResult(0.1234, 343, 360, (36,) * 10)
    lines = [
        "Evaluation at round 7/80:",
        f"Model update alice: {score_line(reply)}",
        f"Federated model: {score_line(reply)}",
    ]
    assert [read(line) for line in lines] == [None, None, (7, 343 / 360)]
