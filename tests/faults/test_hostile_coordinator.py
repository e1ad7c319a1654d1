"""One faulty or hostile worker must neither end a run nor poison its model (issue 14, items 5 and 6).

Real workers on 127.0.0.1 train with a real coordinator (the command line's
``main``, in process, so its exit status and stderr can be checked); the
faulty peer is either a real worker started with the ``--attack nan`` test
hook or a small fake worker in this process that speaks the protocol: it
greets like a real worker and answers ``fit`` with crafted bytes (int8
codes whose legal scale overflows, fp16 NaN codes, inflated example counts),
or answers ``hello`` with an error or an impossible claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import THREADS, running_workers
from safetensors import safe_open
from safetensors.numpy import save_file
from units import MS
from websockets.asyncio.server import ServerConnection, serve

from syncfed.absorption import FragmentSink
from syncfed.checkpoint import CHECKPOINT_FILE
from syncfed.cli.coordinator import main as client_main
from syncfed.coordinator import _mismatch
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Error,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Ping,
    Pong,
    Propose,
    decode,
    encode,
    encode_fragments,
)

PROGRAM = "run_websocket_client.py: error: "
#: Every run: two short rounds, failures given up on quickly, nothing written outside tmp_path.
QUICK = [
    *("--evaluator", "", "--no-progress", "--no-registry", "--federate-after-n-batches", "2", "--min-workers", "2"),
    *("--max-round-retries", "0", "--round-timeout", "30", "--connect-timeout", "10", "--reconnect-max-delay", "0.2"),
]


@pytest.fixture(scope="module")
def workers(digits_workers: dict[str, WorkerProcess]) -> Iterator[dict[str, WorkerProcess]]:
    """alice and bob, honest: the session's, so that only nan starts here; nan, a real worker whose
    updates are all NaN (``--attack nan``)."""
    with running_workers([("nan", [*THREADS, "--digits", "0,1,2,3,4,5,6,7,8,9", "--attack", "nan"])]) as started:
        yield {"alice": digits_workers["alice"], "bob": digits_workers["bob"], **started}


@pytest.fixture(scope="module")
def alice_info(workers: dict[str, WorkerProcess]) -> Info:
    async def greet() -> Info:
        async with WorkerLink(
            "alice", workers["alice"].uri, max_message_size=2**26, connect_timeout=10_000 * MS
        ) as client:
            info = await client.request(Hello())
            assert isinstance(info, Info)
            return info

    return asyncio.run(greet())


# -- A fake worker in a thread of its own ----------------------------------------------------

#: Answers one decoded request (its id and message) with the bytes to send back: one frame, or the fragments
#: of a streamed message (websockets sends an iterable as one fragmented message).
Answer = Callable[[int, Any], bytes | Iterable[bytes]]


@contextlib.contextmanager
def fake_worker(answer: Answer) -> Iterator[str]:
    """A websocket server on 127.0.0.1 that answers every request with ``answer``; yields its URI."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        async for data in connection:
            envelope = decode(data if isinstance(data, bytes) else data.encode())
            await connection.send(answer(envelope.id, envelope.message))

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            ready.set_result(f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}")
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 10_000 * MS), loop).result(
            15_000 * MS
        )
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10_000 * MS)


