"""Secure aggregation and differential privacy in real runs: the wire, the coordinator, real worker processes.

The pure protocol and the privacy math are tested in ``test_secagg.py`` and
``test_privacy.py``; here their messages cross the wire codec, the
coordinator drives real workers through them, and workers are killed
between the protocol's steps. Every expected figure is computed again with
plain numpy from the workers' own updates, which training makes
reproducible: same weights and seed, same update.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from conftest import THREADS, TRAINERS, config, run, running_workers
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from units import MS

from syncfed.cli.coordinator import main as client_main
from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult, plan_seed
from syncfed.coordinator.private_rounds import PrivateRounds, secure_agg_line
from syncfed.exceptions import ConfigError, ProtocolError, SecAggError, WorkerUnavailable
from syncfed.fold import PrivateFold
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.secure_round import SecureRound, secagg_threshold
from syncfed.net.spawn import WorkerProcess
from syncfed.privacy import PrivacyAccountant
from syncfed.protocol import (
    Fit,
    FitResult,
    Hello,
    Message,
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.secagg import CIPHERTEXT_SIZE, SecAggClient, SecAggConfig, SecAggServer, flatten
from syncfed.strategies import make_strategy

SESSION = b"k" * 32
#: A worker's update in a secure round: 5 batches of 32 at this rate, from the seeded initial model.
BATCHES, LR = 5, 0.05
#: Seconds a killed worker's connection may take to close.
KILL_TIMEOUT = 10_000 * MS


def over_the_wire(message: Message) -> Message:
    """``message`` after encoding and decoding, as a peer receives it."""
    envelope = decode(encode(9, message))
    assert envelope.id == 9
    return envelope.message


def initial_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(1)  # the coordinator's default seed: its first model
    return get_weights(DigitsCNN())


def flat_float(weights: dict[str, np.ndarray]) -> np.ndarray:
    """All float tensors in one float64 vector, tensor by tensor in name order (written apart from ``flatten``)."""
    pieces = [
        weights[name].reshape(-1).astype(np.float64) for name in sorted(weights) if weights[name].dtype.kind == "f"
    ]
    return np.concatenate(pieces)


# The wire ------------------------------------------------------------------------------------


def test_a_secure_round_with_a_dropout_survives_the_wire_codec() -> None:
    """Every message of a four-client round crosses encode/decode; client 3 vanishes after sending its input."""
    rng = np.random.default_rng(5)
    vectors = [rng.uniform(-1, 1, 50) for _ in range(4)]
    counts = [3, 9, 4, 7]
    config = SecAggConfig(num_clients=4, threshold=3, length=50, clip=1.0, session=SESSION, max_count=10)
    start = [over_the_wire(SecAggStart(config, u)) for u in range(4)]
    assert all(isinstance(message, SecAggStart) and message.config == config for message in start)
    clients = [SecAggClient(message.config, message.client) for message in start if isinstance(message, SecAggStart)]
    server = SecAggServer(config)
    keys = [over_the_wire(SecAggKeys(client.advertise_keys())) for client in clients]
    neighbours = server.receive_keys(message.keys for message in keys if isinstance(message, SecAggKeys))
    shares = []
    for u, client in enumerate(clients):
        request = over_the_wire(SecAggShare(SESSION, neighbours[u]))
        assert isinstance(request, SecAggShare) and request.keys == neighbours[u]
        shares.append(over_the_wire(SecAggShares(client.share_keys(request.keys))))
    forwarded = server.receive_shares(message.shares for message in shares if isinstance(message, SecAggShares))
    fit = Fit("m", {}, TrainingPlan(round=1, batch_size=1, num_batches=1, lr=0.1, seed=0, delta=True))
    masked = []
    for u, client in enumerate(clients):
        request = over_the_wire(SecAggMask(SESSION, forwarded[u], fit))
        assert isinstance(request, SecAggMask) and request == SecAggMask(SESSION, forwarded[u], fit)
        reply = SecAggMasked(client.mask_input(request.shares, vectors[u], counts[u]), loss=0.5, seconds=0.1)
        assert over_the_wire(reply) == reply
        masked.append(reply.masked)
    unmask = over_the_wire(SecAggUnmask(SESSION, server.receive_masked_inputs(masked)))
    assert isinstance(unmask, SecAggUnmask) and unmask.request.survivors == (0, 1, 2, 3)
    replies = [over_the_wire(SecAggUnmasked(client.unmask(unmask.request))) for client in clients[:3]]
    result = server.receive_unmask_shares(reply.shares for reply in replies if isinstance(reply, SecAggUnmasked))
    expected = np.average(np.stack(vectors), axis=0, weights=counts)
    assert np.abs(result.average - expected).max() <= config.quantizer.error_bound / sum(counts)
    assert result.count == sum(counts)


def test_a_round_config_out_of_range_from_the_wire_is_a_protocol_error() -> None:
    message = SecAggStart(SecAggConfig(num_clients=4, threshold=3, length=5, clip=1.0, session=SESSION), 0)
    body = message.to_body()
    body["config"]["threshold"] = 2  # half of four: one lie about who dropped could unmask a client
    with pytest.raises(ProtocolError, match="^invalid secure aggregation config: threshold 2 must be more than half"):
        SecAggStart.from_body(body)
    with pytest.raises(ProtocolError, match="^client id 4 must be below the 4 clients$"):
        SecAggStart(message.config, 4)


def test_maps_keyed_by_client_id_travel_as_pairs_without_repeats() -> None:
    body = SecAggShares.from_body({"client": 0, "ciphertexts": []}).to_body()
    assert body == {"client": 0, "ciphertexts": []}
    ciphertext = SecAggShares.from_body({"client": 0, "ciphertexts": [[1, b"x" * CIPHERTEXT_SIZE]]}).shares.ciphertexts
    assert ciphertext == {1: b"x" * CIPHERTEXT_SIZE}
    with pytest.raises(ProtocolError, match="^ciphertexts lists a client twice$"):
        SecAggShares.from_body({"client": 0, "ciphertexts": [[1, b"x" * CIPHERTEXT_SIZE], [1, b"y" * CIPHERTEXT_SIZE]]})
    with pytest.raises(ProtocolError, match=r"^ciphertexts must be a list of at most 65536 \[client id, value\]"):
        SecAggShares.from_body({"client": 0, "ciphertexts": {"1": b"x" * CIPHERTEXT_SIZE}})


@settings(max_examples=50, deadline=None)
@given(
    clip=st.none() | st.floats(min_value=1e-6, max_value=1e6),
    noise=st.floats(min_value=0, max_value=1e3),
)
def test_a_plan_with_clip_and_noise_round_trips(clip: float | None, noise: float) -> None:
    plan = TrainingPlan(round=3, batch_size=8, num_batches=2, lr=0.1, seed=4, delta=True, clip=clip)
    if clip is not None:
        plan = replace(plan, noise_std=noise)
    fit = Fit("digits-cnn", {}, plan)
    assert over_the_wire(fit) == fit


# Settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"secure_agg": True, "strategy": "median"},
            "--secure-agg works on the mean of the updates only; strategy median needs more",
        ),
        ({"dp": "central", "dp_noise_multiplier": 1.0, "strategy": "scaffold"}, "--dp central works on the mean"),
        ({"secure_agg": True, "mode": "async"}, "--secure-agg runs synchronous rounds only, not --mode async"),
        ({"secure_agg": True, "cross_site_validation": True}, "--cross-site-validation scores each worker's own"),
        ({"secure_agg": True, "compress": "int8"}, "--compress int8 would change the updates --secure-agg protects"),
        ({"secure_agg": True, "secagg_threshold": 1}, "secagg threshold 1 must be more than half of, and at most,"),
        ({"secure_agg": True, "secagg_threshold": 4}, "secagg threshold 4 must be more than half of"),
        ({"secure_agg": True, "fraction_fit": 0.2}, "--secure-agg needs at least 2 workers per round, not 1"),
        ({"secagg_threshold": 2}, "--secagg-threshold needs --secure-agg"),
        ({"dp": "central"}, "--dp central needs --dp-noise-multiplier or --dp-target-epsilon"),
        ({"dp": "local", "dp_noise_multiplier": 1.0}, "dp 'local' is not one of central, distributed"),
        ({"dp_noise_multiplier": 1.0}, "--dp-noise-multiplier and --dp-target-epsilon need --dp"),
        ({"dp": "central", "dp_noise_multiplier": 1.0, "dp_delta": 1.0}, r"dp_delta must be in \(0, 1\), not 1.0"),
        ({"dp": "central", "dp_noise_multiplier": -1.0}, "dp_noise_multiplier must be a positive number, not -1.0"),
    ],
)
def test_settings_that_private_rounds_cannot_honour_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CoordinatorConfig(**settings)


@pytest.mark.parametrize("n", range(2, 40))
def test_the_default_threshold_is_two_thirds_and_a_majority(n: int) -> None:
    t = secagg_threshold(n)
    assert t == math.ceil(2 * n / 3) and n / 2 < t <= n
    SecAggConfig(num_clients=n, threshold=t, length=1, clip=1.0, session=SESSION)  # the protocol accepts it
    assert secagg_threshold(n, 5) == 5


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            {"secagg_threshold": 3},
            "from 3 workers, never one worker's update (losses and example counts are not hidden); a round needs 3"
            " of them to unmask its sum (tolerates no dropout)",
        ),
        (
            {"workers": {f"w{i}": "" for i in range(10)}, "fraction_fit": 0.5},
            "from 5 of the 10 workers, never one"
            " worker's update (losses and example counts are not hidden); a round needs 4 of them to unmask its sum"
            " (tolerates 1 dropout)",
        ),
        ({"workers": {f"w{i}": "" for i in range(9)}}, "needs 6 of them to unmask its sum (tolerates 3 dropouts)"),
    ],
)
def test_the_secure_aggregation_start_line_says_who_is_summed_and_how_many_may_drop(
    settings: dict[str, Any], said: str
) -> None:
    line = secure_agg_line(CoordinatorConfig(secure_agg=True, **settings))
    assert line.startswith("Secure aggregation: the coordinator learns only the sum of each round's updates ")
    assert line.endswith(said)


def test_private_rounds_say_secure_aggregation_and_epsilon_in_one_line_per_round() -> None:
    said: list[str] = []
    settings = CoordinatorConfig(secure_agg=True, dp="central", dp_noise_multiplier=1.0)
    private = PrivateRounds(settings, make_strategy("fedavg"), report=said.append)
    private._last = {"secure_agg": {"workers": 3, "threshold": 2, "summed": 3, "recovered": ["bob"]}}
    epsilon = private.metrics(4)["privacy"]["epsilon"]
    assert said[1:] == [
        "Round 4: secure aggregation summed 3 of 3 updates (threshold 2; bob dropped, unmasked with the others'"
        f" shares); privacy spent epsilon {epsilon:.3f} at delta 1e-05"
    ]


def test_a_private_fold_adds_the_mean_update_to_float_tensors_only() -> None:
    reference = {"b": np.array([1.0, 2.0], np.float32), "a": np.ones((2, 2), np.float32), "n": np.array(7, np.int64)}
    mean = np.array([0.5, -0.5, 0.25, 0.0, 0.125, 2.0])  # a (4 values), then b (2), as flatten orders them
    fold = PrivateFold(make_strategy("fedavg"), reference, mean, {"x": 0.1}, {"x": 3})
    weights = fold.aggregate(num_workers=1)
    np.testing.assert_array_equal(weights["a"], np.array([[1.5, 0.5], [1.25, 1.0]], np.float32))
    np.testing.assert_array_equal(weights["b"], np.array([1.125, 4.0], np.float32))
    assert weights["n"] == 7 and weights["n"].dtype == np.int64 and weights["a"].dtype == np.float32
    assert list(weights) == ["b", "a", "n"] and fold.kept == {}


class FakeWorker:
    """Stands in for a worker connection: answers every request with one reply, or fails with one error."""

    def __init__(self, name: str, reply: Message | Exception) -> None:
        self.name = name
        self.reply = reply
        self.requests: list[Message] = []

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        self.requests.append(message)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def collect(settings: CoordinatorConfig, fakes: list[FakeWorker], reference: dict[str, np.ndarray]) -> Any:
    """A private round of ``settings`` over the fakes, without secure aggregation."""
    private = PrivateRounds(settings, make_strategy("fedavg"), report=lambda _: None)
    plan = TrainingPlan(round=1, batch_size=8, num_batches=1, lr=0.1, seed=0)
    clients = cast(list[WorkerLink], fakes)
    return asyncio.run(
        private.collect(clients, lambda _: Fit("m", reference, plan), reference, {"a": 5, "b": 5, "c": 5}, why)
    )


def test_a_central_dp_round_refuses_an_update_that_was_not_clipped() -> None:
    reference = {"w": np.zeros(1000, np.float32)}
    small = FitResult({"w": np.full(1000, 0.001, np.float32)}, 5, 0.5)
    large = FitResult({"w": np.ones(1000, np.float32)}, 5, 0.5)
    fakes = [FakeWorker("a", small), FakeWorker("b", large), FakeWorker("c", WorkerUnavailable("c", "gone"))]
    settings = CoordinatorConfig(
        workers={fake.name: "ws://unused" for fake in fakes}, dp="central", dp_clip=0.1, dp_noise_multiplier=1e-9
    )
    fold, failures = collect(settings, fakes, reference)
    assert {name: str(failure) for name, failure in failures.items()} == {
        "b": "invalid update: its L2 norm 31.6228 exceeds the clip 0.1",
        "c": "WorkerUnavailable: worker c is unavailable: gone",
    }
    assert fold.losses == {"a": 0.5} and fold.examples == {"a": 5}
    np.testing.assert_allclose(fold.aggregate(3)["w"], 0.001, atol=1e-7)
    (request,) = fakes[0].requests
    assert isinstance(request, Fit) and request.plan.clip == 0.1 and request.plan.delta and not request.plan.noise_std


def test_distributed_dp_tops_up_the_noise_of_workers_that_dropped() -> None:
    z, clip, size = 2.0, 0.5, 200_000
    reference = {"w": np.zeros(size, np.float32)}
    silent = FitResult({"w": np.zeros(size, np.float32)}, 5, 0.5)  # these fakes add no noise of their own
    fakes = [FakeWorker(name, silent) for name in "abc"] + [FakeWorker("d", WorkerUnavailable("d", "gone"))]
    settings = CoordinatorConfig(
        workers={fake.name: "ws://unused" for fake in fakes}, dp="distributed", dp_clip=clip, dp_noise_multiplier=z
    )
    fold, failures = collect(settings, fakes, reference)
    assert list(failures) == ["d"] and sorted(fold.losses) == ["a", "b", "c"]
    (request,) = fakes[0].requests
    assert isinstance(request, Fit) and request.plan.noise_std == pytest.approx(z * clip / 2)  # z C / sqrt(4)
    # One of four noise shares is missing: the coordinator adds it, N(0, (zC)^2 / 4), and the mean divides by 3.
    mean = fold.aggregate(4)["w"].astype(np.float64)
    expected = z * clip / 2 / 3
    assert abs(mean.std() / expected - 1) < 0.02


# Real workers: the coordinator with and without secure aggregation ------------------------------


def rounds_of(metrics: Path) -> list[dict[str, Any]]:
    return [event for line in metrics.read_text().splitlines() if (event := json.loads(line))["event"] == "round"]


def test_secure_aggregation_equals_plain_fedavg_within_the_quantization_bound(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    settings = config(digits_workers, evaluator=False, training_rounds=1, federate_after_n_batches=BATCHES, lr=LR)
    plain_metrics, metrics = tmp_path / "plain.jsonl", tmp_path / "secure.jsonl"
    plain = run(Coordinator(replace(settings, metrics_out=plain_metrics), report=lambda _: None).run())
    said: list[str] = []
    secure = run(Coordinator(replace(settings, secure_agg=True, metrics_out=metrics), report=said.append).run())
    assert said == [
        "Secure aggregation: the coordinator learns only the sum of each round's updates from 3 workers, never one"
        " worker's update (losses and example counts are not hidden); a round needs 2 of them to unmask its sum"
        " (tolerates 1 dropout)",
        "Round 1: secure aggregation summed 3 of 3 updates (threshold 2)",
    ]
    (event,) = rounds_of(metrics)
    assert event["workers"] == list(TRAINERS)
    assert event["privacy"] == {"secure_agg": {"workers": 3, "threshold": 2, "summed": 3, "recovered": []}}
    counts = list(rounds_of(plain_metrics)[0]["num_examples"].values())  # the secure run writes the total only
    assert event["total_examples"] == sum(counts)
    quantizer = SecAggConfig(3, 2, 1, settings.secagg_clip, SESSION, max_count=max(counts)).quantizer
    start = flat_float(initial_weights())
    expected, actual = flat_float(plain.weights), flat_float(secure.weights)
    # Rounding to fixed point, then each side's cast of its new weights to float32 (half an ulp each).
    bound = quantizer.error_bound / sum(counts) + 2 * np.spacing(np.abs(expected).astype(np.float32))
    gap = np.abs(actual - expected)
    print(f"\nsecure vs plain FedAvg: max gap {gap.max():.3g}, quantization bound {bound.max():.3g}")
    assert (gap <= bound).all()
    assert np.abs(expected - start).max() > 1000 * bound.max()  # the round moved the model far beyond the bound


# Real workers killed between the protocol's steps ------------------------------------------------


@pytest.fixture(scope="module")
def doomed_workers() -> Iterator[dict[str, WorkerProcess]]:
    """Three workers of this module's own, with the demo's shards, for tests that kill them."""
    plan = [
        ("dana", [*THREADS, "--digits", "0-3"]),
        ("eli", [*THREADS, "--digits", "4-6"]),
        ("finn", [*THREADS, "--digits", "7-9"]),
    ]
    with running_workers(plan) as workers:
        yield workers


class SpyClient(WorkerLink):
    """A worker connection that keeps the masked inputs it receives, as the coordinator sees them."""

    masked: list[np.ndarray]

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        reply = await super().request(message, timeout=timeout)
        if isinstance(reply, SecAggMasked):
            self.masked.append(reply.masked.vector)
        return reply


async def connect(workers: dict[str, WorkerProcess], names: list[str]) -> list[SpyClient]:
    clients = []
    for name in names:
        client = SpyClient(
            name,
            workers[name].uri,
            max_message_size=2**26,
            connect_timeout=10_000 * MS,
            request_timeout=60_000 * MS,
            ping_interval=None,
        )
        client.masked = []
        await client.connect()
        await client.request(Hello())
        clients.append(client)
    return clients


def fits_for(names: list[str]) -> dict[str, Fit]:
    weights = initial_weights()
    return {
        name: Fit("digits-cnn", weights, TrainingPlan(1, 32, BATCHES, LR, seed=10 + index, delta=True))
        for index, name in enumerate(names)
    }


async def why(client: WorkerLink, error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


#: The doomed workers killed so far in this module.
KILLED: set[str] = set()


def kill(worker: WorkerProcess) -> None:
    os.kill(worker.process.pid, signal.SIGKILL)
    KILLED.add(worker.worker_id)


async def until_disconnected(client: WorkerLink) -> None:
    deadline = time.monotonic() + KILL_TIMEOUT
    while client.connected:
        assert time.monotonic() < deadline, f"{client.name}'s connection stayed open after SIGKILL"
        await asyncio.sleep(10 * MS)


def top_byte_uniformity(vector: np.ndarray) -> float:
    """Chi-square p-value that the most significant byte of the ring elements is uniform over 0..255."""
    top = (vector.view(np.uint32) >> 24).astype(np.int64)
    return float(stats.chisquare(np.bincount(top, minlength=256)).pvalue)


def test_a_worker_killed_after_sending_its_masked_input_is_recovered_from_the_survivors_shares(
    doomed_workers: dict[str, WorkerProcess],
) -> None:
    names = ["dana", "eli", "finn"]
    fits = fits_for(names)

    async def scenario() -> tuple[list[FitResult], Any, SecureRound, list[SpyClient], SecAggConfig]:
        clients = await connect(doomed_workers, names)
        try:
            # The same requests as plain fits first: training is reproducible, so these are the updates to sum.
            plain = [await client.request(fits[client.name]) for client in clients]
            updates = [reply for reply in plain if isinstance(reply, FitResult)]
            config = SecAggConfig(
                num_clients=3,
                threshold=2,
                length=flat_float(initial_weights()).size,
                clip=4.0,
                session=os.urandom(32),
                max_count=max(update.num_examples for update in updates),
            )
            secure = SecureRound(clients, config, timeout=60_000 * MS, failure=why)
            await secure.advertise()
            await secure.share()
            await secure.mask(fits, weighted=True)
            kill(doomed_workers["eli"])  # after its masked input, before it reveals any share
            await until_disconnected(clients[1])
            result = await secure.unmask()
            return updates, result, secure, clients, config
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    updates, result, secure, clients, config = run(scenario())
    assert secure.recovered == ["eli"] and list(secure.failures) == ["eli"]
    assert result.clients == (0, 1, 2) and sorted(secure.losses) == sorted(names)
    counts = [update.num_examples for update in updates]
    assert result.count == sum(counts)
    expected = np.average(np.stack([flat_float(update.weights) for update in updates]), axis=0, weights=counts)
    gap = np.abs(result.average - expected)
    print(
        f"\nSIGKILL of eli after masking: max gap to FedAvg {gap.max():.3g}, bound {config.quantizer.error_bound:.3g}"
    )
    assert gap.max() <= config.quantizer.error_bound / sum(counts)
    assert np.abs(expected).max() > 1000 * config.quantizer.error_bound / sum(counts)
    # What the coordinator received from each worker looks uniform in the ring; the update itself does not.
    for client in clients:
        (vector,) = client.masked
        assert top_byte_uniformity(vector) > 1e-3, client.name
    plain = config.quantizer.encode(flatten(updates[0].weights), counts[0])
    assert top_byte_uniformity(plain) < 1e-10


def test_fewer_survivors_than_the_threshold_fail_the_round_and_reveal_nothing(
    doomed_workers: dict[str, WorkerProcess],
) -> None:
    names = [name for name in doomed_workers if name not in KILLED][:2]
    fits = fits_for(names)

    async def scenario() -> tuple[SecureRound, BaseException]:
        clients = await connect(doomed_workers, names)
        try:
            config = SecAggConfig(2, 2, flat_float(initial_weights()).size, 4.0, os.urandom(32), max_count=1000)
            secure = SecureRound(clients, config, timeout=60_000 * MS, failure=why)
            await secure.advertise()
            await secure.share()
            await secure.mask(fits, weighted=True)
            kill(doomed_workers[names[0]])
            await until_disconnected(clients[0])
            with pytest.raises(SecAggError) as error:
                await secure.unmask()
            return secure, error.value
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    secure, error = run(scenario())
    # Both inputs are in the masked sum, but one survivor's shares cannot rebuild any self mask.
    assert str(error) == "cannot rebuild the self-mask seed of client 0: 1 shares are fewer than the threshold of 2"
    assert secure.recovered == [names[0]] and list(secure.failures) == [names[0]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_coordinator_with_fewer_workers_than_the_threshold_stops_with_one_line(
    digits_workers: dict[str, WorkerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    gone = f"gone=ws://127.0.0.1:{free_port()}"  # nothing listens there
    workers = f"alice={digits_workers['alice'].uri},bob={digits_workers['bob'].uri},{gone}"
    code = client_main(
        [
            *("--workers", workers, "--evaluator", "", "--training-rounds", "2", "--no-progress"),
            *("--secure-agg", "--secagg-threshold", "3", "--min-workers", "2", "--max-round-retries", "1"),
            *("--reconnect-max-delay", "0.1", "--connect-timeout", "5"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 8, err
    # The quorum's own wording belongs to the coordinator; the secure round's reason is ours.
    assert err[-1].startswith("run_websocket_client.py: error: round 1: 0 of ")
    assert "quorum is 2, after 2 attempts" in err[-1]
    assert "alice: secure aggregation needs 3 workers, 2 selected" in err[-1]


# Real workers under differential privacy --------------------------------------------------------

CLIP = 0.1  # far below the updates' norms (about 1): every worker's update is clipped


def dp_run(workers: dict[str, WorkerProcess], metrics: Path, **settings: Any) -> RunResult:
    base = config(workers, evaluator=False, training_rounds=1, federate_after_n_batches=BATCHES, lr=LR)
    return run(Coordinator(replace(base, dp_clip=CLIP, metrics_out=metrics, **settings), report=lambda _: None).run())


def clipped_mean_of_plain_updates(workers: dict[str, WorkerProcess]) -> np.ndarray:
    """Each trainer's update for round 1, clipped to CLIP by numpy and averaged with equal weights."""
    start = initial_weights()

    async def updates() -> list[np.ndarray]:
        found = []
        for index, name in enumerate(TRAINERS):
            # The plan the coordinator sends in round 1 of a run with seed 1, less the clip.
            plan = TrainingPlan(round=1, batch_size=32, num_batches=BATCHES, lr=LR, seed=plan_seed(1, 1, index))
            async with WorkerLink(name, workers[name].uri, max_message_size=2**26, ping_interval=None) as client:
                await client.request(Hello())
                reply = await client.request(Fit("digits-cnn", start, replace(plan, delta=True)))
            assert isinstance(reply, FitResult)
            found.append(flat_float(reply.weights))
        return found

    deltas = run(updates())
    clipped = [delta * min(1.0, CLIP / float(np.sqrt(delta @ delta))) for delta in deltas]
    assert all(float(np.sqrt(delta @ delta)) > 2 * CLIP for delta in deltas)  # clipping really bites
    return np.mean(clipped, axis=0)


