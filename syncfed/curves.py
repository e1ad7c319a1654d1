"""A job's live curves, read from its metrics events: what the dashboard draws.

The metrics file (``--metrics-out``, or ``FederationService.metrics``) holds
one event per line; this module turns them into JSON-ready series of
``[round, value]`` points, without I/O, so the rules are tested without a
server or a browser:

- the headline score per round: the task's readout, AUC for a binary task,
  MAE for a regression, accuracy for a classification, else the loss.
  ``eval`` events give the federated model's score and each site's own
  model's (both on the evaluator's test data); ``federated_eval`` events
  give the federated model's score on each site's validation split and
  their weighted average;
- each round's time (``round`` events' ``seconds``);
- the privacy spent: the federation's epsilon (``round`` events'
  ``privacy.epsilon``, with ``--dp``) and each ``--dp-sgd`` site's own.

A round written again (a resumed job) replaces the earlier point, and a
value that is missing, not a number or not finite is left out: the curve
shows a gap rather than a guess.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypedDict

__all__ = ["HEADLINES", "Curves", "Series", "curves", "headline_metric"]

#: The headline metrics, in the order a score's fields are searched for one: AUC only binary tasks report,
#: MAE only regressions, accuracy every classification; the loss, which every score has, when none of them
#: is there (a user task's, or a regression scored without metric sums).
HEADLINES: Final = ("auc", "mae", "accuracy", "loss")


class Series(TypedDict):
    """One line of a chart: its label and its ``[round, value]`` points, by round."""

    name: str
    points: list[list[float]]


class Curves(TypedDict):
    """A job's charts: the headline ``metric`` ("" before any score) and three lists of lines."""

    metric: str
    scores: list[Series]
    seconds: list[Series]
    epsilon: list[Series]


def headline_metric(events: Iterable[Mapping[str, Any]]) -> str:
    """The job's headline metric: the first of :data:`HEADLINES` that a score in ``events`` carries; "" if none."""
    for event in events:
        for score in _scores(event).values():
            for name in HEADLINES:
                if name in score:
                    return name
    return ""


def curves(events: Iterable[Mapping[str, Any]]) -> Curves:
    """The job's curves from its metrics events, in the order they were written."""
    events = [event for event in events if isinstance(event, Mapping)]
    metric = headline_metric(events)
    sites = _sites(events)
    scores: dict[str, dict[int, float]] = {}
    seconds: dict[str, dict[int, float]] = {}
    epsilon: dict[str, dict[int, float]] = {}
    for event in events:
        number = event.get("round")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        if event.get("event") == "round":
            _add(seconds, "round time (s)", number, event.get("seconds"))
            privacy = event.get("privacy")
            if isinstance(privacy, Mapping):
                _add(epsilon, "federation", number, privacy.get("epsilon"))
            own = event.get("dp_epsilon")
            if isinstance(own, Mapping):
                for site, value in own.items():
                    _add(epsilon, f"{site} (DP-SGD)", number, value)
            continue
        for name, score in _scores(event, sites).items():
            _add(scores, name, number, score.get(metric))
    # The global model's lines first, then the sites' own models: the legend reads from the federation down.
    ordered = dict(sorted(scores.items(), key=lambda line: line[0].endswith("'s model")))
    return {
        "metric": metric,
        "scores": _series(ordered),
        "seconds": _series(seconds),
        "epsilon": _series(epsilon),
    }


def _sites(events: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Every worker the rounds name: an ``eval`` of any other model is of the global one."""
    names: set[str] = set()
    for event in events:
        if event.get("event") == "round":
            for field in ("workers", "failed"):
                value = event.get(field)
                if isinstance(value, (list, Mapping)):
                    names.update(name for name in value if isinstance(name, str))
    return frozenset(names)


def _scores(event: Mapping[str, Any], sites: frozenset[str] = frozenset()) -> dict[str, Mapping[str, Any]]:
    """The scores an event holds, by the line they belong to."""
    kind = event.get("event")
    if kind == "eval":
        model = event.get("model")
        if not isinstance(model, str):
            return {}
        return {f"{model}'s model" if model in sites else model: event}
    if kind != "federated_eval":
        return {}
    found: dict[str, Mapping[str, Any]] = {}
    average = event.get("average")
    if isinstance(average, Mapping):
        found["federated, sites' average"] = average
    per_site = event.get("sites")
    if isinstance(per_site, Mapping):
        for site, score in per_site.items():
            if isinstance(site, str) and isinstance(score, Mapping):
                found[f"federated at {site}"] = score
    return found


def _add(lines: dict[str, dict[int, float]], name: str, number: int, value: object) -> None:
    """Set the point of round ``number`` on line ``name``, if ``value`` is a finite number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        lines.setdefault(name, {})[number] = float(value)


def _series(lines: Mapping[str, Mapping[int, float]]) -> list[Series]:
    return [
        {"name": name, "points": [[number, value] for number, value in sorted(points.items())]}
        for name, points in lines.items()
    ]
