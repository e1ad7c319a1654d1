"""Plot test accuracy (or another metric) and loss per round from one or more ``--metrics-out`` files.

Usage::

    python scripts/plot_metrics.py metrics.jsonl -o curves.png
    python scripts/plot_metrics.py fed.jsonl central.jsonl -o compare.png --labels federated,centralized
    python scripts/plot_metrics.py binary.jsonl -o auc.png --metric auc      # any numeric field of eval events

Each file is one run. By default a run draws its global model (``federated``,
or ``centralized`` in a ``--centralized`` baseline; in a run with a single
worker, that worker's model) as a thick line, and every other worker's own
model thin and dashed, so a federated run and a centralized one can be read
off the same axes. Only ``eval`` lines count;
every other event is skipped, so newer coordinators' events do not break old
plots. The figure is drawn on the non-interactive Agg canvas, without pyplot,
so it works with no display and leaves matplotlib's global state alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["Point", "Run", "MetricsError", "load_metrics", "load_run", "main_models", "plot", "main"]

PROGRAM = "plot_metrics.py"
#: The coordinator's name for the aggregated model (``syncfed.coordinator.FEDERATED``).
FEDERATED = "federated"
#: Its name in a centralized baseline (``syncfed.coordinator.CENTRALIZED``), drawn as a main line of its own.
CENTRALIZED = "centralized"
#: Exit status of every error this script reports: bad input, as argparse's usage errors.
EXIT_ERROR = 2
INTERRUPTED = 130


class MetricsError(Exception):
    """A metrics file or a command-line value cannot be used; the message names which and why."""


class Point(NamedTuple):
    """One evaluation of one model: ``value`` is the plotted metric (accuracy as a fraction, by default), loss
    the mean test loss."""

    round: int
    value: float
    loss: float


@dataclass(frozen=True)
class Run:
    """One metrics file under its legend label: model name → points in round order."""

    label: str
    curves: Mapping[str, list[Point]]


def _number(event: dict[str, Any], key: str, where: str) -> float:
    value = event.get(key)
    if key in event and value is None and key not in ("accuracy", "loss"):
        return math.nan  # a figure the data leave undefined (an AUC without positives): a gap in the line
    # bool is an int subclass; true/false in a numeric field is garbage, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        hint = "; a regression has none: try --metric mae" if key == "accuracy" and "mae" in event else ""
        raise MetricsError(f"{where}: eval event has no numeric {key!r} (got {value!r}){hint}")
    return float(value)


def load_metrics(path: Path, metric: str = "accuracy") -> dict[str, list[Point]]:
    """Read the ``eval`` events of a metrics file, by model name, sorted by round, with ``metric`` as the value.

    Other events are ignored. A later evaluation of the same model and round
    replaces an earlier one, so a file that was appended to twice still gives
    one point per round.

    Raises:
        MetricsError: the file is missing or unreadable, a line is not a JSON
            object, an eval event lacks a field, or there is no eval event.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MetricsError(f"metrics file not found: {path}") from None
    except OSError as exc:
        raise MetricsError(f"cannot read metrics file {path}: {exc.strerror or exc}") from None
    by_model: dict[str, dict[int, Point]] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            event = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise MetricsError(f"{where}: invalid JSON: {reason}") from None
        if not isinstance(event, dict):
            raise MetricsError(f"{where}: expected a JSON object, got {type(event).__name__}")
        if event.get("event") != "eval":
            continue
        model, round_number = event.get("model"), event.get("round")
        if not isinstance(model, str) or not model:
            raise MetricsError(f"{where}: eval event has no model name (got {model!r})")
        if isinstance(round_number, bool) or not isinstance(round_number, int):
            raise MetricsError(f"{where}: eval event has no integer 'round' (got {round_number!r})")
        point = Point(round_number, _number(event, metric, where), _number(event, "loss", where))
        by_model.setdefault(model, {})[round_number] = point
    if not by_model:
        raise MetricsError(f"{path}: no eval events, so nothing to plot (was the run made without an evaluator?)")
    return {model: [points[r] for r in sorted(points)] for model, points in sorted(by_model.items())}


def load_run(path: Path, label: str | None = None, metric: str = "accuracy") -> Run:
    """:func:`load_metrics` under a legend label, the file's stem by default."""
    return Run(label if label is not None else path.stem, load_metrics(path, metric))


def main_models(curves: Mapping[str, Sequence[Point]]) -> set[str]:
    """The models that stand for the run: ``federated`` or ``centralized``, and the worker of a one-worker run
    (such as ``central`` in an older centralized baseline's file, whose global model was called ``federated``)."""
    workers = [model for model in curves if model not in (FEDERATED, CENTRALIZED)]
    return {FEDERATED, CENTRALIZED} | (set(workers) if len(workers) == 1 else set())


def _selected(run: Run, models: Sequence[str] | None) -> list[tuple[str, bool]]:
    """The run's models to draw, each with whether it is a main model (thick) or a worker's own (thin)."""
    if models is not None:
        return [(model, model in main_models(run.curves)) for model in run.curves if model in models]
    mains = main_models(run.curves)
    names = list(run.curves)
    # In a one-worker run FedAvg returns that worker's model unchanged: the same curve twice would hide one
    # line behind the other, so only the worker's, the more telling name ("central"), is drawn.
    single = [model for model in mains if model not in (FEDERATED, CENTRALIZED)]
    if FEDERATED in names and single and run.curves[single[0]] == run.curves[FEDERATED]:
        names.remove(FEDERATED)
    return [(model, model in mains) for model in names]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan  # a diverged loss becomes a gap, not a ruined scale


