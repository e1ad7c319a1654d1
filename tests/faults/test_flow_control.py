"""Flow control: workers hold finished updates and the coordinator fetches them a few at a time.

The wire messages are checked here through the codec, the worker's side
against a real worker process, and the coordinator's side by counting the
fetches in flight during real runs. The memory this saves is measured by
``scripts/bench.py --only memory`` (docs/performance.md), not here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from typing import Any

import numpy as np
import pytest
from conftest import config, run
from units import MS

from syncfed.coordinator import Coordinator
from syncfed.exceptions import ProtocolError, RemoteError
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import (
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Message,
    MessageDecoder,
    TrainingPlan,
    decode,
    encode,
    reply_kind,
)

PLAN = TrainingPlan(round=1, batch_size=32, num_batches=2, lr=0.05, seed=3)


def over_the_wire(message: Message) -> Message:
    return decode(encode(7, message)).message


def test_a_holding_plan_and_its_messages_cross_the_wire() -> None:
    held = dataclasses.replace(PLAN, hold=True)
    assert held.to_body()["hold"] is True and "hold" not in PLAN.to_body()  # off the wire by default
    assert TrainingPlan.from_body(held.to_body()) == held
    for message in (FitHeld(5), Fetch(2**63 - 1)):
        assert over_the_wire(message) == message
    fit = Fit("digits-cnn", {}, held)
    assert reply_kind(fit) == "fit_held"
    assert reply_kind(dataclasses.replace(fit, plan=PLAN)) == reply_kind(Fetch(1)) == "fit_result"
    for token in (0, -1, 2**63, True, 1.0):
        with pytest.raises(ProtocolError, match="^token must be a positive integer"):
            Fetch(token)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="^hold must be true or false"):
        TrainingPlan.from_body({**PLAN.to_body(), "hold": 1})


WEIGHTS = get_weights(DigitsCNN())


def fit(plan: TrainingPlan = PLAN) -> Fit:
    return Fit("digits-cnn", WEIGHTS, plan)


def test_a_worker_holds_an_update_until_it_is_fetched_once(digits_workers: dict[str, WorkerProcess]) -> None:
    async def scenario() -> tuple[FitResult, FitResult, FitResult, list[str]]:
        errors = []
        async with WorkerLink(
            "alice", digits_workers["alice"].uri, max_message_size=2**26, connect_timeout=10_000 * MS
        ) as client:
            await client.request(Hello())
            plain = await client.request(fit())
            held = await client.request(fit(dataclasses.replace(PLAN, hold=True)))
            assert isinstance(held, FitHeld)
            fetched = await client.request(Fetch(held.token))
            with pytest.raises(RemoteError) as again:
                await client.request(Fetch(held.token))
            errors.append(str(again.value))
            # A newer holding fit replaces an update never fetched: a coordinator that forgets costs one update.
            compressed = dataclasses.replace(PLAN, hold=True, compress="fp16")
            first = await client.request(fit(compressed))
            second = await client.request(fit(compressed))
            assert isinstance(first, FitHeld) and isinstance(second, FitHeld) and second.token > first.token
            with pytest.raises(RemoteError) as replaced:
                await client.request(Fetch(first.token))
            errors.append(str(replaced.value))
            last = await client.request(Fetch(second.token))
        assert isinstance(plain, FitResult) and isinstance(fetched, FitResult) and isinstance(last, FitResult)
        return plain, fetched, last, errors

    plain, fetched, last, errors = run(scenario())
    # Same weights, plan and seed: the very update a plain fit returns.
    assert (fetched.num_examples, fetched.loss) == (plain.num_examples, plain.loss)
    assert all(np.array_equal(fetched.weights[name], plain.weights[name]) for name in plain.weights)
    assert last.compression_error > 0 and fetched.compression_error == 0  # the held reply kept its plan's encoding
    assert errors[0].startswith("alice answered with error out_of_order: no update is held under token ")
    assert errors[1].startswith("alice answered with error out_of_order: no update is held under token ")


def counting_fetches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the fetches the coordinator has in flight at once, and in all."""
    counts = {"now": 0, "most": 0, "all": 0}
    original = WorkerLink.request

    async def request(self: WorkerLink, message: Message, *args: Any, **kwargs: Any) -> Message:
        if not isinstance(message, Fetch):
            return await original(self, message, *args, **kwargs)
        counts["now"] += 1
        counts["all"] += 1
        counts["most"] = max(counts["most"], counts["now"])
        try:
            await asyncio.sleep(50 * MS)  # keep it in flight long enough for others to pile up, were they allowed
            return await original(self, message, *args, **kwargs)
        finally:
            counts["now"] -= 1

    monkeypatch.setattr(WorkerLink, "request", request)
    return counts


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_coordinator_receives_at_most_its_slots_at_once(
    digits_workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    settings: dict[str, Any] = {"training_rounds": 3, "federate_after_n_batches": 2, "mode": mode}
    if mode == "async":
        settings["buffer_size"] = 2
    unlimited = run(Coordinator(config(digits_workers, evaluator=False, receive_slots=0, **settings)).run())
    counts = counting_fetches(monkeypatch)
    assert counts["all"] == 0
    limited = run(Coordinator(config(digits_workers, evaluator=False, receive_slots=1, **settings)).run())
    assert counts["most"] == 1  # three workers finish together, one update at a time comes in
    assert len(limited.rounds) == len(unlimited.rounds) == 3
    if mode == "async":  # every version folds a buffer of two fetched updates
        assert counts["all"] >= 2 * len(limited.rounds)
        return
    assert counts["all"] == 3 * 3
    assert [r.workers for r in limited.rounds] == [r.workers for r in unlimited.rounds]
    for name, array in unlimited.weights.items():  # the same updates, folded in another order: the same model
        np.testing.assert_allclose(limited.weights[name], array, rtol=0, atol=1e-6, err_msg=name)


def test_the_client_keeps_nothing_of_a_reply_once_it_is_delivered(
    digits_workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection's last reply used to stay alive until the next one came: 30 idle workers, 30 models."""
    import syncfed.net.link as client_module

    decoders: list[weakref.ref[MessageDecoder]] = []
    original = client_module.receive_message

    async def receive_message(connection: Any, max_size: int, **options: Any) -> MessageDecoder:
        decoder = await original(connection, max_size, **options)
        decoders.append(weakref.ref(decoder))
        return decoder

    monkeypatch.setattr(client_module, "receive_message", receive_message)

    async def scenario() -> list[bool]:
        async with WorkerLink(
            "alice",
            digits_workers["alice"].uri,
            max_message_size=2**26,
            connect_timeout=10_000 * MS,
            ping_interval=None,
        ) as client:
            await client.request(Hello())
            reply = await client.request(fit())
            assert isinstance(reply, FitResult)
            del reply
            await asyncio.sleep(100 * MS)  # the connection idles, waiting for the next message
            gc.collect()
            return [ref() is not None for ref in decoders]

    assert run(scenario()) == [False, False]  # the info and the fit reply, both gone while the connection is open
