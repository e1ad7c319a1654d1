"""The dashboard's curves from metrics events: which lines, which metric, which points."""

from __future__ import annotations

import math
from typing import Any

from syncfed.curves import curves, headline_metric


def round_event(number: int, seconds: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {"event": "round", "round": number, "workers": ["alice", "bob"], "failed": {}, "seconds": seconds, **extra}


def evaluation(number: int, model: str, **figures: Any) -> dict[str, Any]:
    return {"event": "eval", "round": number, "model": model, "loss": 0.3, **figures}


def lines(series: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    return {line["name"]: line["points"] for line in series}


def test_the_evaluators_scores_make_the_federated_line_first_then_each_sites_own_model() -> None:
    events = [
        round_event(1, 2.5),
        evaluation(1, "alice", accuracy=0.3),
        evaluation(1, "bob", accuracy=0.4),
        evaluation(1, "federated", accuracy=0.5),
        round_event(2, 0.7),
        round_event(3, 0.6),
        evaluation(3, "alice", accuracy=0.6),
        evaluation(3, "bob", accuracy=0.65),
        evaluation(3, "federated", accuracy=0.8),
    ]
    drawn = curves(events)
    assert drawn["metric"] == "accuracy"
    assert [line["name"] for line in drawn["scores"]] == ["federated", "alice's model", "bob's model"]
    assert lines(drawn["scores"])["federated"] == [[1, 0.5], [3, 0.8]]
    assert lines(drawn["scores"])["bob's model"] == [[1, 0.4], [3, 0.65]]
    assert drawn["seconds"] == [{"name": "round time (s)", "points": [[1, 2.5], [2, 0.7], [3, 0.6]]}]
    assert drawn["epsilon"] == []


def test_federated_evaluation_gives_the_sites_average_and_the_global_model_at_each_site() -> None:
    site = {"loss": 0.2, "accuracy": 0.9, "n": 40}
    events = [
        round_event(1),
        {
            "event": "federated_eval",
            "round": 1,
            "sites": {"alice": site, "bob": {**site, "accuracy": 0.7}},
            "failed": {},
            "average": {**site, "accuracy": 0.8},
        },
    ]
    assert lines(curves(events)["scores"]) == {
        "federated, sites' average": [[1, 0.8]],
        "federated at alice": [[1, 0.9]],
        "federated at bob": [[1, 0.7]],
    }


def test_the_headline_is_the_tasks_readout_auc_for_binary_mae_for_regression() -> None:
    binary = [round_event(1), evaluation(1, "federated", accuracy=0.9, auc=0.95, balanced_accuracy=0.8)]
    regression = [round_event(1), evaluation(1, "federated", mae=3.1, rmse=4.0)]
    assert headline_metric(binary) == "auc"
    assert lines(curves(binary)["scores"]) == {"federated": [[1, 0.95]]}
    assert headline_metric(regression) == "mae"
    assert lines(curves(regression)["scores"]) == {"federated": [[1, 3.1]]}
    assert headline_metric([evaluation(1, "federated", **{"user.brier": 0.07})]) == "loss"  # a user task's
    assert curves([round_event(1)])["metric"] == ""


def test_privacy_spent_comes_from_the_federations_epsilon_and_each_dp_sgd_sites_own() -> None:
    events = [
        round_event(1, privacy={"dp": "central", "epsilon": 0.4, "delta": 1e-5}, dp_epsilon={"alice": 1.5}),
        round_event(2, privacy={"dp": "central", "epsilon": 0.6, "delta": 1e-5}, dp_epsilon={"alice": 2.1}),
        round_event(3, privacy={"secure_agg": {"workers": 2}}),  # secure aggregation alone spends no epsilon
    ]
    assert lines(curves(events)["epsilon"]) == {
        "federation": [[1, 0.4], [2, 0.6]],
        "alice (DP-SGD)": [[1, 1.5], [2, 2.1]],
    }


def test_a_round_written_again_after_a_resume_replaces_its_point() -> None:
    events = [
        round_event(1, 3.0),
        evaluation(1, "federated", accuracy=0.4),
        round_event(2, 1.0),
        round_event(2, 1.5),
        evaluation(2, "federated", accuracy=0.7),
        evaluation(2, "federated", accuracy=0.6),
    ]
    drawn = curves(events)
    assert lines(drawn["seconds"])["round time (s)"] == [[1, 3.0], [2, 1.5]]
    assert lines(drawn["scores"])["federated"] == [[1, 0.4], [2, 0.6]]


def test_missing_undefined_and_malformed_values_leave_gaps_not_guesses() -> None:
    events: list[Any] = [
        round_event(1, seconds=math.nan),
        round_event(2, seconds="fast"),  # type: ignore[arg-type]
        {"event": "round", "round": True, "seconds": 1.0},
        {"event": "round", "round": "3", "seconds": 1.0},
        "not an event",
        evaluation(1, "federated", accuracy=None, auc=None),  # an AUC a site without both classes cannot give
        evaluation(2, "federated", accuracy=math.inf, auc=0.7),
        evaluation(3, "federated", accuracy=0.9, auc=0.8),
        {"event": "eval", "round": 4, "model": 7, "auc": 0.9},
        round_event(4, 0.5),
    ]
    drawn = curves(events)
    assert drawn["metric"] == "auc"
    assert lines(drawn["scores"]) == {"federated": [[2, 0.7], [3, 0.8]]}
    assert lines(drawn["seconds"]) == {"round time (s)": [[4, 0.5]]}
