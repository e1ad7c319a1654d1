"""A dial-out worker's id is the one its certificate from ``provision`` proves.

In one process, over real sockets on 127.0.0.1: the coordinator's listener
with the provisioned coordinator certificate (mutual TLS), and dial-out
workers with their startup kits. alice gets in as alice, and again after her
connection is dropped; a worker that presents alice's certificate as bob is
refused before any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import pytest
from units import MS

from syncfed.cli import coordinator, worker
from syncfed.cli.common import parse_arguments
from syncfed.config import DIAL_IN, CoordinatorConfig, WorkerConfig
from syncfed.coordinator.pool import Pool, worker_links
from syncfed.exceptions import AuthenticationFailed, WorkerUnavailable
from syncfed.net.dial_in import DialInLink, DialInListener
from syncfed.net.transport import server_tls
from syncfed.protocol import Hello, Info
from syncfed.provision import Participant, Project, provision
from syncfed.redial import Redial
from syncfed.worker import Worker, load_holdings
from syncfed.worker.dialer import dial_out

TIMEOUT = 20_000 * MS


def dialing(kits: dict[str, Path], name: str, kit: str, uri: str) -> Worker:
    """Worker ``name`` dialing ``uri`` with the certificate of ``kit``."""
    folder = kits[kit]
    config = WorkerConfig(
        name,
        connect=uri,
        tls_cert=folder / f"{kit}.crt",
        tls_key=folder / f"{kit}.key",
        tls_ca=folder / "ca.crt",
        allow_coordinators=("coordinator",),
        digits=(0, 1),
    )
    return Worker(config, load_holdings(config))


@pytest.fixture
def kits(tmp_path: Path) -> dict[str, Path]:
    workers = tuple(Participant(name, dial_out=True) for name in ("alice", "bob"))
    project = Project("dial", "coordinator", workers, coordinator_hosts=("127.0.0.1",))
    return provision(project, tmp_path / "startup")


def test_a_dial_out_worker_is_let_in_as_the_id_its_certificate_names(kits: dict[str, Path]) -> None:
    async def scenario() -> tuple[Info, str, list[str]]:
        coordinator = kits["coordinator"]
        links = {
            name: DialInLink(name, DIAL_IN, max_message_size=2**24, connect_timeout=TIMEOUT)
            for name in ("alice", "bob")
        }
        reports: list[str] = []
        listener = DialInListener(
            links,
            host="127.0.0.1",
            port=0,
            report=reports.append,
            tls=server_tls(coordinator / "coordinator.crt", coordinator / "coordinator.key", coordinator / "ca.crt"),
            max_message_size=2**24,
        )
        uri = await listener.open()
        alice = asyncio.create_task(dial_out(dialing(kits, "alice", "alice", uri), report=reports.append))
        try:
            await links["alice"].connect()
            info = await links["alice"].request(Hello())
            assert isinstance(info, Info)
            # Dropped (the coordinator closes it, as after a timeout), alice dials again and is served again.
            await links["alice"].close()
            await links["alice"].connect()
            again = await links["alice"].request(Hello())
            assert isinstance(again, Info) and again.worker_id == "alice"
            impostor = dialing(kits, "bob", "alice", uri)  # bob's id, alice's certificate
            with pytest.raises(AuthenticationFailed) as refused:
                await dial_out(impostor, report=reports.append, redial=Redial(first=0.01, cap=0.01))
            return info, str(refused.value), reports
        finally:
            alice.cancel()
            await links["alice"].close()
            await listener.close()

    info, refusal, reports = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert info.worker_id == "alice"
    assert refusal.startswith("bob: refused by the coordinator at wss://127.0.0.1:")
    assert refusal.endswith(": a certificate for 'alice' cannot claim worker id 'bob'")
    assert reports[0].startswith("alice: connected to wss://127.0.0.1:")
    assert reports[1].startswith("alice: connection lost (closed by the coordinator: 1000), retrying in ")
    assert reports[2] == reports[0]
    assert [line for line in reports if line.startswith("Refused")] == [
        line for line in reports if line.endswith("a certificate for 'alice' cannot claim worker id 'bob'")
    ]
    assert len([line for line in reports if line.startswith("Refused")]) == 1


def test_the_startup_kits_of_dial_out_workers_dial_the_coordinators_listen_port(kits: dict[str, Path]) -> None:
    alice = worker.config_from_args(
        parse_arguments(worker.build_parser(), ["--config", str(kits["alice"] / "worker.toml")])
    )
    assert alice.connect == "wss://127.0.0.1:8765" and alice.tls_ca == kits["alice"] / "ca.crt"
    args = parse_arguments(coordinator.build_parser(), ["--config", str(kits["coordinator"] / "coordinator.toml")])
    run = coordinator.config_from_args(args, *coordinator._endpoints(args))
    assert run.listen == "0.0.0.0:8765" and run.dial_in == ("alice", "bob")
    assert run.tls_ca == kits["coordinator"] / "ca.crt"  # the listener asks for client certificates


def test_a_worker_whose_hello_names_another_id_is_refused_on_both_sides() -> None:
    """What a hand-written client could do: prove (here: claim, under --insecure-listen) one id, greet as another."""

    async def scenario() -> tuple[str, str, list[str]]:
        reports: list[str] = []
        config = CoordinatorConfig(
            workers={"alice": DIAL_IN},
            evaluator={},
            listen="127.0.0.1:0",
            insecure_listen=True,
            connect_timeout=TIMEOUT,
        )
        pool = Pool(config, worker_links(config), report=reports.append)
        starting = asyncio.create_task(pool.start())
        while not reports:
            await asyncio.sleep(10 * MS)
        uri = reports[0].rsplit(" ", 1)[1]
        config = WorkerConfig("alice", connect=uri, digits=(0, 1))
        alice = Worker(config, load_holdings(config))
        greeting = alice.info()
        alice.info = lambda: dataclasses.replace(greeting, worker_id="mallory")  # type: ignore[method-assign]
        try:
            with pytest.raises(AuthenticationFailed) as worker_side:
                await dial_out(alice, report=reports.append)
            with pytest.raises(WorkerUnavailable) as coordinator_side:
                await starting
        finally:
            await pool.close()
        return str(worker_side.value), str(coordinator_side.value), reports

    worker_side, coordinator_side, reports = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    reason = "hello names worker 'mallory', but the credential proves 'alice'"
    assert worker_side.endswith(f": refused by the coordinator at {reports[0].rsplit(' ', 1)[1]}: {reason}")
    assert reason in coordinator_side
    assert [line for line in reports if line.startswith("Refused")] == [f"Refused dial-in worker alice: {reason}"]


@pytest.mark.parametrize(
    ("uri", "token", "warned"),
    [("ws://192.0.2.1:9", False, True), ("ws://127.0.0.1:9", False, False), ("ws://192.0.2.1:9", True, False)],
)
def test_a_dial_out_worker_that_nothing_proves_the_coordinator_to_says_so_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, uri: str, token: bool, warned: bool
) -> None:
    secret = tmp_path / "alice.token"
    secret.write_bytes(b"t" * 32)
    config = WorkerConfig("alice", connect=uri, digits=(0, 1), auth_token_file=secret if token else None)
    alice = Worker(config, load_holdings(config))

    async def a_moment_of_dialing() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dial_out(alice, report=lambda _: None), 0.3)

    with caplog.at_level(logging.WARNING, logger="syncfed.worker"):
        asyncio.run(a_moment_of_dialing())
    loud = [record.getMessage() for record in caplog.records if "SERVES WHOEVER ANSWERS" in record.getMessage()]
    said = (
        f"WORKER ALICE SERVES WHOEVER ANSWERS AT {uri}: nothing proves the coordinator (no TLS, no token), so"
        " anyone who can take that address trains on this data; use wss:// with --tls-ca (see python -m"
        " syncfed provision) or --auth-token-file"
    )
    assert loud == ([said] if warned else [])
