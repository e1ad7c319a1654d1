"""The safety net of issue 15: paths the docs promise that no other test ran.

Each test here was written against a deliberate bug that passed the rest of
the suite (the report of issue 15 names them). Most drive a real
:class:`Coordinator` against fake workers served in this process on
127.0.0.1, so that they are fast and deterministic: a fake greets as a
digits trainer (or evaluator) and answers each request as its test says.
The training-abandon test needs a real worker process, since the thread it
stops lives there.

Every duration is a multiple of :data:`UNIT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
import torch
from conftest import THREADS, running_workers
from torch import nn
from units import MS
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from syncfed import auth
from syncfed.aggregation import RunningMean, fedavg, mean
from syncfed.cli.coordinator import main as coordinator_main
from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult
from syncfed.exceptions import AuthenticationFailed, QuorumNotMet, WorkerUnavailable
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.net.transport import receive, receive_message, send_message
from syncfed.protocol import (
    Accepted,
    Error,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Message,
    Propose,
    TrainingPlan,
    encode_fragments,
)

T = TypeVar("T")

#: The unit of time: every duration below is a multiple of it.
UNIT = 100 * MS
#: Bound of one test's event loop.
TEST_TIMEOUT = 300 * UNIT
MiB = 2**20
TOKEN = b"the-shared-token-of-this-project"
WRONG_TOKEN = b"a-token-the-impostor-made-up!!!!"


class TinyNet(nn.Module):
    """A linear model for 8x8 digits (650 parameters): the fakes' model, cheap to send."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class WideNet(nn.Module):
    """A model whose tensors span several fold blocks (65,536 elements) and end mid-block."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(64, 3125)  # 200,000 weights: three whole blocks and a part
        self.head = nn.Linear(3125, 10)  # 31,250 weights: under one block
        self.odd = nn.Parameter(torch.zeros(70_001))  # one block and 4,465 more; unused by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(x.flatten(1))))


TINY = f"{TinyNet.__module__}:TinyNet"
WIDE = f"{WideNet.__module__}:WideNet"


def run(coroutine: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


# -- Fake workers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A reply body packed by hand, so that it can be what no message class lets one build."""

    kind: str
    body: dict[str, Any]


#: What a fake answers a request with: a message, a hand-packed reply, or None for never.
Reply = Message | Raw | None
FitHandler = Callable[["Fake", Fit], Awaitable[Reply]]


def shifted(fit: Fit, shift: Mapping[str, np.ndarray], num_examples: int, loss: float = 0.5) -> FitResult:
    """The reply of a worker whose training moves every tensor by ``shift`` (as a delta when the plan asks)."""
    trained = {name: shift[name] if fit.plan.delta else array + shift[name] for name, array in fit.weights.items()}
    return FitResult(trained, num_examples, loss)


async def trains(fake: Fake, fit: Fit) -> Reply:
    """A well-behaved trainer: adds its ``step`` to every weight, after its ``delay``."""
    await asyncio.sleep(fake.delay)
    shift = {name: np.full_like(array, fake.step) for name, array in fit.weights.items()}
    return shifted(fit, shift, fake.num_examples, loss=fake.step)


async def never_answers(fake: Fake, fit: Fit) -> Reply:
    return None


async def fails(fake: Fake, fit: Fit) -> Reply:
    return Error("internal", "training diverged (loss nan); lower the learning rate")


async def answers_wrong_shapes(fake: Fake, fit: Fit) -> Reply:
    weights = {name: np.zeros((3, 3), dtype=np.float32) for name in fit.weights}
    return FitResult(weights, fake.num_examples, 0.5)


async def answers_no_examples(fake: Fake, fit: Fit) -> Reply:
    """A fit_result that fails validation: zero examples behind it."""
    body = FitResult(dict(fit.weights), 1, 0.5).to_body()
    return Raw("fit_result", {**body, "num_examples": 0})


