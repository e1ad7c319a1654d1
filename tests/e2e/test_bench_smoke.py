"""The benchmark suite's smoke test: ``scripts/bench.py --quick`` runs and its figures are sane.

Sane, not fast: the machine running the tests is shared, so no timing is
checked, only that every figure is a positive finite number, that the plain
loop did exactly syncfed's work (same final weights), and that each transfer
round moved the model's bytes to every worker and back, plus a little framing.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from conftest import REPO
from programs import script_module
from units import MS

from syncfed.config import DEFAULT_RECEIVE_SLOTS

SCRIPT = REPO / "scripts" / "bench.py"
#: Bytes of the quick run's model, counted independently: DigitsMLP(688) has
#: layers 64->688, 688->688, 688->688 and 688->10, with biases, in float32.
MLP_1M_BYTES = 4 * sum(inputs * outputs + outputs for inputs, outputs in ((64, 688), (688, 688), (688, 688), (688, 10)))
#: Framing a message may add to its tensors: the envelope, names, dtypes, shapes and the plan.
FRAMING = 64 * 1024
WORKERS = 3


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def benchkit() -> Iterator[ModuleType]:
    """scripts/benchkit, bench.py's parts, as bench.py imports them (loading bench.py puts scripts/ on the path)."""
    with script_module("bench"):
        yield importlib.import_module("benchkit")


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of every section but Flower (an optional extra), read back from its JSON."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--only", "overhead,transfer,scale,memory", "--json", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300_000 * MS)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "Targets of issues 9 and 20" in completed.stdout
    return dict(json.loads(out.read_text()))


def test_limits_are_positive(figures: dict[str, Any]) -> None:
    assert figures["limits"].keys() >= {"numpy copy into memory (memcpy)", "loopback TCP socket"}
    assert all(finite_positive(rate) for rate in figures["limits"].values())


def test_plain_loop_does_syncfeds_work(figures: dict[str, Any]) -> None:
    rows = {row["model"]: row for row in figures["overhead"]["rows"]}
    assert set(rows) == {"digits-cnn", "mlp-1m"}
    for row in rows.values():
        assert len(row["plain"]["seconds"]) == len(row["syncfed"]["seconds"]) == row["rounds"]
        assert all(finite_positive(s) for s in [*row["plain"]["seconds"], *row["syncfed"]["seconds"]])
        assert finite_positive(row["ratio"])
        assert row["ratio"] == pytest.approx(row["syncfed_s"] / row["plain_s"])
        # CPU seconds per round: the plain loop's own, syncfed's coordinator's and its workers'.
        assert (
            len(row["plain"]["cpu"])
            == len(row["syncfed"]["cpu"])
            == len(row["syncfed"]["workers_cpu"])
            == row["rounds"]
        )
        assert all(s >= 0 for s in [*row["syncfed"]["cpu"], *row["syncfed"]["workers_cpu"]])
        assert finite_positive(row["plain"]["median_cpu_s"]) and finite_positive(row["syncfed"]["median_cpu_s"])
        # Same data, seeds and SGD steps: both end at the same global model.
        assert row["same_weights_max_abs_diff"] <= 1e-6


def test_transfer_moves_the_model_to_each_worker_and_back(figures: dict[str, Any]) -> None:
    (row,) = figures["transfer"]["rows"]
    assert row["model"] == "mlp-1m"
    assert row["model_bytes"] == MLP_1M_BYTES
    rounds = row["rounds"]
    for direction in ("bytes_sent", "bytes_received"):
        assert len(rounds[direction]) == len(rounds["seconds"]) >= 2
        for moved in rounds[direction]:
            assert WORKERS * MLP_1M_BYTES <= moved <= WORKERS * (MLP_1M_BYTES + FRAMING)
    assert finite_positive(row["MBps"]) and finite_positive(row["of_socket"])
    assert finite_positive(row["coordinator_cpu_s"]) and row["workers_cpu_s"] >= 0
    assert 0 < row["framing_overhead"] < FRAMING / MLP_1M_BYTES


