"""A worker that serves a user's own data: a real worker process over an ``.npz`` of arrays, driven over websockets.

Hello describes the data (schema, class histogram); fit, evaluate and
describe carry the federation's data plan and the worker prepares its
examples as the plan says; requests without a plan, or with a plan that does
not fit, are refused with one line. A bad file stops the worker at start-up
with one line and no traceback. The Python API starts a worker in this
process's event loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from conftest import REPO, THREADS, running_workers
from units import MS

from syncfed import load_data, start_worker
from syncfed.data.arrays import ArraySource
from syncfed.exceptions import RemoteError
from syncfed.models import get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    DataPlan,
    DataSchema,
    Describe,
    EvalResult,
    Evaluate,
    Feature,
    Fit,
    FitResult,
    Hello,
    Info,
    ModelLayout,
    TrainingPlan,
)
from syncfed.shaped_models import TabularMLP

T = TypeVar("T")

TEST_TIMEOUT = 120_000 * MS
CLI_TIMEOUT = 120_000 * MS
LIMIT = 64 * 2**20

#: Examples of the site's arrays: two classes a line through the first two features separates.
COUNT = 240
FEATURES = ("age", "dose", "weight", "height")
PLAN = DataPlan(
    "arrays",
    (len(FEATURES),),
    ("sick", "well"),
    FEATURES,
    mean=(0.5, 0.0, 0.0, 0.0),
    std=(2.0, 1.0, 1.0, 1.0),
)
FIT = TrainingPlan(round=1, batch_size=16, num_batches=15, lr=0.1, seed=3)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


def site_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(COUNT, len(FEATURES))).astype(np.float32)
    y = np.where(x[:, 0] + x[:, 1] > 0, "sick", "well")
    return x, y


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("own-data") / "north.npz"
    x, y = site_arrays()
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def north(site: Path) -> Iterator[WorkerProcess]:
    """A trainer over the whole file (no validation hold-out), so every example is scored."""
    with running_workers([("north", [*THREADS, "--data", f"npz:{site}", "--val-fraction", "0"])]) as workers:
        yield workers["north"]


def fresh_weights(plan: DataPlan = PLAN, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(TabularMLP(plan.input_shape, plan.num_classes))


def link(worker: WorkerProcess | str) -> WorkerLink:
    uri = worker if isinstance(worker, str) else worker.uri
    return WorkerLink("north", uri, max_message_size=LIMIT, connect_timeout=30_000 * MS)


def test_hello_describes_the_data_and_its_classes(north: WorkerProcess) -> None:
    async def scenario() -> Info:
        async with link(north) as peer:
            info = await peer.request(Hello())
            assert isinstance(info, Info)
            return info

    info = run(scenario())
    _, y = site_arrays()
    assert info.dataset == "arrays" and info.input_shape == (4,) and info.num_classes == 2
    assert info.schema == DataSchema("arrays", (4,), ("sick", "well"))
    assert info.histogram == (int(np.sum(y == "sick")), int(np.sum(y == "well")))
    assert "mlp" in info.models and "cnn" in info.models and "digits-cnn" in info.models


def test_fits_with_the_plan_train_and_evaluation_counts_each_class(north: WorkerProcess) -> None:
    async def scenario() -> tuple[list[float], dict[str, np.ndarray], EvalResult]:
        losses = []
        weights = fresh_weights()
        async with link(north) as peer:
            await peer.request(Hello())
            for round_ in (1, 2, 3):
                plan = TrainingPlan(round=round_, batch_size=16, num_batches=15, lr=0.1, seed=round_)
                reply = await peer.request(Fit("mlp", weights, plan, data=PLAN))
                assert isinstance(reply, FitResult) and reply.num_examples == COUNT
                losses.append(reply.loss)
                weights = reply.weights
            scored = await peer.request(Evaluate("mlp", weights, 64, data=PLAN))
            assert isinstance(scored, EvalResult)
            return losses, weights, scored

    losses, weights, scored = run(scenario())
    assert losses[2] < losses[0], losses
    # The same score, computed here with plain torch over the arrays prepared as the plan says.
    x, y = site_arrays()
    prepared = ArraySource(x, y, feature_names=FEATURES).prepare(PLAN)
    model = TabularMLP(PLAN.input_shape, 2)
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in weights.items()})
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.asarray(prepared.images))).argmax(dim=1).numpy()
    labels = prepared.labels
    assert scored.num_examples == COUNT and scored.correct == int(np.sum(predicted == labels))
    assert scored.class_counts == tuple(int(np.sum(labels == k)) for k in (0, 1))
    assert scored.class_correct == tuple(int(np.sum((labels == k) & (predicted == k))) for k in (0, 1))
    assert scored.correct / COUNT > 0.8


def test_requests_without_the_plan_or_with_one_that_does_not_fit_are_refused(north: WorkerProcess) -> None:
    lacking = DataPlan("arrays", (4,), ("sick", "unknown"), FEATURES)
    wider = DataPlan("arrays", (5,), ("sick", "well"))

    async def refusal(peer: WorkerLink, request: Fit | Evaluate | Describe) -> tuple[str, str]:
        with pytest.raises(RemoteError) as error:
            await peer.request(request)
        return error.value.code, error.value.reason

    async def scenario() -> list[tuple[str, str]]:
        weights = fresh_weights()
        async with link(north) as peer:
            await peer.request(Hello())
            return [
                await refusal(peer, Fit("mlp", weights, FIT)),
                await refusal(peer, Evaluate("digits-cnn", {}, 64)),
                await refusal(peer, Fit("mlp", weights, FIT, data=lacking)),
                await refusal(peer, Evaluate("mlp", fresh_weights(wider), 64, data=wider)),
                await refusal(peer, Describe("cnn", PLAN)),
                await refusal(peer, Fit("nope", weights, FIT, data=PLAN)),
            ]

    no_plan = (
        "incompatible",
        "this worker holds its own data (arrays): requests need the federation's data plan; see docs/data.md",
    )
    assert run(scenario()) == [
        no_plan,
        no_plan,
        ("incompatible", f"{north_file(north)}: class 'well' of this site is not among the agreed classes"),
        ("incompatible", f"{north_file(north)}: inputs of shape (4,), the plan's are (5,)"),
        (
            "incompatible",
            "model 'cnn' does not suit the data plan: cannot build the model:"
            " cnn needs images of shape (channels, height, width), not (4,)",
        ),
        (
            "unknown_model",
            "model 'nope' is not registered on this worker (it has mnist-cnn, digits-cnn, mlp, cnn, linear, resnet18;"
            " start it with --model to add one)",
        ),
    ]


def north_file(worker: WorkerProcess) -> str:
    """The data file the worker named in its start-up line."""
    line = next(line for line in worker.output if " from npz:" in line)
    return line.split(" from npz:")[1].split(" ")[0]


def test_describe_with_the_plan_gives_the_shaped_models_layout(north: WorkerProcess) -> None:
    async def scenario() -> ModelLayout:
        async with link(north) as peer:
            await peer.request(Hello())
            layout = await peer.request(Describe("mlp", PLAN))
            assert isinstance(layout, ModelLayout)
            return layout

    layout = run(scenario())
    expected = fresh_weights()
    assert [(name, shape) for name, _, shape in layout.tensors] == [(n, a.shape) for n, a in expected.items()]


def test_a_bad_file_stops_the_worker_before_it_listens(tmp_path: Path) -> None:
    x, _ = site_arrays()
    no_labels = tmp_path / "no-labels.npz"
    np.savez(no_labels, x=x)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path.read_bytes(no_labels)[:100])
    cases = {
        no_labels: f"{no_labels}: no array 'y'; the file holds 'x'",
        truncated: f"{truncated}: not an .npz file: File is not a zip file",
    }
    for path, line in cases.items():
        started = subprocess.run(
            [sys.executable, "-m", "syncfed.cli.worker", "--id", "north", "--port", "0", "--data", f"npz:{path}"],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd=REPO,
        )
        # The exit-code table's status for a data problem (syncfed.cli.common.EXIT_CODES).
        assert (started.returncode, started.stderr) == (3, f"run_websocket_server.py: error: {line}\n")
        assert "listening" not in started.stdout


def test_the_python_api_serves_arrays_from_this_event_loop() -> None:
    x, y = site_arrays(seed=1)

    async def scenario() -> tuple[Info, FitResult]:
        source = load_data((x, y, {"feature_names": FEATURES}))
        async with await start_worker("notebook", source, host="127.0.0.1", port=0, val_fraction=0.25) as worker:
            assert worker.uri.startswith("ws://127.0.0.1:") and not worker.uri.endswith(":0")
            async with link(worker.uri) as peer:
                info = await peer.request(Hello())
                reply = await peer.request(Fit("mlp", fresh_weights(), FIT, data=PLAN))
        assert isinstance(info, Info) and isinstance(reply, FitResult)
        return info, reply

    info, reply = run(scenario())
    assert (info.worker_id, info.validation_size, reply.num_examples) == ("notebook", COUNT // 4, COUNT - COUNT // 4)
    assert info.schema is not None and info.schema.features == tuple(Feature(name) for name in FEATURES)