def packed(request_id: int, kind: str, body: dict[str, Any]) -> bytes:
    """An envelope built by hand, so its body can hold what a valid message object cannot."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)


def greeter(info: Info, fit: Callable[[int, Fit], bytes | Iterable[bytes]]) -> Answer:
    """Greets with ``info``, answers pings, accepts proposals, and answers fit requests with ``fit`` (held first
    when asked to)."""
    held: dict[int, Fit] = {}

    def answer(request_id: int, message: Any) -> bytes | Iterable[bytes]:
        if isinstance(message, Hello):
            return encode(request_id, info)
        if isinstance(message, Ping):
            return encode(request_id, Pong())
        if isinstance(message, Propose):  # a worker without a site policy accepts every job
            return encode(request_id, Accepted())
        if isinstance(message, Fetch):
            return fit(request_id, held.pop(message.token))
        assert isinstance(message, Fit), message
        if message.plan.hold:
            held[request_id] = message
            return encode(request_id, FitHeld(request_id))
        return fit(request_id, message)

    return answer


def tampered_update(tamper: Callable[[str, dict[str, Any]], None], num_examples: int | None = None) -> Callable:
    """Fit replies of a zero update (the global weights when the plan asks for weights) with ``tamper`` applied."""

    def fit(request_id: int, message: Fit) -> bytes:
        weights = {
            name: np.zeros_like(array) if message.plan.delta else np.array(array)
            for name, array in message.weights.items()
        }
        count = num_examples if num_examples is not None else 100
        body = FitResult(weights, 1, 0.5).to_body()
        body["num_examples"] = count
        body["weights"] = {name: dict(tensor, data=bytes(tensor["data"])) for name, tensor in body["weights"].items()}
        for name, tensor in body["weights"].items():
            tamper(name, tensor)
        return packed(request_id, "fit_result", body)

    return fit


def int8_overflow(name: str, tensor: dict[str, Any]) -> None:
    """Every float tensor as int8 codes 255 with scale 1e300: finite, legal numbers that decode past float32."""
    if tensor["dtype"] != "float32":
        return
    size = int(np.prod(tensor["shape"]))
    tensor.update(data=bytes([255]) * size, encoding="int8", scale=1e300, offset=0.0)


def fp16_nan(name: str, tensor: dict[str, Any]) -> None:
    """Every float tensor as fp16 codes, all of them NaN."""
    if tensor["dtype"] != "float32":
        return
    size = int(np.prod(tensor["shape"]))
    tensor.update(data=np.full(size, np.nan, dtype="<f2").tobytes(), encoding="fp16")


# -- Helpers --------------------------------------------------------------------------------


def train(*arguments: str) -> int:
    return client_main([*QUICK, *arguments])


def rounds(metrics: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [event for event in events if event["event"] == "round"]


def finite_file(path: Path) -> bool:
    with safe_open(str(path), framework="np") as handle:
        return all(np.isfinite(handle.get_tensor(name)).all() for name in handle.keys())


def assert_dropped(tmp_path: Path, code: int, err: str, bad: str, honest: set[str], rounds_run: int = 2) -> None:
    """The run finished with the honest workers only, listed ``bad`` as failed, and saved finite files."""
    assert code == 0, err
    records = rounds(tmp_path / "metrics.jsonl")
    assert len(records) == rounds_run
    for record in records:
        assert set(record["workers"]) == honest, record
        assert bad in record["failed"], record
    assert finite_file(tmp_path / "model.pt")
    assert finite_file(tmp_path / "checkpoints" / CHECKPOINT_FILE)


def outputs(tmp_path: Path) -> list[str]:
    return [
        *("--metrics-out", str(tmp_path / "metrics.jsonl"), "--save-model", str(tmp_path / "model.pt")),
        *("--checkpoint-dir", str(tmp_path / "checkpoints")),
    ]


# -- Item 5: non-finite updates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="fedavg"),
        pytest.param(["--receive-slots", "1"], id="receive-slots"),
        pytest.param(["--strategy", "median"], id="median"),
        pytest.param(["--strategy", "scaffold"], id="scaffold"),
        pytest.param(["--strategy", "fedadam", "--compress", "int8"], id="fedadam-int8"),
    ],
)
def test_a_worker_sending_nan_is_dropped_and_the_run_saves_a_finite_model(
    workers: dict[str, WorkerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    names = ",".join(f"{name}={workers[name].uri}" for name in ("alice", "bob", "nan"))
    code = train("--workers", names, "--training-rounds", "2", *outputs(tmp_path), *mode)
    out, err = capsys.readouterr()
    assert_dropped(tmp_path, code, err, "nan", {"alice", "bob"})
    reason = rounds(tmp_path / "metrics.jsonl")[0]["failed"]["nan"]
    assert reason.startswith("invalid update: tensor ") and "non-finite values (nan)" in reason, reason


def test_async_mode_drops_nan_updates_and_keeps_a_finite_model(
    workers: dict[str, WorkerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ",".join(f"{name}={workers[name].uri}" for name in ("alice", "bob", "nan"))
    code = train(
        *("--workers", names, "--training-rounds", "3", "--mode", "async", "--buffer-size", "2"),
        *outputs(tmp_path),
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    records = rounds(tmp_path / "metrics.jsonl")
    assert len(records) == 3 and all("nan" not in record["workers"] for record in records)
    assert any("nan" in record["failed"] for record in records)
    assert finite_file(tmp_path / "model.pt") and finite_file(tmp_path / "checkpoints" / CHECKPOINT_FILE)


def one_nan(name: str, tensor: dict[str, Any]) -> None:
    """One NaN in each float tensor: its L2 norm is NaN, which no norm check refuses (NaN > clip is false)."""
    if tensor["dtype"] == "float32":
        values = np.frombuffer(tensor["data"], dtype="<f4").copy()
        values[0] = np.nan
        tensor["data"] = values.tobytes()


@pytest.mark.parametrize(
    ("settings", "tamper"),
    [
        pytest.param(["--compress", "int8"], int8_overflow, id="int8-scale-overflows"),
        pytest.param(["--compress", "fp16"], fp16_nan, id="fp16-nan"),
        pytest.param(["--dp", "central", "--dp-clip", "0.05", "--dp-noise-multiplier", "0.1"], one_nan, id="dp"),
    ],
)
def test_updates_that_decode_to_non_finite_values_are_that_workers_failure(
    workers: dict[str, WorkerProcess],
    alice_info: Info,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    settings: list[str],
    tamper: Callable[[str, dict[str, Any]], None],
) -> None:
    info = dataclasses.replace(alice_info, worker_id="mallory")
    with fake_worker(greeter(info, tampered_update(tamper))) as uri:
        names = f"alice={workers['alice'].uri},bob={workers['bob'].uri},mallory={uri}"
        code = train("--workers", names, "--training-rounds", "2", *settings, *outputs(tmp_path))
    _, err = capsys.readouterr()
    assert_dropped(tmp_path, code, err, "mallory", {"alice", "bob"})
    assert "non-finite values" in rounds(tmp_path / "metrics.jsonl")[0]["failed"]["mallory"]


# -- Item 6: counts a worker claims ---------------------------------------------------------------


@pytest.mark.parametrize("claim", [pytest.param(1000, id="1000x-its-hello"), pytest.param(2**62, id="2^62")])
def test_an_update_claiming_more_examples_than_the_worker_holds_is_refused(
    workers: dict[str, WorkerProcess],
    alice_info: Info,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    claim: int,
) -> None:
    """Weighted by a huge count, one update would outweigh every honest one in FedAvg."""
    info = dataclasses.replace(alice_info, worker_id="mallory")
    count = claim * info.num_examples if claim < 2**32 else claim
    with fake_worker(greeter(info, tampered_update(lambda name, tensor: None, num_examples=count))) as uri:
        names = f"alice={workers['alice'].uri},bob={workers['bob'].uri},mallory={uri}"
        code = train("--workers", names, "--training-rounds", "2", *outputs(tmp_path))
    _, err = capsys.readouterr()
    assert_dropped(tmp_path, code, err, "mallory", {"alice", "bob"})


def test_an_error_reply_to_hello_from_one_of_three_workers_leaves_the_quorum_to_decide(
    workers: dict[str, WorkerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(request_id: int, message: Any) -> bytes:
        return encode(request_id, Error("internal", "the worker failed while serving the request"))

    with fake_worker(refuse) as uri:
        names = f"alice={workers['alice'].uri},bob={workers['bob'].uri},mallory={uri}"
        code = train("--workers", names, "--training-rounds", "2", *outputs(tmp_path))
    out, err = capsys.readouterr()
    assert_dropped(tmp_path, code, err, "mallory", {"alice", "bob"})
    assert "Worker mallory is unreachable (bad reply to hello: mallory answered with error internal" in out


def test_a_hello_claiming_2_to_the_63_examples_under_secure_agg_drops_that_worker(
    workers: dict[str, WorkerProcess], alice_info: Info, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = dataclasses.replace(alice_info, worker_id="mallory").to_body()
    body["histogram"] = [2**63, *body["histogram"][1:]]

    def boast(request_id: int, message: Any) -> bytes:
        assert isinstance(message, Hello), message
        return packed(request_id, "info", body)

    with fake_worker(boast) as uri:
        names = f"alice={workers['alice'].uri},bob={workers['bob'].uri},mallory={uri}"
        code = train(
            *("--workers", names, "--training-rounds", "2", "--secure-agg"),
            *outputs(tmp_path),
        )
    out, err = capsys.readouterr()
    assert_dropped(tmp_path, code, err, "mallory", {"alice", "bob"})
    assert "Worker mallory is unreachable (bad reply to hello: histogram of 92233720368547" in out
    assert "examples exceeds limit of 4294967296" in out


# -- Issue 20: updates folded from their fragments ------------------------------------------------


def test_streamed_updates_folded_as_they_arrive_give_the_model_of_whole_updates_bit_for_bit(
    workers: dict[str, WorkerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digits CNN's updates (2.4 MB) come in 1 MiB fragments: by default each is folded as they arrive."""
    folded: list[int] = []
    commit = FragmentSink.commit
    monkeypatch.setattr(FragmentSink, "commit", lambda sink: (folded.append(sink.reply.num_examples), commit(sink))[1])
    names = f"alice={workers['alice'].uri},bob={workers['bob'].uri}"
    for run, flags in (("fragments", []), ("whole", ["--whole-updates"])):
        code = train("--workers", names, "--training-rounds", "2", "--save-model", str(tmp_path / run), *flags)
        assert code == 0
        assert len(folded) == 4  # two workers in two rounds, all in the first run
    with (
        safe_open(str(tmp_path / "fragments"), framework="np") as ours,
        safe_open(str(tmp_path / "whole"), "np") as theirs,
    ):
        assert list(ours.keys()) == list(theirs.keys())
        for name in ours.keys():
            assert np.array_equal(ours.get_tensor(name), theirs.get_tensor(name)), name