def test_scale_hosts_workers_in_one_process(figures: dict[str, Any]) -> None:
    rows = figures["scale"]["rows"]
    assert [row["workers"] for row in rows] == [3, 4]
    assert [row["hosting"] for row in rows] == [
        "3 asyncio servers in 1 process",
        "4 asyncio servers in 1 process",
    ]
    assert all(finite_positive(row["seconds"]) for row in rows)
    assert math.isfinite(figures["scale"]["slope_s_per_worker"])


@pytest.mark.parametrize("fold", ["fragments", "whole"])
def test_memory_is_measured_in_the_coordinators_own_process(figures: dict[str, Any], fold: str) -> None:
    """Updates folded from their fragments (the default), then decoded whole (--whole-updates)."""
    rows = figures["memory"]["rows"]
    assert [row["fold"] for row in rows] == ["fragments", "whole"]
    row = rows[["fragments", "whole"].index(fold)]
    assert row["workers"] == WORKERS and row["receive_slots"] == DEFAULT_RECEIVE_SLOTS
    assert figures["memory"]["model_bytes"] == MLP_1M_BYTES
    # A whole torch process, but not the workers' memory: they live elsewhere.
    assert 50e6 < row["baseline_rss"] < 2e9 and 50e6 < row["peak_rss"] < 2e9
    assert len(row["rss_after_rounds"]) == len(row["rounds"]["seconds"]) == figures["plan"]["memory_rounds"]
    assert row["models"] == pytest.approx((row["peak_rss"] - row["baseline_rss"]) / MLP_1M_BYTES)
    for moved in row["rounds"]["bytes_sent"]:
        assert WORKERS * MLP_1M_BYTES <= moved <= WORKERS * (MLP_1M_BYTES + FRAMING)


def test_targets_follow_the_figures(figures: dict[str, Any]) -> None:
    found = {target["name"]: target for target in figures["targets"]}
    assert set(found) == {"digits-cnn overhead", "mlp-1m overhead"}
    for target in found.values():
        assert target["met"] == (target["value"] <= target["limit"])


def test_median_leaves_out_the_warm_up_round(benchkit: ModuleType) -> None:
    assert benchkit.figures.Rounds([9.0, 1.0, 2.0, 3.0]).median == 2.0
    assert benchkit.figures.Rounds([9.0]).median == 9.0


def test_targets_of_a_full_run(benchkit: ModuleType) -> None:
    """Each of issues 9's and 20's targets, judged from figures made up to sit either side of its limit."""
    results = {
        "overhead": {"rows": [{"model": "digits-cnn", "ratio": 1.2}, {"model": "mlp-10m", "ratio": 1.31}]},
        "flower": {"rows": [{"model": "mlp-10m", "flower_over_syncfed": 5.1}]},
        "transfer": {
            "rows": [
                {"model": "mlp-10m", "of_socket": 0.49, "coordinator_cpu_s": 0.079},
                {"model": "mlp-100m", "of_socket": 0.51, "coordinator_cpu_s": 0.9},
            ]
        },
        "memory": {
            "rows": [
                {"workers": 3, "receive_slots": 0, "models": 6.5},
                {"workers": 3, "receive_slots": DEFAULT_RECEIVE_SLOTS, "models": 3.3},
                {"workers": 3, "receive_slots": DEFAULT_RECEIVE_SLOTS, "fold": "whole", "models": 5.0},
                {"workers": 30, "receive_slots": 0, "models": 40.0},
                {"workers": 30, "receive_slots": DEFAULT_RECEIVE_SLOTS, "models": 3.9},
                {"workers": 30, "receive_slots": DEFAULT_RECEIVE_SLOTS, "fold": "whole", "models": 9.0},
            ]
        },
        "scale": {
            "rows": [{"workers": 30, "seconds": 1.0}, {"workers": 100, "seconds": 3.0, "per_added_worker_s": 0.03}],
            "slope_s_per_worker": 0.02,
        },
    }
    met = {target.name: target.met for target in benchkit.targets.targets(benchkit.plan.FULL, results)}
    assert met == {
        "digits-cnn overhead": True,
        "mlp-10m overhead": False,
        "mlp-10m vs Flower": True,
        "mlp-10m transfer": False,
        "coordinator CPU per 10M transfer round": True,
        "mlp-100m transfer": True,
        "coordinator memory, 30 workers": True,
        "coordinator memory flat, 3 to 30 workers": False,
        "100 workers, linear growth": True,
    }
