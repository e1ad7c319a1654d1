"""WorkerLink: one way to build it from shared settings, its old name kept for one release, and a request given
up midway that leaves the connection usable."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import ssl
from pathlib import Path

import numpy as np
import pytest
from linkpair import LinkPair
from websockets.exceptions import ConnectionClosed

import syncfed.client
import syncfed.spawn
import syncfed.transport
from syncfed.cli.common import link_settings
from syncfed.exceptions import ConfigError, WorkerUnavailable
from syncfed.net import link as link_module
from syncfed.net import spawn, transport
from syncfed.net.link import SEND_SLOTS, LinkSettings, WorkerClient, WorkerLink
from syncfed.protocol import Fit, Hello, Ping, Pong, TrainingPlan, encode_fragments

#: What a link is made of: the settings it was given.
SETTINGS = [field.name for field in dataclasses.fields(LinkSettings)]


def described(link: WorkerLink) -> dict[str, object]:
    return {"name": link.name, "uri": link.uri, **{name: getattr(link, name) for name in SETTINGS}}


def test_from_settings_builds_the_link_the_constructor_builds() -> None:
    tls = ssl.create_default_context()
    settings = LinkSettings(
        max_message_size=2**20,
        chunk_size=2**17,
        connect_timeout=1.5,
        request_timeout=7.0,
        ping_interval=None,
        ping_timeout=None,
        tls=tls,
        auth_token=b"t" * 16,
    )
    built = WorkerLink.from_settings("alice", "wss://localhost:1", settings)
    by_hand = WorkerLink(
        "alice",
        "wss://localhost:1",
        max_message_size=2**20,
        chunk_size=2**17,
        connect_timeout=1.5,
        request_timeout=7.0,
        ping_interval=None,
        ping_timeout=None,
        tls=tls,
        auth_token=b"t" * 16,
        sends=settings.sends,
    )
    assert described(built) == described(by_hand)
    assert built.tls is tls and not built.connected


def test_the_settings_defaults_are_the_constructors() -> None:
    """Except the streamed sends' limit: it is shared by the links made from one settings, so a link made
    alone has none."""
    settings = LinkSettings(max_message_size=1000)
    built = WorkerLink.from_settings("bob", "ws://localhost:2", settings)
    alone = WorkerLink("bob", "ws://localhost:2", max_message_size=1000)
    assert alone.sends is None
    assert described(built) == described(
        WorkerLink("bob", "ws://localhost:2", max_message_size=1000, sends=settings.sends)
    )
    other = WorkerLink.from_settings("carol", "ws://localhost:3", settings)
    assert other.sends is built.sends and LinkSettings(max_message_size=1000).sends is not settings.sends


def test_the_links_of_one_settings_send_at_most_send_slots_streamed_requests_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each streamed send holds a frame and its masked copy: 30 at once raised the coordinator's peak."""
    sending, most = 0, 0

    async def send_message(connection: object, outgoing: object) -> None:
        nonlocal sending, most
        sending += 1
        most = max(most, sending)
        await asyncio.sleep(0.01)
        sending -= 1

    monkeypatch.setattr(link_module, "send_message", send_message)
    weights = {"w": np.zeros(1000, np.float32)}
    streamed = encode_fragments(1, Fit("digits-cnn", weights, TrainingPlan(1, 8, 1, 0.1, 1)), chunk_size=1024)
    single = encode_fragments(1, Ping(), chunk_size=1024)
    assert streamed.streamed and not single.streamed

    async def scenario() -> None:
        sends = LinkSettings(max_message_size=2**20).sends
        await asyncio.gather(*(link_module._send_whole(object(), streamed, sends) for _ in range(3 * SEND_SLOTS)))
        assert most == SEND_SLOTS
        await asyncio.gather(*(link_module._send_whole(object(), single, sends) for _ in range(3 * SEND_SLOTS)))

    asyncio.run(scenario())
    assert most == 3 * SEND_SLOTS  # a single frame takes no slot


