"""How a run shows its scores: a regression in its own units or by its label's name, a user task's own
figures (or its raw sums when the coordinator cannot compute them), and the cross-site table's headline metric."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, roc_auc_score

from syncfed.config import CoordinatorConfig
from syncfed.coordinator.task_setup import task_readout
from syncfed.evaluation import CrossSiteMatrix, Readout, headline, result_json
from syncfed.exceptions import ModelError
from syncfed.metrics import roc_auc, score_histogram
from syncfed.protocol import DataPlan, EvalResult, Recipe
from syncfed.tasks import MAX_USER_FIGURES, user_figures

PREDICTED, TARGETS = np.array([3.0, 5.0, 7.5]), np.array([2.0, 5.0, 9.0])


def regression_result(predicted: np.ndarray = PREDICTED, targets: np.ndarray = TARGETS) -> EvalResult:
    error = predicted - targets
    sums = np.array([len(error), error.sum(), np.abs(error).sum(), (error**2).sum(), targets.sum(), (targets**2).sum()])
    return EvalResult(0.5, 0, len(error), (len(error),), metrics={"regression": sums})


# -- A regression in its own units ---------------------------------------------------------------------


def test_units_follow_mae_and_rmse_and_else_the_label_names_the_error() -> None:
    reply = regression_result()
    assert headline(reply, Readout("days")) == "MAE 0.8333 days, RMSE 1.041 days, R² 0.868"
    assert headline(reply, Readout("", "length_of_stay")) == "MAE 0.8333 (length_of_stay), RMSE 1.041, R² 0.868"
    assert headline(reply, Readout("days", "length_of_stay")) == "MAE 0.8333 days, RMSE 1.041 days, R² 0.868"
    assert headline(reply) == "MAE 0.8333, RMSE 1.041, R² 0.868"


def test_the_jsonl_gains_target_units_where_given_and_only_for_a_regression() -> None:
    assert result_json(regression_result(), (), Readout("days"))["target_units"] == "days"
    assert "target_units" not in result_json(regression_result(), (), Readout("", "length_of_stay"))
    confusion = np.array([[2, 0], [1, 1]], dtype=np.int64)
    classes = EvalResult(0.5, 3, 4, (3, 1), metrics={"confusion": confusion})
    assert "target_units" not in result_json(classes, (), Readout("days"))


# -- A user task's own figures -----------------------------------------------------------------------------


class Calibration:
    """A user task's coordinator side: the Brier score from its own sums, and its share of the confusion."""

    def metrics(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
        squared, n = sums["user.brier"]
        return {"brier": squared / n, "n": np.int64(n)}


def test_user_figures_are_the_tasks_own_numbers_as_floats() -> None:
    sums = {"user.brier": np.array([1.5, 6.0])}
    assert user_figures(Calibration(), sums) == {"brier": 0.25, "n": 6.0}
    assert user_figures(object(), sums) == {}  # a task without metrics: no figures
    assert sums["user.brier"].tolist() == [1.5, 6.0]  # the task is handed copies


class Returns:
    def __init__(self, value: Any) -> None:
        self.value = value

    def metrics(self, sums: dict[str, np.ndarray]) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (ZeroDivisionError("division by zero"), "the task's metrics failed: ZeroDivisionError: division by zero"),
        ([("brier", 0.1)], "the task's metrics must return a dict of at most 16 figures"),
        (
            {f"m{i}": 0.0 for i in range(MAX_USER_FIGURES + 1)},
            "the task's metrics must return a dict of at most 16 figures",
        ),
        ({"Brier": 0.1}, "the task's metric name 'Brier' must match [a-z][a-z0-9_]{0,31}"),
        ({"b" * 33: 0.1}, f"the task's metric name '{'b' * 33}' must match [a-z][a-z0-9_]{{0,31}}"),
        ({"brier": "0.1"}, "the task's metric brier is str, not a number"),
        ({"brier": True}, "the task's metric brier is bool, not a number"),
        ({"brier": math.nan}, "the task's metric brier is nan, not a finite number"),
        ({"brier": np.float64(np.inf)}, "the task's metric brier is inf, not a finite number"),
    ],
)
def test_bad_user_figures_are_refused_in_one_line(value: Any, reason: str) -> None:
    with pytest.raises(ModelError) as error:
        user_figures(Returns(value), {})
    assert str(error.value) == reason


USER_TASK = """
    import numpy as np


    class Brier:
        def __init__(self, num_classes):
            self.num_outputs = num_classes

        def targets(self, labels): ...
        def loss(self, output, target): ...
        def predicted(self, output): ...
        def batch_sums(self, output, labels): ...

        def metrics(self, sums):
            squared, n = sums["user.brier"]
            if n == 0:
                raise ValueError("no examples")
            return {"brier": squared / n}
"""


def user_result(squared: float, n: int) -> EvalResult:
    return EvalResult(0.5, 0, max(n, 1), (max(n, 1),), metrics={"user.brier": np.array([squared, float(n)])})


def readout_of(task: str, lines: list[str]) -> Readout:
    config = CoordinatorConfig(workers={"a": "ws://unused"}, evaluator={}, task=task)
    return task_readout(config, Recipe(task), None, 2, report=lines.append)


