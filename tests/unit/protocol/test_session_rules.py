"""The worker's session rules, event by event: no socket, no event loop (see syncfed/session_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from syncfed.exceptions import RequestFailed, SyncfedError
from syncfed.protocol import PROTOCOL_VERSION, REQUESTS, FitResult, Hello, Ping
from syncfed.protocol.session_rules import SessionRules
from syncfed.secagg import SecAggClient, SecAggConfig

LIMIT = 3


def refusal(rules: SessionRules, request_id: int, kind: str) -> tuple[str, str] | None:
    """The code and reason ``check_envelope`` refuses with, or None."""
    try:
        rules.check_envelope(request_id, kind)
    except RequestFailed as exc:
        return exc.code, exc.reason
    return None


def greeted(max_in_flight: int = LIMIT) -> SessionRules:
    rules = SessionRules(max_in_flight=max_in_flight)
    rules.start(1, Hello())
    rules.finish(1)
    return rules


def fit_result(loss: float = 0.5) -> FitResult:
    return FitResult({"w": np.zeros(2, np.float32)}, 4, loss, 0.1)


def secagg_config(session: bytes = bytes(16)) -> SecAggConfig:
    return SecAggConfig(num_clients=3, threshold=2, length=4, clip=1.0, session=session)


def test_request_failed_is_a_syncfed_error_with_its_code_and_reason() -> None:
    failure = RequestFailed("busy", "later")
    assert isinstance(failure, SyncfedError)
    assert (failure.code, failure.reason, str(failure)) == ("busy", "later", "later")


# Rules 1 to 5: from the envelope alone


def test_a_new_session_serves_hello_only() -> None:
    rules = SessionRules(max_in_flight=LIMIT)
    assert refusal(rules, 1, "hello") is None
    for kind in sorted(set(REQUESTS) - {"hello"}):
        assert refusal(rules, 2, kind) == ("out_of_order", f"{kind} before hello")


def test_only_requests_are_served() -> None:
    rules = greeted()
    assert refusal(rules, 2, "pong") == ("unknown_kind", "message kind 'pong' is not a request")
    assert refusal(rules, 2, "launch") == ("unknown_kind", "message kind 'launch' is not a request")


def test_id_zero_is_reserved() -> None:
    assert refusal(greeted(), 0, "ping") == ("malformed", "request id 0 is reserved for unattributable errors")


def test_a_hello_of_this_version_greets_as_soon_as_it_starts() -> None:
    rules = SessionRules(max_in_flight=LIMIT)
    rules.start(1, Hello())
    assert rules.greeted
    assert refusal(rules, 2, "ping") is None  # pipelined behind a hello not yet answered


def test_a_hello_of_another_version_does_not_greet_and_is_refused() -> None:
    rules = SessionRules(max_in_flight=LIMIT)
    hello = Hello(PROTOCOL_VERSION + 1)
    rules.start(1, hello)
    assert not rules.greeted
    with pytest.raises(RequestFailed) as raised:
        SessionRules.check_hello(hello)
    assert (raised.value.code, raised.value.reason) == (
        "unsupported_version",
        f"protocol version {PROTOCOL_VERSION + 1} is not supported (this worker speaks {PROTOCOL_VERSION})",
    )
    SessionRules.check_hello(Hello())  # ours passes
    rules.finish(1)
    assert refusal(rules, 2, "ping") == ("out_of_order", "ping before hello")


def test_an_id_is_unique_while_in_flight_and_free_once_answered() -> None:
    rules = greeted()
    rules.start(7, Ping())
    assert refusal(rules, 7, "ping") == ("out_of_order", "request id 7 is already in flight")
    assert refusal(rules, 8, "ping") is None
    rules.finish(7)
    assert refusal(rules, 7, "ping") is None


def test_the_in_flight_limit_at_and_past_it() -> None:
    rules = greeted()
    for request_id in range(2, 2 + LIMIT - 1):
        rules.start(request_id, Ping())
    assert refusal(rules, 10, "ping") is None  # the last place
    rules.start(10, Ping())
    assert refusal(rules, 11, "ping") == ("busy", f"{LIMIT + 1} requests in flight exceed limit of {LIMIT}")
    rules.finish(10)
    assert refusal(rules, 11, "ping") is None


def test_the_rules_are_checked_in_order() -> None:
    # Not greeted and full: each request is refused by the first rule it breaks.
    rules = SessionRules(max_in_flight=1)
    rules.start(5, Hello(PROTOCOL_VERSION + 1))  # in flight, not greeting
    assert refusal(rules, 0, "pong") == ("unknown_kind", "message kind 'pong' is not a request")
    assert refusal(rules, 0, "ping") == ("malformed", "request id 0 is reserved for unattributable errors")
    assert refusal(rules, 5, "ping") == ("out_of_order", "ping before hello")
    assert refusal(rules, 5, "hello") == ("out_of_order", "request id 5 is already in flight")
    assert refusal(rules, 6, "hello") == ("busy", "2 requests in flight exceed limit of 1")


# Rule 6: held updates


def test_a_held_update_is_fetched_once_by_its_token() -> None:
    rules = greeted()
    assert not rules.busy
    reply = fit_result()
    token, dropped = rules.hold(reply, "fp16")
    assert dropped is None
    assert rules.busy  # an update waiting keeps the connection from being idle
    with pytest.raises(RequestFailed) as raised:
        rules.fetch(token + 1)
    assert (raised.value.code, raised.value.reason) == ("out_of_order", f"no update is held under token {token + 1}")
    held = rules.fetch(token)
    assert (held.token, held.reply, held.compression) == (token, reply, "fp16")
    assert not rules.busy
    with pytest.raises(RequestFailed, match=f"^no update is held under token {token}$"):
        rules.fetch(token)


def test_one_update_is_held_a_newer_drops_the_older() -> None:
    rules = greeted()
    first, _ = rules.hold(fit_result(0.1), "none")
    second, dropped = rules.hold(fit_result(0.2), "none")
    assert dropped == first and second != first
    with pytest.raises(RequestFailed, match=f"^no update is held under token {first}$"):
        rules.fetch(first)
    assert rules.fetch(second).reply.loss == 0.2


def test_tokens_are_never_reused_on_a_connection() -> None:
    rules = greeted()
    tokens = []
    for _ in range(3):
        token, _ = rules.hold(fit_result(), "none")
        rules.fetch(token)
        tokens.append(token)
    assert len(set(tokens)) == 3


# Rule 7: one secure aggregation round


def test_steps_need_the_open_round_and_unmasking_closes_it() -> None:
    rules = greeted()
    session = bytes(range(16))
    with pytest.raises(RequestFailed) as raised:
        rules.round_for(session)
    assert (raised.value.code, raised.value.reason) == (
        "out_of_order",
        "no secure aggregation round with this session is open",
    )
    config = secagg_config(session)
    client = SecAggClient(config, 0)
    rules.open_round(config, client)
    assert rules.round_for(session).client is client
    with pytest.raises(RequestFailed, match="^no secure aggregation round with this session is open$"):
        rules.round_for(bytes(16))  # another session
    rules.close_round()
    with pytest.raises(RequestFailed, match="^no secure aggregation round with this session is open$"):
        rules.round_for(session)


def test_a_new_round_replaces_the_open_one() -> None:
    rules = greeted()
    old, new = secagg_config(b"a" * 16), secagg_config(b"b" * 16)
    rules.open_round(old, SecAggClient(old, 0))
    rules.open_round(new, SecAggClient(new, 1))
    assert rules.round_for(b"b" * 16).config is new
    with pytest.raises(RequestFailed, match="^no secure aggregation round with this session is open$"):
        rules.round_for(b"a" * 16)