def test_the_old_names_are_the_new_objects() -> None:
    assert WorkerClient is WorkerLink
    assert syncfed.client.WorkerClient is WorkerLink and syncfed.client.LinkSettings is LinkSettings
    # The shim keeps the names that existed at the old path; helpers added since live only in net/.
    for name in syncfed.transport.__all__:
        assert getattr(syncfed.transport, name) is getattr(transport, name)
    assert syncfed.spawn.spawn_workers is spawn.spawn_workers
    assert syncfed.spawn.WorkerProcess is spawn.WorkerProcess


def flags(**given: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "max_message_size": 4096,
        "connect_timeout": 2.0,
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
        "auth_token_file": None,
    }
    return argparse.Namespace(**{**values, **given})


def test_a_tools_link_settings_come_from_its_flags(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"  0123456789abcdef\n")
    plain = link_settings(flags(auth_token_file=token), "ws://localhost:1", request_timeout=9.0)
    assert plain == LinkSettings(
        max_message_size=4096,
        connect_timeout=2.0,
        request_timeout=9.0,
        ping_interval=None,
        auth_token=b"0123456789abcdef",
    )
    secure = link_settings(flags(), "wss://localhost:1")
    assert isinstance(secure.tls, ssl.SSLContext) and secure.tls.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_files_are_read_for_wss_workers_only(tmp_path: Path) -> None:
    missing = flags(tls_ca=tmp_path / "no-ca.pem")
    assert link_settings(missing, "ws://localhost:1").tls is None
    with pytest.raises(ConfigError, match="^cannot load TLS files"):
        link_settings(missing, "wss://localhost:1")


def test_a_request_given_up_mid_message_is_sent_whole_and_the_connection_goes_on() -> None:
    async def scenario() -> tuple[bool, bool]:
        async with LinkPair() as pair:
            link = WorkerLink("linked", pair.uri, max_message_size=pair.config.max_message_size, chunk_size=16384)
            async with link:
                await link.request(Hello())
                plan = TrainingPlan(round=1, batch_size=8, num_batches=1, lr=0.1, seed=0)
                big = Fit("digits-cnn", {"w": np.ones(4_000_000, np.float32)}, plan)  # 16 MB in 16 KiB fragments
                request = asyncio.create_task(link.request(big))
                for _ in range(5):  # into the send, a few fragments out
                    await asyncio.sleep(0)
                request.cancel()  # an aborted job, say
                with pytest.raises(asyncio.CancelledError):
                    await request
                answer = await link.request(Ping(), timeout=10)
                return link.connected, isinstance(answer, Pong)

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (True, True)


def test_a_request_whose_send_fails_after_the_reader_failed_it_leaves_no_unretrieved_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection ends mid-send: the reader fails the waiting reply first, then the send raises.

    The reply's failure is the request's own news; left unretrieved, asyncio logs it when the future is
    collected, and that log line broke the CLI's one-line error (seen in CI when a killed worker left a
    quorum unmet).
    """
    reported: list[dict[str, object]] = []

    async def scenario() -> str:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        async with LinkPair() as pair:
            link = WorkerLink("linked", pair.uri, max_message_size=pair.config.max_message_size)
            async with link:
                await link.request(Hello())
                reader = link._reader
                assert reader is not None and link._connection is not None

                async def send_message(connection: object, outgoing: object) -> None:
                    link._connection.transport.abort()  # the worker is gone mid-send
                    await reader  # the reader sees it first and fails the waiting reply
                    assert not link._pending
                    raise ConnectionClosed(None, None)

                monkeypatch.setattr(link_module, "send_message", send_message)
                failure = ""
                try:
                    await link.request(Ping(), timeout=10)
                except WorkerUnavailable as exc:
                    failure = str(exc)  # not the exception: its traceback would keep the reply alive
                gc.collect()
                await asyncio.sleep(0)
                return failure

    failure = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "linked is unavailable: connection lost" in failure
    assert reported == []
