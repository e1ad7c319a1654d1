"""One worker session through a LinkPair: a real worker in this event loop, no subprocess.

The rules themselves are tested event by event in tests/unit/test_session_rules.py;
here they are seen from the wire, with the replies the worker really sends.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from linkpair import MS, TINY, LinkPair, digits_weights, tiny_digits

from syncfed.exceptions import RemoteError
from syncfed.protocol import (
    REQUESTS,
    Envelope,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Ping,
    Pong,
    TrainingPlan,
    encode,
)
from syncfed.worker import Worker
from syncfed.worker.session import Session

T = TypeVar("T")

TEST_TIMEOUT = 60_000 * MS
PLAN = TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.05, seed=3)
#: A fit that keeps the compute busy until its connection goes: one batch per 50 ms, for minutes.
SLOW = TrainingPlan(round=1, batch_size=1, num_batches=10_000, lr=0.01, seed=1)
SLOW_BATCH = 50 * MS


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coroutine

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return digits_weights()


def test_every_request_kind_but_fetch_has_a_handler() -> None:
    worker = Worker(LinkPair().config, tiny_digits())
    session = Session(worker, None, "nobody")  # type: ignore[arg-type]  # the table needs no connection
    assert set(session.handlers) == set(REQUESTS) - {Fetch.kind}  # a fetch is handed over by the rules


def test_hello_comes_first_and_only_ours_greets(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair() as pair, pair.raw() as peer:
            await peer.request(3, Fit("digits-cnn", weights, PLAN))
            assert await peer.expect_error(3, "out_of_order") == "fit before hello"
            await peer.request(4, Hello(2))
            assert await peer.expect_error(4, "unsupported_version") == (
                "protocol version 2 is not supported (this worker speaks 1)"
            )
            await peer.request(5, Ping())
            assert await peer.expect_error(5, "out_of_order") == "ping before hello"
            info = await peer.hello(6)
            assert (info.worker_id, info.role, info.num_examples) == ("linked", "trainer", TINY)
            await peer.request(7, Ping())
            assert await peer.receive() == Envelope(7, Pong())

    run(scenario())


def test_requests_pipelined_after_hello_are_served() -> None:
    async def scenario() -> None:
        async with LinkPair() as pair, pair.raw() as peer:
            await peer.request(1, Hello())
            await peer.request(2, Ping())
            replies = {reply.id: reply.message for reply in [await peer.receive(), await peer.receive()]}
            assert isinstance(replies[1], Info) and replies[2] == Pong()

    run(scenario())


def test_a_duplicate_id_in_flight_is_refused(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair(batch_delay=SLOW_BATCH) as pair, pair.raw() as peer:
            await peer.hello()
            await peer.request(20, Fit("digits-cnn", weights, SLOW))
            await peer.request(20, Ping())
            assert await peer.expect_error(20, "out_of_order") == "request id 20 is already in flight"
            await peer.request(21, Ping())  # another id is served beside the fit
            assert await peer.receive() == Envelope(21, Pong())

    run(scenario())


def test_past_the_in_flight_limit_a_request_is_busy(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair(batch_delay=SLOW_BATCH, max_in_flight=2) as pair, pair.raw() as peer:
            await peer.hello()
            await peer.request(2, Fit("digits-cnn", weights, SLOW))  # holds the compute
            await peer.request(3, Evaluate("digits-cnn", weights, 16))  # waits for it
            await peer.request(4, Ping())
            assert await peer.expect_error(4, "busy") == "3 requests in flight exceed limit of 2"
            await peer.assert_silent()

    run(scenario())


def test_a_held_update_is_fetched_once_by_its_token(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair() as pair:
            await pair.client.request(Hello())
            held = await pair.client.request(Fit("digits-cnn", weights, TrainingPlan(1, 8, 2, 0.05, 3, hold=True)))
            assert isinstance(held, FitHeld)
            with pytest.raises(RemoteError) as raised:
                await pair.client.request(Fetch(held.token + 1))
            assert (raised.value.code, raised.value.reason) == (
                "out_of_order",
                f"no update is held under token {held.token + 1}",
            )
            fetched = await pair.client.request(Fetch(held.token))
            assert isinstance(fetched, FitResult) and fetched.num_examples == TINY
            with pytest.raises(RemoteError) as raised:
                await pair.client.request(Fetch(held.token))
            assert raised.value.reason == f"no update is held under token {held.token}"

    run(scenario())


def test_a_newer_held_update_drops_the_older(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair() as pair:
            await pair.client.request(Hello())
            plan = TrainingPlan(1, 8, 1, 0.05, 3, hold=True)
            first = await pair.client.request(Fit("digits-cnn", weights, plan))
            second = await pair.client.request(Fit("digits-cnn", weights, plan))
            assert isinstance(first, FitHeld) and isinstance(second, FitHeld) and first.token != second.token
            with pytest.raises(RemoteError, match="out_of_order"):
                await pair.client.request(Fetch(first.token))
            assert isinstance(await pair.client.request(Fetch(second.token)), FitResult)

    run(scenario())


Payload = Callable[[dict[str, np.ndarray]], bytes]


@pytest.mark.parametrize(
    ("payload", "request_id", "code", "reason"),
    [
        (lambda w: b"\xc1", 0, "malformed", "invalid msgpack: "),
        (lambda w: encode(5, Hello())[:-4], 0, "malformed", "invalid msgpack: "),
        (lambda w: encode(0, Ping()), 0, "malformed", "request id 0 is reserved for unattributable errors"),
        (lambda w: encode(9, Pong()), 9, "unknown_kind", "message kind 'pong' is not a request"),
        (
            lambda w: encode(10, Fit("no-such-model", w, PLAN)),
            10,
            "unknown_model",
            "model 'no-such-model' is not registered on this worker",
        ),
    ],
    ids=["never_used_byte", "truncated", "id_zero", "reply_as_request", "unknown_model"],
)
def test_a_bad_message_gets_an_error_reply_and_the_session_goes_on(
    weights: dict[str, np.ndarray], payload: Payload, request_id: int, code: str, reason: str
) -> None:
    async def scenario() -> None:
        async with LinkPair() as pair, pair.raw() as peer:
            await peer.hello()
            await peer.send(payload(weights))
            assert (await peer.expect_error(request_id, code)).startswith(reason)
            await peer.assert_silent()
            await peer.request(2, Ping())
            assert await peer.receive() == Envelope(2, Pong())

    run(scenario())


def test_a_fit_and_an_evaluation_work(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> tuple[FitResult, EvalResult]:
        async with LinkPair() as pair:
            info = await pair.client.request(Hello())
            assert isinstance(info, Info) and "digits-cnn" in info.models
            fitted = await pair.client.request(Fit("digits-cnn", weights, PLAN))
            assert isinstance(fitted, FitResult)
            scored = await pair.client.request(Evaluate("digits-cnn", fitted.weights, 16))
            assert isinstance(scored, EvalResult)
            return fitted, scored

    fitted, scored = run(scenario())
    assert fitted.num_examples == TINY and math.isfinite(fitted.loss)
    assert list(fitted.weights) == list(weights)
    assert any(not np.array_equal(fitted.weights[name], weights[name]) for name in weights), "nothing was trained"
    assert scored.num_examples == TINY and 0 <= scored.correct <= TINY and math.isfinite(scored.loss)