@pytest.fixture(scope="module")
def clipped_mean(digits_workers: dict[str, WorkerProcess]) -> np.ndarray:
    return clipped_mean_of_plain_updates(digits_workers)


def test_central_dp_adds_noise_z_c_to_the_sum_of_clipped_updates(
    digits_workers: dict[str, WorkerProcess], clipped_mean: np.ndarray, tmp_path: Path
) -> None:
    start = flat_float(initial_weights())
    z = 0.5
    noisy = dp_run(digits_workers, tmp_path / "c.jsonl", dp="central", dp_noise_multiplier=z)
    noise = flat_float(noisy.weights) - start - clipped_mean
    # The sum of three clipped updates gets N(0, (zC)^2) per value, then is divided by 3.
    expected_std = z * CLIP / 3
    print(f"\ncentral DP: noise std {noise.std():.5g}, expected {expected_std:.5g}")
    assert abs(noise.std() / expected_std - 1) < 0.01
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(noise.size)
    assert stats.normaltest(noise[:20000]).pvalue > 1e-4
    (event,) = rounds_of(tmp_path / "c.jsonl")
    accountant = PrivacyAccountant(z, 1.0, 1e-5)
    assert event["privacy"]["dp"] == "central" and event["privacy"]["clip"] == CLIP
    assert event["privacy"]["epsilon"] == pytest.approx(accountant.epsilon_after(1), rel=1e-9)