def test_a_coordinator_that_imports_the_user_task_shows_its_figures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "readout_task17.py").write_text(textwrap.dedent(USER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    lines: list[str] = []
    readout = readout_of("readout_task17:Brier", lines)
    assert result_json(user_result(1.5, 6), (), readout)["user.brier"] == 0.25
    assert headline(user_result(1.5, 6), readout) == "brier 0.25"
    # Its metrics failing falls back to the raw sums, said once.
    assert result_json(user_result(0.0, 0), (), readout)["user_sums"] == {"user.brier": [0.0, 0.0]}
    assert result_json(user_result(1.5, 6), (), readout)["user_sums"] == {"user.brier": [1.5, 6.0]}
    assert lines == [
        "Task readout_task17:Brier: its own metric sums are written raw (user_sums):"
        " the task's metrics failed: ValueError: no examples"
    ]


def test_a_coordinator_that_cannot_import_the_user_task_writes_the_raw_sums_and_says_so_once() -> None:
    lines: list[str] = []
    readout = readout_of("no_such_module17:Task", lines)
    assert lines == []  # nothing to say until there are sums of its own
    for _ in range(2):
        fields = result_json(user_result(1.5, 6), (), readout)
        assert fields["user_sums"] == {"user.brier": [1.5, 6.0]} and "user.brier" not in fields
        assert headline(user_result(1.5, 6), readout) == ""
    assert len(lines) == 1 and lines[0].startswith(
        "Task no_such_module17:Task: its own metric sums are written raw (user_sums):"
        " task no_such_module17:Task cannot be imported: No module named 'no_such_module17'"
    )


def test_a_built_in_task_reads_its_units_and_the_plan_s_label() -> None:
    config = CoordinatorConfig(workers={"a": "ws://unused"}, evaluator={}, target_units="days")
    plan = DataPlan("table", (1,), None, ("age",), label="length_of_stay")
    assert task_readout(config, Recipe("regression"), plan, 1, report=print) == Readout("days", "length_of_stay")
    assert task_readout(config, None, None, 10, report=print) == Readout("days")


# -- The cross-site table shows the task's headline metric ------------------------------------------------


def matrix(cells: tuple[tuple[EvalResult | str, ...], ...], readout: Readout | None = None) -> CrossSiteMatrix:
    names = ("alice", "federated"), ("alice", "testing"), ("validation", "test")
    return CrossSiteMatrix(3, *names, cells, readout or Readout())


def test_a_regression_cross_site_table_shows_mae_in_the_target_s_units(tmp_path: Path) -> None:
    near, far = regression_result(), regression_result(PREDICTED + 10.0)
    shown = matrix(((near, far), (far, "worker testing is unavailable: gone")), Readout("days"))
    assert (shown.metric, shown.metric_title) == ("mae", "MAE in days")
    mae_near, mae_far = mean_absolute_error(TARGETS, PREDICTED), mean_absolute_error(TARGETS, PREDICTED + 10.0)
    np.testing.assert_allclose(shown.values(), [[mae_near, mae_far], [mae_far, np.nan]])
    assert shown.table()[1:3] == [
        "alice                     0.8333           9.833",
        "federated                  9.833               -",
    ]
    assert matrix(((near, near), (near, near)), Readout("", "los")).metric_title == "MAE (los)"
    matplotlib = pytest.importorskip("matplotlib.axes")
    written: list[str] = []
    text = matplotlib.Axes.text
    with pytest.MonkeyPatch.context() as patch:  # the cells' labels, as the heat map writes them
        patch.setattr(
            matplotlib.Axes, "text", lambda axes, x, y, s, **kw: written.append(s) or text(axes, x, y, s, **kw)
        )
        assert shown.draw(tmp_path / "mae.png") and (tmp_path / "mae.png").stat().st_size > 0
    assert written == ["0.8333", "9.833", "9.833", "n/a"]


def binary_result(labels: np.ndarray, scores: np.ndarray) -> EvalResult:
    guess = (scores > 0.5).astype(np.int64)
    confusion = np.bincount(labels * 2 + guess, minlength=4).reshape(2, 2).astype(np.int64)
    sums = {"confusion": confusion, "scores": score_histogram(labels, scores, 1000)}
    auc = roc_auc(labels, scores)
    if auc is not None:
        sums["auc"] = np.array([auc])
    right = int(np.trace(confusion))
    return EvalResult(0.3, right, len(labels), tuple(confusion.sum(axis=0).tolist()), metrics=sums)


def test_a_binary_cross_site_table_shows_each_site_s_auc_and_a_dash_for_one_class() -> None:
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.2, 0.6, 0.4, 0.7, 0.9])
    both = binary_result(labels, scores)
    one_class = binary_result(np.array([0, 0]), np.array([0.3, 0.6]))
    shown = matrix(((both, one_class), (both, both)))
    assert (shown.metric, shown.metric_title) == ("auc", "ROC AUC")
    assert shown.values()[0, 0] == pytest.approx(roc_auc_score(labels, scores))
    assert shown.table()[1:3] == [
        "alice                      0.833               -",
        "federated                  0.833           0.833",
    ]
