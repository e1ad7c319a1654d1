"""Workers that dial out: the flags and their refusals, the coordinator's token list, the redial
schedule, and the handshake's binding of the claimed id. Pure: no sockets, no event loop."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from syncfed import auth
from syncfed.cli import coordinator, worker
from syncfed.cli.common import parse_arguments
from syncfed.config import CoordinatorConfig, WorkerConfig, parse_endpoints, parse_listen
from syncfed.coordinator.pool import dial_in_listener, worker_links
from syncfed.exceptions import AuthenticationFailed, ConfigError
from syncfed.redial import Redial

TOKEN = b"0123456789abcdef0123"


def coordinator_config(*flags: str) -> CoordinatorConfig:
    args = parse_arguments(coordinator.build_parser(), list(flags))
    return coordinator.config_from_args(args, *coordinator._endpoints(args))


def test_a_mixed_run_names_dial_in_and_connect_in_workers_side_by_side(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    config = coordinator_config(
        "--workers", "alice=dial-in,bob=ws://10.0.0.6:8777", "--evaluator", "testing=dial-in",
        "--listen", "0.0.0.0:8765", "--worker-tokens", str(tokens),
    )  # fmt: skip
    assert config.workers == {"alice": "dial-in", "bob": "ws://10.0.0.6:8777"}
    assert config.dial_in == ("alice", "testing")
    assert config.worker_tokens == tokens
    assert parse_listen(config.listen or "") == ("0.0.0.0", 8765)
    assert parse_listen("[::1]:0") == ("::1", 0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "alice=dial-in"], "worker alice dials in: add --listen HOST:PORT"),
        (
            ["--workers", "alice=dial-in", "--listen", "127.0.0.1:8765"],
            "--listen lets in only workers that prove their id: add --worker-tokens FILE, or --tls-ca with"
            " --tls-cert and --tls-key for client certificates (--insecure-listen: local tests only)",
        ),
        (
            ["--workers", "alice=ws://h:1", "--listen", "127.0.0.1:8765", "--insecure-listen"],
            "--listen needs a worker that dials in, named as NAME=dial-in in --workers or --evaluator",
        ),
        (["--workers", "alice=dial-in", "--listen", "8765", "--insecure-listen"], "--listen '8765' must look like"),
        (
            ["--workers", "alice=dial-in", "--listen", "h:1", "--insecure-listen", "--max-pending-connections", "0"],
            "max pending connections 0 is below the minimum of 1",
        ),
        (["--workers", "a/b=dial-in"], "dial-in worker id 'a/b' must be letters, digits"),
    ],
)
def test_dial_in_settings_that_cannot_work_or_are_unsafe_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        coordinator_config("--evaluator", "", *flags)
    assert str(caught.value).startswith(message)


def test_insecure_listen_is_an_explicit_choice() -> None:
    config = coordinator_config("--workers", "alice=dial-in", "--evaluator", "", "--listen", "h:1", "--insecure-listen")
    assert config.insecure_listen and config.worker_tokens is None


def test_only_the_coordinator_run_accepts_dial_in_entries() -> None:
    with pytest.raises(ConfigError, match="must look like alice=ws://localhost:8777"):
        parse_endpoints("alice=dial-in")  # --status and analytics connect in only


def test_a_worker_dials_out_to_a_websocket_address_under_a_plain_id() -> None:
    args = parse_arguments(worker.build_parser(), ["--id", "alice", "--connect", "wss://c.example.org:8765"])
    config = worker.config_from_args(args)
    assert config.connect == "wss://c.example.org:8765" and config.redial_max_delay == 30.0
    with pytest.raises(ConfigError, match=r"^--connect 'c.example.org:8765' must be a ws:// or wss:// address$"):
        WorkerConfig("alice", connect="c.example.org:8765")
    with pytest.raises(ConfigError, match=r"^worker id 'al ice' must be letters"):
        WorkerConfig("al ice", connect="ws://c:1")


def test_the_worker_token_list_reads_ids_and_files_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alice.token").write_bytes(TOKEN + b"\n")
    (tmp_path / "bob.token").write_bytes(TOKEN[::-1])
    listing = tmp_path / "tokens.txt"
    listing.write_text("# dial-in workers\nalice keys/alice.token\n\nbob bob.token  # the second site\n")
    assert auth.read_worker_tokens(listing) == {"alice": TOKEN, "bob": TOKEN[::-1]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "line 1 must be 'ID TOKEN-FILE', not 'alice'"),
        ("alice a.token\nalice a.token\n", "line 2: worker id 'alice' appears twice"),
        ("alice short.token\n", "has 5 bytes, below the minimum of 16 bytes"),
        ("alice missing.token\n", "cannot read auth token file"),
        ("alice a.token\nbob a.token\n", "line 2: worker 'bob' has the same token as 'alice'"),
    ],
)
def test_a_bad_token_list_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a.token").write_bytes(TOKEN)
    (tmp_path / "short.token").write_bytes(b"short")
    listing = tmp_path / "tokens.txt"
    listing.write_text(text)
    with pytest.raises(ConfigError) as caught:
        auth.read_worker_tokens(listing)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_redial_delays_double_to_the_cap_each_in_the_upper_half_of_its_step() -> None:
    steps = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    for seed in range(20):
        redial = Redial(first=0.5, cap=30.0, rng=random.Random(seed))
        delays = [redial.next_delay() for _ in steps]
        assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
        redial.reset()
        assert 0.25 <= redial.next_delay() <= 0.5  # a connection made starts the schedule over


def test_redial_jitter_spreads_workers_dropped_together() -> None:
    firsts = {round(Redial(rng=random.Random(seed)).next_delay(), 6) for seed in range(10)}
    assert len(firsts) == 10
    with pytest.raises(ConfigError, match="redial delays must satisfy 0 < first <= cap"):
        Redial(first=5.0, cap=1.0)


def test_a_dial_in_proof_holds_only_for_the_id_it_claims() -> None:
    """The reversed handshake: the coordinator challenges, the worker responds for the id it claims."""
    frame, nonce = auth.challenge()
    response, _, own = auth.respond(TOKEN, frame, context=auth.dial_in_context("bob"))
    assert auth.verify_response(TOKEN, nonce, response, context=auth.dial_in_context("bob")) == own
    for context in (auth.dial_in_context("alice"), b""):  # another id, or the connect-in direction
        with pytest.raises(AuthenticationFailed, match="^wrong token$"):
            auth.verify_response(TOKEN, nonce, response, context=context)


def test_a_dial_in_worker_missing_from_the_token_list_stops_the_run_before_it_listens(tmp_path: Path) -> None:
    listing = tmp_path / "tokens.txt"
    listing.write_text("# nobody yet\n")  # an empty list: no worker can prove an id
    config = CoordinatorConfig(workers={"alice": "dial-in"}, evaluator={}, listen="127.0.0.1:0", worker_tokens=listing)
    with pytest.raises(ConfigError, match=rf"^dial-in worker alice has no token in {re.escape(str(listing))}$"):
        dial_in_listener(config, worker_links(config), report=print)