def streamed_update(spoil: str) -> Callable[[int, Fit], Iterator[bytes]]:
    """Fit replies of the global weights, streamed in 64 KiB fragments: with a NaN in the last fragment
    (``late-nan``), or broken off half way (``cut``: the connection fails, as when a worker dies mid-send)."""

    def fit(request_id: int, message: Fit) -> Iterator[bytes]:
        weights = {name: np.array(array) for name, array in message.weights.items()}
        if spoil == "late-nan":
            weights[list(weights)[-1]].reshape(-1)[-1] = np.nan
        fragments = [
            bytes(part)
            for part in encode_fragments(request_id, FitResult(weights, 100, 0.5), chunk_size=2**16).fragments()
        ]
        yield from fragments[: len(fragments) // 2]
        if spoil == "cut":
            raise ConnectionAbortedError("mallory dies mid-send")
        yield from fragments[len(fragments) // 2 :]

    return fit


@pytest.mark.parametrize("spoil", ["late-nan", "cut"])
def test_an_update_that_breaks_off_after_part_of_it_was_folded_makes_the_round_train_again_whole(
    workers: dict[str, WorkerProcess],
    alice_info: Info,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spoil: str,
) -> None:
    """Part of mallory's update is in the sums and cannot be taken out bit for bit: round 1 is trained
    again and folded from whole updates, mallory's are decoded whole from then on, and the run ends where
    it ends with --whole-updates throughout."""
    info = dataclasses.replace(alice_info, worker_id="mallory")
    saved = {}
    with fake_worker(greeter(info, streamed_update(spoil))) as uri:
        names = f"alice={workers['alice'].uri},bob={workers['bob'].uri},mallory={uri}"
        for run, flags in (("fragments", []), ("whole", ["--whole-updates"])):
            (tmp_path / run).mkdir()
            code = train("--workers", names, "--training-rounds", "2", *outputs(tmp_path / run), *flags)
            out, err = capsys.readouterr()
            assert_dropped(tmp_path / run, code, err, "mallory", {"alice", "bob"})
            events = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            refolds = [event for event in events if event["event"] == "round_refold"]
            if run == "fragments":
                # Once: mallory's later updates are decoded whole, and refused as in the --whole-updates run.
                assert [(event["round"], list(event["poisoned"])) for event in refolds] == [(1, ["mallory"])]
                assert out.count("a streamed update broke off after part of it was folded (mallory: ") == 1, out
                assert "training the round again, folding whole updates; theirs are decoded whole from now on" in out
            else:
                assert refolds == []
            with safe_open(str(tmp_path / run / "model.pt"), framework="np") as handle:
                saved[run] = {name: handle.get_tensor(name) for name in handle.keys()}
    assert saved["fragments"].keys() == saved["whole"].keys()
    for name, array in saved["whole"].items():
        assert np.array_equal(saved["fragments"][name], array), name


# -- Item 5: resuming from a bad checkpoint ---------------------------------------------------------


def rewrite(path: Path, change: Callable[[dict[str, np.ndarray], dict[str, Any]], None]) -> None:
    """Load the checkpoint at ``path``, let ``change`` edit its tensors and metadata, write it back."""
    with safe_open(str(path), framework="np") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    state = json.loads(metadata["syncfed"])
    change(tensors, state)
    metadata["syncfed"] = state if isinstance(state, str) else json.dumps(state)
    save_file(tensors, str(path), metadata)


def first_float(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> str:
    return next(name for name in state["order"] if tensors[name].dtype.kind == "f")


def set_nan(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = first_float(tensors, state)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan


def drop_tensor(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = first_float(tensors, state)
    del tensors[name]
    state["order"].remove(name)


def reshape(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = first_float(tensors, state)
    tensors[name] = np.zeros((3, 3), dtype=tensors[name].dtype)


def widen(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = first_float(tensors, state)
    tensors[name] = tensors[name].astype(np.float64)


def server_nan(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = next(name for name in tensors if name.startswith("syncfed.server/"))
    tensors[name] = np.full_like(tensors[name], np.inf)


def server_reshape(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    name = next(name for name in tensors if name.startswith("syncfed.server/"))
    tensors[name] = np.zeros(7, dtype=tensors[name].dtype)


def metadata(**changes: Any) -> Callable[[dict[str, np.ndarray], dict[str, Any]], None]:
    return lambda tensors, state: state.update(changes)


@pytest.fixture(scope="module")
def checkpoint(workers: dict[str, WorkerProcess], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy checkpoint after round 1 of alice and bob with FedAvgM (so it holds server state)."""
    directory = tmp_path_factory.mktemp("healthy") / "checkpoints"
    names = f"alice={workers['alice'].uri},bob={workers['bob'].uri}"
    code = train("--workers", names, "--training-rounds", "1", "--checkpoint-dir", str(directory), *FEDAVGM)
    assert code == 0
    return directory


FEDAVGM = ["--strategy", "fedavgm", "--server-momentum", "0.9"]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(set_nan, id="nan-tensor"),
        pytest.param(drop_tensor, id="missing-tensor"),
        pytest.param(reshape, id="wrong-shape"),
        pytest.param(widen, id="wrong-dtype"),
        pytest.param(server_nan, id="server-state-inf"),
        pytest.param(server_reshape, id="server-state-wrong-shape"),
        pytest.param(metadata(round="1"), id="round-as-text"),
        pytest.param(metadata(round=-1), id="negative-round"),
        pytest.param(metadata(round=1.5), id="fractional-round"),
        pytest.param(metadata(seed=-3), id="negative-seed"),
        pytest.param(metadata(identity=["model"]), id="identity-not-an-object"),
        pytest.param(metadata(order="conv1.weight"), id="order-not-a-list"),
        pytest.param(metadata(metrics_size=-5), id="negative-metrics-size"),
        pytest.param(metadata(strategy_state={"name": 7}), id="strategy-name-not-text"),
        pytest.param(metadata(strategy_state=[1]), id="strategy-state-not-an-object"),
        pytest.param("garbage-json", id="garbage-json"),
        pytest.param("truncated", id="truncated-file"),
    ],
)
def test_resuming_from_a_corrupted_checkpoint_exits_9_with_one_line(
    workers: dict[str, WorkerProcess],
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Any,
) -> None:
    directory = tmp_path / "checkpoints"
    shutil.copytree(checkpoint, directory)
    path = directory / CHECKPOINT_FILE
    if corrupt == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif corrupt == "garbage-json":
        rewrite(path, lambda tensors, state: None)
        with safe_open(str(path), framework="np") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        save_file(tensors, str(path), {"format": "pt", "syncfed": "{not json"})
    else:
        rewrite(path, corrupt)
    capsys.readouterr()
    names = f"alice={workers['alice'].uri},bob={workers['bob'].uri}"
    code = train(
        *("--workers", names, "--training-rounds", "2", "--checkpoint-dir", str(directory), "--resume"), *FEDAVGM
    )
    out, err = capsys.readouterr()
    assert code == 9, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROGRAM), err
    assert "Traceback" not in err


# A regression test for a defect found in review: updates that do not fit the model were not named.


def test_updates_that_do_not_fit_the_model_are_named() -> None:
    model = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert _mismatch(dict(model), model) is None
    assert _mismatch({"a": model["a"]}, model) == "tensors ['b'] do not match the model's"
    wrong = {"a": np.zeros((3, 2), np.float32), "b": model["b"]}
    assert _mismatch(wrong, model) == "tensor a is float32[3, 2], the model's is float32[2, 3]"