def test_central_dp_with_tiny_noise_is_the_equal_weight_mean_of_clipped_updates(
    digits_workers: dict[str, WorkerProcess], clipped_mean: np.ndarray, tmp_path: Path
) -> None:
    start = flat_float(initial_weights())
    for secure in (False, True):
        result = dp_run(
            digits_workers, tmp_path / f"t{secure}.jsonl", dp="central", dp_noise_multiplier=1e-6, secure_agg=secure
        )
        gap = np.abs(flat_float(result.weights) - start - clipped_mean)
        # Noise of std 3e-8 per value, float32 rounding of the weights, and (secure) fixed point.
        assert gap.max() < 1e-6 + float(np.spacing(np.float32(np.abs(start).max()))), secure


def test_distributed_dp_over_secure_aggregation_carries_the_full_noise(
    digits_workers: dict[str, WorkerProcess], clipped_mean: np.ndarray, tmp_path: Path
) -> None:
    start = flat_float(initial_weights())
    z = 0.5
    noisy = dp_run(digits_workers, tmp_path / "d.jsonl", dp="distributed", dp_noise_multiplier=z, secure_agg=True)
    noise = flat_float(noisy.weights) - start - clipped_mean
    # Each of three workers adds N(0, (zC)^2 / 3); their sum has (zC)^2; the mean divides by 3.
    expected_std = z * CLIP / 3
    print(f"\ndistributed DP: noise std {noise.std():.5g}, expected {expected_std:.5g}")
    assert abs(noise.std() / expected_std - 1) < 0.01
    (event,) = rounds_of(tmp_path / "d.jsonl")
    assert event["privacy"]["secure_agg"]["summed"] == 3 and event["privacy"]["dp"] == "distributed"


