"""notebooks/Asynchronous-federated-learning-on-MNIST.ipynb runs top to bottom, for real.

The notebook is executed in memory with nbclient, shortened to a few rounds
through SYNCFED_NOTEBOOK_ROUNDS, which the kernel inherits from this process.
It starts and stops its own worker processes on 127.0.0.1; a failing cell
makes the kernel shut down, and ipykernel then stops its child processes.
The saved notebook and its outputs from the full run are never written to.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest
from conftest import REPO

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = REPO / "notebooks" / "Asynchronous-federated-learning-on-MNIST.ipynb"
ROUNDS = 3
CELL_TIMEOUT = 300  # seconds per cell, starting worker processes included
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINERS = ("alice", "bob", "charlie")


def _text(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output["output_type"] == "stream")


def _pngs(cell: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


def _cell(notebook: nbformat.NotebookNode, marker: str) -> nbformat.NotebookNode:
    """The one code cell whose source contains ``marker``."""
    matches = [cell for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source]
    assert len(matches) == 1, f"{len(matches)} code cells contain {marker!r}"
    return matches[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The notebook after a real run of ROUNDS rounds, executed in a copy in memory."""
    before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None  # only this run's outputs are checked
    previous = os.environ.get("SYNCFED_NOTEBOOK_ROUNDS")
    os.environ["SYNCFED_NOTEBOOK_ROUNDS"] = str(ROUNDS)  # the kernel inherits this environment
    try:
        client = nbclient.NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        client.execute()  # raises CellExecutionError when a cell fails
    finally:
        if previous is None:
            os.environ.pop("SYNCFED_NOTEBOOK_ROUNDS", None)
        else:
            os.environ["SYNCFED_NOTEBOOK_ROUNDS"] = previous
    nbformat.write(notebook, tmp_path_factory.mktemp("notebook") / NOTEBOOK.name)  # for a look after a failure
    assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before, "the saved notebook was modified"
    return notebook


def test_every_cell_ran_without_errors(executed: nbformat.NotebookNode) -> None:
    code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    for cell in code_cells:
        assert not [output for output in cell.outputs if output["output_type"] == "error"]


def test_workers_report_what_they_hold(executed: nbformat.NotebookNode) -> None:
    text = _text(_cell(executed, "Hello()"))
    assert "alice (trainer) holds 518 digits images of shape (1, 8, 8), digits 0-3" in text
    assert "bob (trainer) holds 391 digits images" in text
    assert "charlie (trainer) holds 383 digits images" in text
    assert "testing (evaluator) holds 360 digits images of shape (1, 8, 8), digits 0-9" in text


def test_training_prints_the_final_evaluation(executed: nbformat.NotebookNode) -> None:
    text = _text(_cell(executed, 'await train(config, "federated")'))
    assert f"Evaluation at round {ROUNDS}/{ROUNDS}:" in text
    for name in TRAINERS:
        assert re.search(rf"Model update {name}: Average loss: \d+\.\d{{4}}, Accuracy: \d+/360 ", text)
    match = re.search(rf"Final federated accuracy at round {ROUNDS}: (\d+\.\d\d)%", text)
    assert match is not None, text
    assert 0.0 < float(match.group(1)) <= 100.0


def test_prediction_groups_table_has_a_row_per_model_and_round(executed: nbformat.NotebookNode) -> None:
    text = _text(_cell(executed, "groups = {"))
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s", line)]
    # EVAL_EVERY is 1 for a short run: every round, each worker's update and the federated model.
    assert [(row[0], row[1]) for row in rows] == [
        (str(round_number), model) for round_number in range(1, ROUNDS + 1) for model in (*TRAINERS, "federated")
    ]
    for row in rows:
        shares = [int(share.rstrip("%")) for share in row[2:5]]
        assert 98 <= sum(shares) <= 102  # rounded shares of one whole
    first_alice = rows[0]
    assert first_alice[1] == "alice" and first_alice[2] == "100%"  # after round 1 alice predicts only 0-3


def test_centralized_comparison_prints_both_accuracies(executed: nbformat.NotebookNode) -> None:
    text = _text(_cell(executed, "global_accuracy(events)"))
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s+\d", line)]
    assert [row[0] for row in rows] == [str(round_number) for round_number in range(1, ROUNDS + 1)]
    assert re.search(rf"Final accuracy at round {ROUNDS}: federated \d+\.\d\d%, centralized \d+\.\d\d%", text)


def test_the_three_charts_are_pngs(executed: nbformat.NotebookNode) -> None:
    charts = [png for cell in executed.cells if cell.cell_type == "code" for png in _pngs(cell)]
    assert len(charts) == 3  # holdings, accuracy and loss, federated vs centralized
    assert all(png.startswith(PNG_MAGIC) and len(png) > 5_000 for png in charts)


def test_workers_are_stopped_at_the_end(executed: nbformat.NotebookNode) -> None:
    assert _text(executed.cells[-1]).strip() == "Workers stopped"