@dataclass
class Fake:
    """A worker served in this process, which records what it was asked and when."""

    name: str
    on_fit: FitHandler = trains
    role: str = "trainer"
    model: str = TINY
    num_examples: int = 100
    step: float = 1.0
    delay: float = 0.0
    #: Called on each evaluate request with its number (from 1): a reply, or None to hang up.
    on_evaluate: Callable[[int], Reply] | None = None
    #: With a token, the fake opens with the challenge and answers with a proof made of this token.
    token: bytes | None = None
    requests: list[tuple[float, str, int]] = field(default_factory=list)  # (time, kind, connection)
    connections: list[list[float | None]] = field(default_factory=list)  # [opened, closed]
    evaluations: int = 0
    held: dict[int, Reply] = field(default_factory=dict)

    def kinds(self, connection: int | None = None) -> list[str]:
        return [kind for _, kind, number in self.requests if connection is None or number == connection]

    def times(self, kind: str) -> list[float]:
        return [at for at, what, _ in self.requests if what == kind]

    def info(self) -> Info:
        count, rest = divmod(self.num_examples, 10)
        return Info(
            worker_id=self.name,
            role=self.role,
            dataset="digits",
            input_shape=(1, 8, 8),
            num_classes=10,
            histogram=tuple(count + (label < rest) for label in range(10)),
            models=(self.model,),
        )

    async def handle(self, connection: ServerConnection) -> None:
        number = len(self.connections)
        self.connections.append([time.monotonic(), None])
        tasks: set[asyncio.Task[None]] = set()
        try:
            if self.token is not None:
                await self._pretend_to_authenticate(connection, self.token)
            while True:
                envelope = (await receive_message(connection, 64 * MiB)).finish()
                task = asyncio.create_task(self._serve(connection, number, envelope.id, envelope.message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionClosed:
            pass
        finally:
            self.connections[number][1] = time.monotonic()
            for task in tasks:
                task.cancel()

    async def _pretend_to_authenticate(self, connection: ServerConnection, token: bytes) -> None:
        """The worker's side of the handshake, but with a proof made of ``token``."""
        frame, nonce = auth.challenge()
        await connection.send(frame)
        response = msgpack.unpackb(await receive(connection, auth.MAX_AUTH_FRAME))
        await connection.send(auth.confirm(token, nonce, response["nonce"]))

    async def _serve(self, connection: ServerConnection, number: int, request_id: int, message: Message) -> None:
        self.requests.append((time.monotonic(), message.kind, number))
        reply = await self._reply(message)
        if isinstance(reply, Raw):
            data = msgpack.packb({"v": 1, "id": request_id, "kind": reply.kind, "body": reply.body})
            await connection.send(data)
        elif reply is not None:
            await send_message(connection, encode_fragments(request_id, reply))
        elif isinstance(message, Evaluate):
            await connection.close(1011, "the evaluator went away")

    async def _reply(self, message: Message) -> Reply:
        if isinstance(message, Hello):
            return self.info()
        if isinstance(message, Propose):  # a site without a policy serves any job
            return Accepted()
        if isinstance(message, Fit):
            reply = await self.on_fit(self, message)
            if not message.plan.hold or not isinstance(reply, (FitResult, Raw)):
                return reply
            token = len(self.held) + 1
            self.held[token] = reply
            return FitHeld(token)
        if isinstance(message, Fetch):
            return self.held.pop(message.token)
        if isinstance(message, Evaluate):
            self.evaluations += 1
            if self.on_evaluate is not None:
                return self.on_evaluate(self.evaluations)
            return EvalResult(1.0, 5, 10, (1,) * 10)
        raise AssertionError(f"{self.name} got an unexpected {message.kind}")


@contextlib.asynccontextmanager
async def serving(fakes: Sequence[Fake]) -> AsyncIterator[dict[str, str]]:
    """Serve each fake on its own port of 127.0.0.1; yield their addresses by name."""
    async with contextlib.AsyncExitStack() as stack:
        uris: dict[str, str] = {}
        for fake in fakes:
            server = await stack.enter_async_context(
                serve(fake.handle, "127.0.0.1", 0, compression=None, max_size=None)
            )
            uris[fake.name] = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        yield uris


@contextlib.contextmanager
def serving_in_a_thread(fakes: Sequence[Fake]) -> Iterator[dict[str, str]]:
    """:func:`serving` from an event loop in a thread of its own, for code that runs ``asyncio.run`` itself."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fakes", daemon=True)
    thread.start()
    context = serving(fakes)
    try:
        uris = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(50 * UNIT)
        try:
            yield uris
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(50 * UNIT)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(50 * UNIT)
        loop.close()


def settings(trainers: Mapping[str, str], tmp_path: Path, **overrides: Any) -> CoordinatorConfig:
    """A coordinator of the fakes: no evaluator, one batch a round, metrics in ``tmp_path``."""
    values: dict[str, Any] = {
        "workers": dict(trainers),
        "evaluator": {},
        "model": TINY,
        "training_rounds": 2,
        "federate_after_n_batches": 1,
        "connect_timeout": 50 * UNIT,
        "round_timeout": 100 * UNIT,
        "request_timeout": 100 * UNIT,
        "metrics_out": tmp_path / "metrics.jsonl",
        **overrides,
    }
    return CoordinatorConfig(**values)


@dataclass
class Outcome:
    result: RunResult | None
    error: BaseException | None
    report: list[str]
    events: list[dict[str, Any]]
    seconds: float

    def of(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.events if line["event"] == event]


async def coordinate(
    fakes: Sequence[Fake], tmp_path: Path, *, evaluator: str | None = None, **overrides: Any
) -> Outcome:
    """Run a coordinator over ``fakes`` (``evaluator`` names the one that evaluates); keep what it raised."""
    report: list[str] = []
    async with serving(fakes) as uris:
        trainers = {name: uri for name, uri in uris.items() if name != evaluator}
        config = settings(trainers, tmp_path, **overrides)
        if evaluator is not None:
            config = replace(config, evaluator={evaluator: uris[evaluator]})
        started = time.monotonic()
        result: RunResult | None = None
        error: BaseException | None = None
        try:
            result = await Coordinator(config, report=report.append).run()
        except Exception as exc:
            error = exc
        seconds = time.monotonic() - started
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
    return Outcome(result, error, report, [json.loads(line) for line in lines], seconds)


def initial_weights(factory: Callable[[], nn.Module], seed: int = 1) -> dict[str, np.ndarray]:
    """The coordinator's first global model: the model built right after seeding torch with the run's seed."""
    torch.manual_seed(seed)
    return get_weights(factory())


# -- 1. An impostor worker that does not know the token -------------------------------------


def test_an_impostor_worker_without_the_token_is_refused_before_any_request(tmp_path: Path) -> None:
    """The coordinator checks the worker's proof (the third frame of syncfed.auth), not only its own."""
    impostor = Fake("mallory", token=WRONG_TOKEN)
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")

    async def scenario() -> None:
        async with serving([impostor]) as uris:
            client = WorkerLink("mallory", uris["mallory"], max_message_size=MiB, auth_token=TOKEN)
            with pytest.raises(AuthenticationFailed) as raised:
                await client.connect()
            assert str(raised.value) == "worker mallory failed authentication: the worker does not know the token"
            assert not client.connected

    run(scenario())
    assert impostor.requests == [], "the impostor was sent requests"

    outcome = run(coordinate([impostor], tmp_path, auth_token_file=token_file))
    assert isinstance(outcome.error, AuthenticationFailed)
    assert str(outcome.error) == "worker mallory failed authentication: the worker does not know the token"
    assert impostor.requests == [], "the impostor was sent requests"
    assert outcome.of("round") == []
    assert all(closed is not None for _, closed in impostor.connections)


def test_a_worker_with_the_token_is_accepted_by_the_same_check(tmp_path: Path) -> None:
    """The counterpart of the impostor test: the fake's handshake is right when its token is."""
    honest = Fake("alice", token=TOKEN)
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    outcome = run(coordinate([honest], tmp_path, auth_token_file=token_file, training_rounds=1))
    assert outcome.error is None, outcome.error
    assert honest.kinds()[:3] == ["hello", "propose", "fit"]


# -- 2. A worker too slow for --round-timeout -----------------------------------------------


def test_a_worker_too_slow_for_the_round_timeout_is_dropped_and_its_connection_closed(tmp_path: Path) -> None:
    round_timeout = 10 * UNIT
    fakes = [Fake("alice", step=1.0), Fake("bob", step=3.0), Fake("slow", never_answers)]
    outcome = run(coordinate(fakes, tmp_path, min_workers=2, round_timeout=round_timeout))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    reason = f"timeout: no reply to fit within {round_timeout:g} s"
    assert [(r.round, r.workers, r.failed) for r in outcome.result.rounds] == [
        (1, ("alice", "bob"), {"slow": reason}),
        (2, ("alice", "bob"), {"slow": reason}),
    ]
    assert [(line["round"], line["workers"], line["failed"]) for line in outcome.of("round")] == [
        (1, ["alice", "bob"], {"slow": reason}),
        (2, ["alice", "bob"], {"slow": reason}),
    ]
    assert f"Round 1: aggregated 2 of 3 workers; dropped slow ({reason})" in outcome.report
    # The others' updates (equal example counts: +1 and +3) were averaged, each round.
    start = initial_weights(TinyNet)
    for name, array in outcome.result.weights.items():
        np.testing.assert_allclose(array, start[name] + 2 * 2.0, rtol=1e-6, err_msg=name)

    slow = fakes[2]
    # The coordinator closed the late worker's connection at the deadline, so that it abandons the work;
    # it came back for round 2 on a new connection (proposed the job again), and was closed again.
    assert len(slow.connections) == 2, slow.connections
    assert slow.kinds(0) == slow.kinds(1) == ["hello", "propose", "fit"]
    (first_open, first_closed), (second_open, second_closed) = slow.connections
    assert first_closed is not None and second_closed is not None
    assert first_closed <= second_open
    for number, (_, closed) in enumerate(slow.connections):
        asked = next(at for at, kind, connection in slow.requests if kind == "fit" and connection == number)
        # The deadline runs from the send, a moment before the fake read the request.
        assert round_timeout - UNIT <= closed - asked < round_timeout + 20 * UNIT, closed - asked


# -- 3. Error replies and invalid replies to a fit ------------------------------------------


def test_a_worker_answering_a_fit_with_an_error_is_dropped_with_its_code_and_reason(tmp_path: Path) -> None:
    fakes = [Fake("alice", step=1.0), Fake("bob", step=3.0), Fake("carol", fails)]
    outcome = run(coordinate(fakes, tmp_path, min_workers=2))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    reason = "error reply: internal: training diverged (loss nan); lower the learning rate"
    assert [(r.workers, r.failed) for r in outcome.result.rounds] == [(("alice", "bob"), {"carol": reason})] * 2
    assert [(line["workers"], line["failed"]) for line in outcome.of("round")] == [
        (["alice", "bob"], {"carol": reason})
    ] * 2
    # An error reply is data, not a broken link: carol stays connected and is asked again.
    assert len(fakes[2].connections) == 1
    assert fakes[2].kinds() == ["hello", "propose", "fit", "fit"]


@pytest.mark.parametrize(
    ("answer", "expected", "connections"),
    [
        # Decodes, but does not fit the model: the fold refuses it, the connection stays.
        (answers_wrong_shapes, "invalid update: tensor fc.weight is float32[3, 3], the model's is float32[10, 64]", 1),
        # Fails validation on decoding: the peer sent garbage, so it is closed and rejoins.
        (answers_no_examples, "invalid reply: ", 2),
    ],
    ids=["wrong-shapes", "zero-examples"],
)
def test_a_worker_answering_a_fit_with_an_invalid_reply_is_dropped(
    tmp_path: Path, answer: FitHandler, expected: str, connections: int
) -> None:
    fakes = [Fake("alice", step=1.0), Fake("bob", step=3.0), Fake("carol", answer)]
    outcome = run(coordinate(fakes, tmp_path, min_workers=2))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    for record, line in zip(outcome.result.rounds, outcome.of("round"), strict=True):
        assert record.workers == ("alice", "bob") and line["workers"] == ["alice", "bob"]
        assert list(record.failed) == ["carol"] and line["failed"] == record.failed
        assert record.failed["carol"].startswith(expected), record.failed
    if answer is answers_no_examples:
        assert "num_examples must be a positive integer" in outcome.result.rounds[0].failed["carol"]
    assert len(outcome.result.rounds) == 2
    assert len(fakes[2].connections) == connections
    start = initial_weights(TinyNet)
    for name, array in outcome.result.weights.items():
        np.testing.assert_allclose(array, start[name] + 2 * 2.0, rtol=1e-6, err_msg=name)


# -- 4. An evaluator lost mid-run -----------------------------------------------------------


def test_an_evaluator_lost_mid_run_skips_that_evaluation_and_training_goes_on(tmp_path: Path) -> None:
    per_round = 4  # the federated model and each of the three trainers' models

    def hangs_up_in_round_two(number: int) -> Reply:
        if per_round < number <= 2 * per_round:
            return None
        return EvalResult(1.0, 5, 10, (1,) * 10)

    fakes = [
        Fake("alice"),
        Fake("bob"),
        Fake("carol"),
        Fake("testing", role="evaluator", on_evaluate=hangs_up_in_round_two),
    ]
    outcome = run(coordinate(fakes, tmp_path, evaluator="testing", training_rounds=3, eval_every=1))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    assert [record.round for record in outcome.result.rounds] == [1, 2, 3]
    skipped = outcome.of("eval_skipped")
    assert [line["round"] for line in skipped] == [2]
    assert skipped[0]["reason"].startswith("worker testing is unavailable: connection lost ("), skipped[0]
    assert "the evaluator went away" in skipped[0]["reason"]
    assert f"Evaluation at round 2 skipped: {skipped[0]['reason']}" in outcome.report
    # The evaluator rejoined for round 3: rounds 1 and 3 were scored, round 2 not.
    assert sorted({line["round"] for line in outcome.of("eval")}) == [1, 3]
    assert sorted({record.round for record in outcome.result.evaluations}) == [1, 3]
    assert [line["round"] for line in outcome.of("round")] == [1, 2, 3]
    assert len(fakes[3].connections) == 2


# -- 5. Asynchronous mode: a failing worker, and no update before the deadline ---------------


def test_async_mode_backs_off_a_failing_worker_and_goes_on_with_the_others(tmp_path: Path) -> None:
    fakes = [Fake("alice", delay=2 * UNIT), Fake("bob", delay=2 * UNIT), Fake("carol", fails)]
    outcome = run(coordinate(fakes, tmp_path, mode="async", buffer_size=2, training_rounds=8))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    assert [record.round for record in outcome.result.rounds] == list(range(1, 9))
    assert all(set(record.workers) <= {"alice", "bob"} for record in outcome.result.rounds)
    failed = outcome.of("worker_failed")
    assert failed and all(
        line
        == {
            "event": "worker_failed",
            "worker": "carol",
            "reason": "error reply: internal: training diverged (loss nan); lower the learning rate",
        }
        for line in failed
    ), failed
    # Retried at once, then after 0.5 s, 1 s, 2 s...: never in a tight loop. The run lasts at least
    # 8 x 0.2 s (16 updates from two workers that take 0.2 s each), so carol is asked at least 3 times.
    asked = fakes[2].times("fit")
    assert len(asked) >= 3, (asked, outcome.seconds)
    gaps = np.diff(asked)
    for number, gap in enumerate(gaps[1:]):
        assert gap >= 5 * UNIT * 2**number - UNIT / 2, gaps
    assert len(fakes[2].connections) == 1, "an error reply does not drop the connection"


def test_async_mode_with_no_update_before_the_deadline_stops_with_quorum_not_met(tmp_path: Path) -> None:
    round_timeout = 10 * UNIT
    fakes = [Fake("alice", never_answers), Fake("bob", never_answers)]
    outcome = run(coordinate(fakes, tmp_path, mode="async", round_timeout=round_timeout, training_rounds=3))
    assert isinstance(outcome.error, QuorumNotMet), outcome.error
    assert str(outcome.error) == f"version 1: no worker returned an update within {round_timeout:g} s"
    assert round_timeout <= outcome.seconds < round_timeout + 50 * UNIT
    assert outcome.of("round") == []


# -- 6. Training abandoned when its coordinator goes away -----------------------------------


#: The abandon test's worker sleeps this long per batch: its long fit would take 10,000 of them.
BATCH_DELAY = UNIT


@pytest.fixture(scope="module")
def slow_worker() -> Iterator[WorkerProcess]:
    with running_workers([("frank", [*THREADS, "--digits", "1,2", "--batch-delay", str(BATCH_DELAY)])]) as workers:
        yield workers["frank"]


def test_training_stops_within_a_batch_when_its_coordinator_disconnects(slow_worker: WorkerProcess) -> None:
    """A worker computes one job at a time: a fit left running for a gone coordinator would block the next one."""
    weights = initial_weights(DigitsCNN)
    long_plan = TrainingPlan(round=1, batch_size=8, num_batches=10_000, lr=0.01, seed=1)

    async def scenario() -> float:
        options = {"max_message_size": 64 * MiB, "connect_timeout": 50 * UNIT, "request_timeout": 200 * UNIT}
        leaving = WorkerLink("frank", slow_worker.uri, **options)
        staying = WorkerLink("frank", slow_worker.uri, **options)
        await leaving.connect()
        await staying.connect()
        try:
            await leaving.request(Hello())
            await staying.request(Hello())
            fit = asyncio.create_task(leaving.request(Fit("digits-cnn", weights, long_plan)))
            await asyncio.sleep(5 * UNIT)
            evaluation = asyncio.create_task(staying.request(Evaluate("digits-cnn", weights, 64)))
            # The fit holds the worker's compute: the evaluation waits behind it.
            done, _ = await asyncio.wait([evaluation], timeout=10 * UNIT)
            assert not done and not fit.done(), "the long fit is not running"
            left = time.monotonic()
            await leaving.close()
            reply = await evaluation
            assert isinstance(reply, EvalResult) and reply.num_examples > 0
            with pytest.raises(WorkerUnavailable, match="connection closed by the coordinator"):
                await fit
            return time.monotonic() - left
        finally:
            await leaving.close()
            await staying.close()

    waited = run(scenario())
    # Within about one batch (plus the evaluation): not the 1,000 s the fit had left.
    assert waited < 50 * UNIT, waited
    assert slow_worker.process.returncode is None


# -- 7. The fold over tensors above its block size ------------------------------------------


#: Tensor sizes around the fold's block of 65,536 elements: several blocks, one and a bit, under one.
SIZES = {"several": 200_000, "odd": 70_001, "small": 31_250, "matrix": (3, 65_537)}


def random_updates(count: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[int], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    origin = {name: rng.standard_normal(size).astype(np.float32) for name, size in SIZES.items()}
    updates = [
        {name: (array + rng.standard_normal(array.shape) * 0.1).astype(np.float32) for name, array in origin.items()}
        for _ in range(count)
    ]
    counts = [int(value) for value in rng.integers(1, 1_000, size=count)]
    return updates, counts, origin


def expected_mean(updates: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int] | None) -> dict[str, np.ndarray]:
    """np.average in float64 of each tensor over the updates."""
    return {
        name: np.average(np.stack([update[name].astype(np.float64) for update in updates]), axis=0, weights=counts)
        for name in updates[0]
    }


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("with_origin", [False, True], ids=["sums", "differences"])
def test_running_mean_over_tensors_above_the_block_size_agrees_with_numpy(weighted: bool, with_origin: bool) -> None:
    updates, counts, origin = random_updates(4, seed=11)
    running = RunningMean(weighted=weighted, origin=origin if with_origin else None)
    for update, count in zip(updates, counts, strict=True):
        running.add(update, count)
    result = running.result()
    expected = expected_mean(updates, counts if weighted else None)
    assert list(result) == list(SIZES)
    for name, array in result.items():
        assert array.dtype == np.float32 and array.shape == updates[0][name].shape, name
        np.testing.assert_allclose(array, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_fedavg_and_mean_over_tensors_above_the_block_size_agree_with_numpy() -> None:
    updates, counts, _ = random_updates(3, seed=12)
    pairs = list(zip(updates, counts, strict=True))
    for name, array in fedavg(pairs).items():
        np.testing.assert_allclose(array, expected_mean(updates, counts)[name], rtol=1e-6, atol=1e-6, err_msg=name)
    for name, array in mean(pairs).items():
        np.testing.assert_allclose(array, expected_mean(updates, None)[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("compress", ["none", "fp16"])
def test_the_coordinator_folds_a_round_of_large_tensors_as_numpy_averages_them(tmp_path: Path, compress: str) -> None:
    """The coordinator's own fold (sums or, with compression, deltas), one round of three fakes."""
    rng = np.random.default_rng(13)
    shapes = {name: array.shape for name, array in initial_weights(WideNet).items()}
    assert {name: int(np.prod(shape)) for name, shape in shapes.items()} == {
        "wide.weight": 200_000,
        "wide.bias": 3_125,
        "head.weight": 31_250,
        "head.bias": 10,
        "odd": 70_001,
    }
    # fp16-exact shifts, so that compressing the replies changes nothing.
    shifts = {
        name: {tensor: rng.integers(-64, 64, shape).astype(np.float32) / 64 for tensor, shape in shapes.items()}
        for name in ("alice", "bob", "carol")
    }

    async def moves(fake: Fake, fit: Fit) -> Reply:
        return shifted(fit, shifts[fake.name], fake.num_examples)

    fakes = [
        Fake(name, moves, model=WIDE, num_examples=count)
        for name, count in (("alice", 70), ("bob", 130), ("carol", 11))
    ]
    outcome = run(coordinate(fakes, tmp_path, model=WIDE, training_rounds=1, compress=compress))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    start = initial_weights(WideNet)
    counts = [70, 130, 11]
    for name, array in outcome.result.weights.items():
        step = np.average(np.stack([shifts[fake][name] for fake in shifts]).astype(np.float64), axis=0, weights=counts)
        np.testing.assert_allclose(array, start[name] + step, rtol=1e-6, atol=1e-6, err_msg=name)


# -- 10. The quorum rule, fast and deterministic --------------------------------------------


def test_a_quorum_of_two_of_three_goes_on_without_the_failing_worker(tmp_path: Path) -> None:
    fakes = [Fake("alice", step=1.0), Fake("bob", step=3.0), Fake("carol", fails)]
    outcome = run(coordinate(fakes, tmp_path, min_workers=2, training_rounds=3, max_round_retries=1))
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    assert [record.workers for record in outcome.result.rounds] == [("alice", "bob")] * 3
    assert outcome.of("round_retry") == []


def test_a_quorum_of_three_of_three_stops_after_its_retries(tmp_path: Path) -> None:
    fakes = [Fake("alice"), Fake("bob"), Fake("carol", fails)]
    outcome = run(coordinate(fakes, tmp_path, training_rounds=3, max_round_retries=2))
    assert isinstance(outcome.error, QuorumNotMet), outcome.error
    reason = "error reply: internal: training diverged (loss nan); lower the learning rate"
    assert str(outcome.error) == f"round 1: 2 of 3 workers contributed, quorum is 3, after 3 attempts (carol: {reason})"
    assert [(line["round"], line["attempt"], line["failed"]) for line in outcome.of("round_retry")] == [
        (1, attempt, {"carol": reason}) for attempt in (1, 2, 3)
    ]
    assert outcome.of("round") == []
    assert fakes[2].kinds() == ["hello", "propose", "fit", "fit", "fit"]


def test_a_quorum_that_cannot_be_met_exits_the_cli_with_status_8_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes = [Fake("alice"), Fake("bob"), Fake("carol", fails)]
    with serving_in_a_thread(fakes) as uris:
        status = coordinator_main(
            [
                "--workers",
                ",".join(f"{name}={uri}" for name, uri in uris.items()),
                "--evaluator",
                "",
                "--model",
                TINY,
                "--training-rounds",
                "2",
                "--federate-after-n-batches",
                "1",
                "--min-workers",
                "3",
                "--max-round-retries",
                "1",
                "--no-progress",
            ]
        )
    captured = capsys.readouterr()
    assert status == 8, captured.err
    reason = "error reply: internal: training diverged (loss nan); lower the learning rate"
    assert captured.err.splitlines()[-1] == (
        f"run_websocket_client.py: error: round 1: 2 of 3 workers contributed, quorum is 3, after 2 attempts"
        f" (carol: {reason})"
    )
    assert "Traceback" not in captured.err
