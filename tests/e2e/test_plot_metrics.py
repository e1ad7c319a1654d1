"""scripts/plot_metrics.py: real metrics files from the coordinator's command line, rendered to PNG.

One short real run (4 rounds, evaluated after each) is made once for the
module by the coordinator's command line over the session's workers; the error tests use small files
written here. The command line is run as a subprocess where its exit status
and its stderr (one line, no traceback) are what is tested.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import matplotlib.image
import numpy as np
import pytest
from conftest import REPO
from units import MS

from syncfed.net.spawn import WorkerProcess

SCRIPT = REPO / "scripts" / "plot_metrics.py"
ROUNDS = 4
TRAINERS = ("alice", "bob", "charlie")
CLI_TIMEOUT = 150_000 * MS  # the coordinator's run, spawning included
PLOT_TIMEOUT = 60_000 * MS  # one plot, importing matplotlib included
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEDERATED_BLUE = np.array([0x1F, 0x77, 0xB4]) / 255  # tab10's first colour, the first thick line's


def _import_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


plot_metrics = _import_script()


@pytest.fixture(scope="module")
def real_metrics(digits_workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The metrics file of a real 4-round run over the session's workers, evaluated every round."""
    directory = tmp_path_factory.mktemp("real-run")
    path = directory / "metrics.jsonl"
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in TRAINERS)
    arguments = ["--workers", workers, "--evaluator", f"testing={digits_workers['testing'].uri}"]
    arguments += ["--training-rounds", str(ROUNDS), "--eval-every", "1", "--metrics-out", str(path)]
    done = subprocess.run(
        [sys.executable, str(REPO / "run_websocket_client.py"), *arguments],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return path


def run_plot(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=PLOT_TIMEOUT
    )


def assert_real_png(path: Path) -> np.ndarray:
    """A PNG matplotlib can read back, of a plausible size, with curves on it rather than a blank canvas."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert height >= 400 and width >= 1000 and width > height  # two panels side by side
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # a blank or one-colour image has 0
    # Empty axes are grey on white (about 250 greys from antialiased text, no other colour): count the colours.
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    colours = np.unique((rgb[chroma > 0.15] * 255).round().astype(np.uint8), axis=0)
    assert (chroma > 0.15).sum() > 5000  # a 4-round run's curves colour about 20,000 pixels
    assert len(colours) > 200  # several line colours, antialiased against white and the grid
    return rgb


def coloured_pixels(rgb: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(rgb - colour).max(axis=2) < 0.03).sum())


def parse_evals(path: Path) -> dict[str, list[tuple[int, float]]]:
    """(round, accuracy) per model, read with nothing but json, for comparison with load_metrics."""
    evals: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["event"] == "eval":
            evals.setdefault(event["model"], []).append((event["round"], event["accuracy"]))
    return {model: sorted(points) for model, points in evals.items()}


def write_lines(path: Path, *events: object) -> Path:
    path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    return path


def evaluation(round_number: int, model: str, accuracy: float, loss: float) -> dict[str, object]:
    return {"event": "eval", "round": round_number, "model": model, "accuracy": accuracy, "loss": loss, "n": 10}


# Loading


def test_load_metrics_returns_the_files_rounds_and_accuracies(real_metrics: Path) -> None:
    curves = plot_metrics.load_metrics(real_metrics)
    expected = parse_evals(real_metrics)
    assert sorted(curves) == sorted(expected) == sorted([*TRAINERS, "federated"])
    for model, points in curves.items():
        assert [(point.round, point.value) for point in points] == expected[model]
        assert [point.round for point in points] == list(range(1, ROUNDS + 1))
        assert all(0 <= point.value <= 1 and point.loss > 0 for point in points)


def test_load_metrics_skips_other_events_and_keeps_a_rounds_last_evaluation(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl",
        {"event": "round", "round": 1, "workers": ["alice"], "failed": {}},
        {"event": "round_retry", "round": 2, "failed": {"alice": "timeout"}},
        evaluation(2, "federated", 0.5, 1.0),
        {"event": "eval_skipped", "round": 3, "reason": "evaluator gone"},
        {"event": "something_new", "round": 3, "payload": [1, 2]},
        evaluation(1, "federated", 0.25, 2.0),
        evaluation(2, "federated", 0.75, 0.5),
    )
    curves = plot_metrics.load_metrics(path)
    assert curves == {"federated": [(1, 0.25, 2.0), (2, 0.75, 0.5)]}


# Rendering


def test_cli_renders_a_real_run_to_png(real_metrics: Path, tmp_path: Path) -> None:
    output = tmp_path / "curves.png"
    done = run_plot(str(real_metrics), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == f"wrote {output}\n"
    rgb = assert_real_png(output)
    assert coloured_pixels(rgb, FEDERATED_BLUE) > 500  # the thick federated line, in both panels


def test_two_runs_are_overlaid(real_metrics: Path, tmp_path: Path) -> None:
    output = tmp_path / "both.png"
    runs = [plot_metrics.load_run(real_metrics, "first"), plot_metrics.load_run(real_metrics, "second")]
    figure = plot_metrics.plot(runs, output)
    assert_real_png(output)
    accuracy, loss = figure.axes
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    # The runs' federated models first, thick; then every worker of each run, thin and dashed.
    assert labels[:2] == ["first: federated", "second: federated"]
    assert sorted(labels[2:]) == sorted(f"{run}: {worker}" for run in ("first", "second") for worker in TRAINERS)
    for axes in (accuracy, loss):
        assert [line.get_label() for line in axes.get_lines()] == labels
        widths = [line.get_linewidth() for line in axes.get_lines()]
        assert min(widths[:2]) > max(widths[2:])
        assert {line.get_linestyle() for line in axes.get_lines()[2:]} == {"--"}
    rounds = list(range(1, ROUNDS + 1))
    assert all(list(line.get_xdata()) == rounds for line in accuracy.get_lines())
    federated = [accuracy for _, accuracy in parse_evals(real_metrics)["federated"]]
    np.testing.assert_allclose(accuracy.get_lines()[0].get_ydata(), 100 * np.array(federated))


def test_cli_overlays_runs_under_the_given_labels_and_models(real_metrics: Path, tmp_path: Path) -> None:
    output = tmp_path / "both.pdf"  # any format matplotlib writes
    arguments = [str(real_metrics), str(real_metrics), "-o", str(output)]
    assert plot_metrics.main([*arguments, "--labels", "federated,centralized", "--models", "federated,bob"]) == 0
    assert output.read_bytes()[:5] == b"%PDF-"


def test_a_one_worker_run_draws_its_worker_once_as_the_main_line(tmp_path: Path) -> None:
    # An older centralized run's file: one worker, "central"; FedAvg over one worker gives the same model and curve.
    central = write_lines(
        tmp_path / "central.jsonl",
        *(evaluation(r, name, 0.5 + r / 10, 1.0 / r) for r in (1, 2, 3) for name in ("central", "federated")),
    )
    figure = plot_metrics.plot([plot_metrics.load_run(central)], tmp_path / "central.png")
    (line,) = figure.axes[0].get_lines()
    assert line.get_label() == "central" and line.get_linestyle() == "-"
    assert figure.get_suptitle() == "Test accuracy and loss per round: central"


def test_a_centralized_run_overlays_a_federated_one_as_a_main_line_of_its_own(tmp_path: Path) -> None:
    federated = write_lines(
        tmp_path / "federated.jsonl",
        *(evaluation(r, name, 0.5 + r / 10, 1.0 / r) for r in (1, 2) for name in ("alice", "bob", "federated")),
    )
    centralized = write_lines(tmp_path / "centralized.jsonl", *(evaluation(r, "centralized", 0.6, 0.5) for r in (1, 2)))
    runs = [plot_metrics.load_run(federated), plot_metrics.load_run(centralized)]
    figure = plot_metrics.plot(runs, tmp_path / "both.png")
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        "federated: federated",
        "centralized: centralized",
        "federated: alice",
        "federated: bob",
    ]
    assert [line.get_linestyle() for line in lines] == ["-", "-", "--", "--"]
    assert lines[1].get_linewidth() > lines[2].get_linewidth()


# Errors: one line naming the file (and line), exit status 2, no traceback


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "metrics file not found: {path}"),
        ('{"event": "round", "round": 1}\n{"event": "eval_skipped", "round": 1}\n', "{path}: no eval events"),
        ('{"event": "round", "round": 1}\n\n{"event": "eval", "round": 1,\n', "{path}:3: invalid JSON: "),
        ("not json\n", "{path}:1: invalid JSON: Expecting value"),
        ("[1, 2]\n", "{path}:1: expected a JSON object, got list"),
        ('{"event": "eval", "round": 1, "model": "federated", "loss": 1.0}\n', "{path}:1: eval event has no numeric"),
    ],
    ids=["missing", "no-evals", "truncated-json", "not-json", "not-object", "no-accuracy"],
)
def test_cli_reports_a_bad_metrics_file_in_one_line(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    output = tmp_path / "curves.png"
    done = run_plot(str(path), "-o", str(output))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"plot_metrics.py: error: {expected.format(path=path)}")
    assert not output.exists()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--labels", "a,b"], "--labels gives 2 labels for 1 metrics files"),
        (["--models", "dave"], "no run has a model named dave (models: federated)"),
        (["-o", "{tmp}/curves.xyz"], "cannot write {tmp}/curves.xyz: unknown image format '.xyz', use one of "),
        (["-o", "{tmp}/absent/curves.png"], "cannot write {tmp}/absent/curves.png: No such file or directory"),
    ],
    ids=["labels-count", "unknown-model", "unknown-format", "missing-directory"],
)
def test_main_reports_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], expected: str
) -> None:
    metrics = write_lines(tmp_path / "m.jsonl", evaluation(1, "federated", 0.5, 1.0))
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    output = [] if "-o" in arguments else ["-o", str(tmp_path / "curves.png")]
    assert plot_metrics.main([str(metrics), *output, *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"plot_metrics.py: error: {expected.format(tmp=tmp_path)}")
    assert captured.err.count("\n") == 1