def test_the_target_epsilon_stops_the_run_cleanly_before_the_round_that_would_exceed_it(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z = 2.0
    accountant = PrivacyAccountant(z, 1.0, 1e-5)
    target = (accountant.epsilon_after(2) + accountant.epsilon_after(3)) / 2
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in TRAINERS)
    model, metrics = tmp_path / "model.pt", tmp_path / "metrics.jsonl"
    code = client_main(
        [
            *("--workers", workers, "--evaluator", f"testing={digits_workers['testing'].uri}", "--no-progress"),
            # --eval-every 5 evaluates rounds 1 and 5 as planned: the stop makes round 2 the last, evaluated too
            *("--training-rounds", "5", "--eval-every", "5", "--federate-after-n-batches", str(BATCHES)),
            *("--dp", "central", "--dp-clip", "0.01", "--dp-noise-multiplier", str(z)),
            *("--dp-target-epsilon", str(target)),
            *("--save-model", str(model), "--metrics-out", str(metrics)),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"Round 2: privacy spent epsilon {accountant.epsilon_after(2):.3f} at delta 1e-05" in out
    assert (
        f"Privacy budget reached: round 3 would spend epsilon {accountant.epsilon_after(3):.3f}, above the target"
        f" {target:g} at delta 1e-05; stopping after round 2 (epsilon {accountant.epsilon_after(2):.3f})"
    ) in out
    assert model.is_file()
    assert [event["round"] for event in rounds_of(metrics)] == [1, 2]
    assert "Final federated accuracy at round 2" in out