def plot(runs: Sequence[Run], output: Path, models: Sequence[str] | None = None, metric: str = "accuracy") -> Figure:
    """Draw ``metric`` (accuracy in %) and mean test loss per round side by side, save the figure to ``output``
    and return it.

    ``models`` limits the lines to those model names (in runs that have them);
    the format follows ``output``'s extension (png, pdf, svg, ...).

    Raises:
        MetricsError: no runs or no selected model to draw, an unknown image format, or ``output``
            cannot be written.
    """
    if not runs:
        raise MetricsError("no runs to plot")
    figure = Figure(figsize=(12, 5.2), dpi=150, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    formats = canvas.get_supported_filetypes()
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise MetricsError(
            f"cannot write {output}: unknown image format {output.suffix or '(none)'!r}, "
            f"use one of {', '.join('.' + name for name in sorted(formats))}"
        )
    lines = [(run, model, main) for run in runs for model, main in _selected(run, models)]
    if not lines:
        known = sorted({model for run in runs for model in run.curves})
        raise MetricsError(f"no run has a model named {', '.join(models or [])} (models: {', '.join(known)})")
    # Thick lines first so they take the palette's first, strongest colours and sit in the legend's first rows.
    lines.sort(key=lambda line: not line[2])
    # tab10 while it lasts (matplotlib's default cycle), tab20 when more lines need telling apart.
    palette = colormaps["tab10" if len(lines) <= 10 else "tab20"]
    colours = [palette(index) for index in range(palette.N)]

    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for index, (run, model, main) in enumerate(lines):
        points = run.curves[model]
        rounds = [point.round for point in points]
        label = model if len(runs) == 1 else f"{run.label}: {model}"
        style: dict[str, Any] = {
            "color": colours[index % len(colours)],
            "label": label,
            "linewidth": 2.4 if main else 1.2,
            "linestyle": "-" if main else "--",
            "marker": "o" if main else ".",
            "markersize": 4 if main else 3,
            "alpha": 1.0 if main else 0.75,
            "zorder": 3 if main else 2,
        }
        scale = 100 if metric == "accuracy" else 1
        accuracy_axes.plot(rounds, [scale * _finite(point.value) for point in points], **style)
        loss_axes.plot(rounds, [_finite(point.loss) for point in points], **style)

    if metric == "accuracy":
        accuracy_axes.set(title="Test accuracy", xlabel="Round", ylabel="Accuracy (%)")
    else:
        accuracy_axes.set(title=f"Test {metric}", xlabel="Round", ylabel=metric)
    loss_axes.set(title="Mean test loss", xlabel="Round", ylabel="Loss")
    for axes in (accuracy_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
    if metric == "accuracy":
        low, high = accuracy_axes.get_ylim()
        accuracy_axes.set_ylim(
            max(0.0, low), min(101.0, high)
        )  # autoscale's margins, never below 0% nor far above 100%
    loss_axes.set_ylim(bottom=0)
    title = f"Test {metric} and loss per round"
    figure.suptitle(title if len(runs) > 1 else f"{title}: {runs[0].label}", fontsize=13)
    # Both panels hold the same lines: one legend under them, from one panel's handles.
    handles, labels = accuracy_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(lines), 4), frameon=False, fontsize=9)
    try:
        figure.savefig(output, format=suffix)
    except OSError as exc:
        raise MetricsError(f"cannot write {output}: {exc.strerror or exc}") from None
    return figure


def _split(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise MetricsError(f"{flag} {text!r} has an empty name")
    return items


def _labels(paths: Sequence[Path], given: str | None) -> list[str]:
    """Labels from ``--labels``, one per file, or the file stems, made unique with the path where they clash."""
    if given is None:
        stems = [path.stem for path in paths]
        return [stem if stems.count(stem) == 1 else str(path) for stem, path in zip(stems, paths, strict=True)]
    labels = _split(given, "--labels")
    if len(labels) != len(paths):
        raise MetricsError(f"--labels gives {len(labels)} labels for {len(paths)} metrics files")
    if len(set(labels)) != len(labels):
        raise MetricsError(f"--labels {given!r} repeats a label")
    return labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Plot test accuracy (or --metric) and loss per round from syncfed --metrics-out files,"
        " one run per file.",
    )
    parser.add_argument("metrics", nargs="+", type=Path, metavar="METRICS.jsonl", help="metrics files, one per run")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="PATH",
        help="image to write; its extension picks the format",
    )
    parser.add_argument(
        "--labels", metavar="A,B,...", help="legend label of each run, in file order (default: the file names' stems)"
    )
    parser.add_argument(
        "--metric",
        default="accuracy",
        metavar="NAME",
        help="the eval events' field drawn beside the loss: accuracy, balanced_accuracy, f1_macro, auc, pr_auc,"
        " sensitivity, specificity, mse, rmse, mae, r2 (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        metavar="M,N,...",
        help="draw only these models, e.g. federated,bob (default: the global model, federated or centralized,"
        " and each worker's model)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        labels = _labels(args.metrics, args.labels)
        models = _split(args.models, "--models") if args.models is not None else None
        runs = [load_run(path, label, args.metric) for path, label in zip(args.metrics, labels, strict=True)]
        plot(runs, args.output, models, args.metric)
    except MetricsError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
