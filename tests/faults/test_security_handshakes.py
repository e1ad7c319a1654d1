"""Security: the secured quick start over mutual TLS, the allow-list and the token handshake.

The kits are made by the real command (``python -m syncfed provision``, see
security_kit.py) in a temporary folder, which stands for the repository root
of the README's secured quick start: the workers are real processes started
from their ``worker.toml`` and the coordinator from its ``coordinator.toml``,
exactly as the README writes them; only the ports differ, free ones picked
here and written into the project file. Every refusal goes through the
coordinator's command line and pins its one line of error and its exit status;
the handshake attacks (a replayed response, a hello before authentication) use
a raw websockets client. Every wait has a deadline, and every process started
here is stopped in a ``finally``. The ``demo`` fixture comes from
security_kit.py, imported by name so that pytest finds it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import REPO
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from linkpair import tiny_digits
from security_kit import (
    CLI_TIMEOUT,
    ENV,
    EVALUATOR,
    TRAINERS,
    Kit,
    free_ports,
    load_certificate,
    provision_site,
    write_project,
)
from security_kit import demo as demo
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from syncfed import auth
from syncfed.config import WorkerConfig
from syncfed.exceptions import AuthenticationFailed, RemoteError
from syncfed.net.link import WorkerLink
from syncfed.net.transport import client_tls
from syncfed.policy import SitePolicy
from syncfed.protocol import Accepted, Hello, Info, Propose, Terms, decode, encode
from syncfed.worker import Worker
from syncfed.worker.server import serving

T = TypeVar("T")

SERVER = REPO / "run_websocket_server.py"
CLIENT = REPO / "run_websocket_client.py"

# Durations, in seconds.
STARTUP_TIMEOUT = 90_000 * MS  # a set of workers importing torch on a busy 2-core machine
STOP_TIMEOUT = 10_000 * MS
RAW_TIMEOUT = 10_000 * MS  # one exchange of a raw client
CLOSE_TIMEOUT = 3000 * MS  # far above the moment a refusing worker closes (it closes at once)
POLL = 10 * MS  # how often a worker's output is looked at

TOKEN = b"0123456789abcdef0123456789abcdef"
WRONG_TOKEN = b"fedcba9876543210fedcba9876543210"

READY = re.compile(r"^syncfed worker (\S+) listening on (wss?://\S+)$", re.MULTILINE)
ACCURACY = re.compile(r"^Final federated accuracy at round 2: (\d+\.\d\d)%$", re.MULTILINE)

#: The coordinator's command in the README's secured quick start, run in the folder that holds project.toml.
QUICK_START_RUN = ("--config", "startup/coordinator/coordinator.toml", "--training-rounds", "2")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = RAW_TIMEOUT) -> T:
    """Run ``coroutine`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


# -- Another project, and coordinator certificates made with a CA key ------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """Another project with a CA of its own, and a worker erin whose certificate names localhost only."""
    site = tmp_path_factory.mktemp("other")
    write_project(site / "project.toml", "other", [("erin", ["localhost"], 8777, "trainer")])
    return Kit(site, {"erin": 8777}, provision_site(site))


def issue_client_certificate(ca_dir: Path, name: str, out: Path) -> tuple[Path, Path]:
    """A coordinator certificate for ``name`` signed with the project's CA key: what a
    holder of the CA key (or a leaked kit's CA) could make. Returns (certificate, key)."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = load_certificate(ca_dir / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "demo"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# -- Worker processes ------------------------------------------------------------------------


class WorkerProcess:
    """``python run_websocket_server.py ...`` with its stdout and stderr in files (no pipe can fill)."""

    def __init__(self, label: str, arguments: Sequence[str], cwd: Path, logs: Path) -> None:
        self.label = label
        self.stdout_path = logs / f"{label}.out"
        self.stderr_path = logs / f"{label}.err"
        self.uri = ""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER), *arguments],
                cwd=cwd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=ENV,
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> str:
        """Wait for the ready line until ``deadline`` (monotonic); return the address it names."""
        while True:
            match = READY.search(self.stdout())
            if match:
                self.uri = match.group(2)
                return self.uri
            if self.process.poll() is not None:
                raise AssertionError(f"{self.label} exited with {self.process.returncode}: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label} did not start serving in time: {self.stderr()[-2000:]}")
            time.sleep(POLL)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Terminate, then kill if it lingers; idempotent."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def started(specs: Sequence[tuple[str, Sequence[str]]], cwd: Path, logs: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Start one worker per (label, arguments) at once, wait until all serve, stop them all on exit."""
    workers: dict[str, WorkerProcess] = {}
    try:
        for label, arguments in specs:
            workers[label] = WorkerProcess(label, arguments, cwd, logs)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for worker in workers.values():
            worker.wait_ready(deadline)
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()


@pytest.fixture(scope="module")
def demo_workers(demo: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    """The quick start's four workers, each started with nothing but its --config."""
    specs = [(name, ["--config", f"startup/{name}/worker.toml"]) for name in (*TRAINERS, EVALUATOR)]
    with started(specs, demo.site, tmp_path_factory.mktemp("demo-logs")) as workers:
        yield workers


@pytest.fixture(scope="module")
def erin(other: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """The other project's worker, its config's fixed port overridden by --port (and digits by --digits)."""
    (port,) = free_ports(1)
    arguments = ["--config", "startup/erin/worker.toml", "--port", str(port), "--digits", "1,2"]
    with started([("erin", arguments)], other.site, tmp_path_factory.mktemp("erin-logs")) as workers:
        assert workers["erin"].uri == f"wss://127.0.0.1:{port}"
        yield workers["erin"]


@dataclass(frozen=True)
class TokenSite:
    worker: WorkerProcess
    site: Path  # holds worker.token and wrong.token

    @property
    def uri(self) -> str:
        """The worker binds every address; dial it on loopback."""
        return self.worker.uri.replace("0.0.0.0", "127.0.0.1")


@pytest.fixture(scope="module")
def token_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenSite]:
    """A plain ws:// worker dave on every address that requires the shared token."""
    site = tmp_path_factory.mktemp("token")
    (site / "worker.token").write_bytes(TOKEN + b"\n")
    (site / "wrong.token").write_bytes(WRONG_TOKEN + b"\n")
    arguments = ["--id", "dave", "--digits", "0,5,9", "--host", "0.0.0.0", "--port", "0"]
    arguments += ["--auth-token-file", "worker.token"]
    with started([("dave", arguments)], site, tmp_path_factory.mktemp("token-logs")) as workers:
        yield TokenSite(workers["dave"], site)


# -- Coordinators ----------------------------------------------------------------------------


def coordinator(site: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``python run_websocket_client.py ...`` in ``site``, bounded by CLI_TIMEOUT."""
    return subprocess.run(
        [sys.executable, str(CLIENT), *arguments],
        cwd=site,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=ENV,
    )


def assert_refused(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """The coordinator stopped with ``status`` and printed exactly one line: ``message``."""
    assert result.returncode == status, f"exit status {result.returncode}, stderr: {result.stderr}"
    assert result.stderr.splitlines() == [f"run_websocket_client.py: error: {message}"]


def assert_trained(result: subprocess.CompletedProcess[str]) -> float:
    """Two rounds finished with the accuracy line; return the accuracy in percent."""
    assert result.returncode == 0, f"exit status {result.returncode}, stderr: {result.stderr}"
    match = ACCURACY.search(result.stdout)
    assert match, result.stdout
    accuracy = float(match.group(1))
    assert 0.0 <= accuracy <= 100.0
    return accuracy


def only(name: str, uri: str) -> tuple[str, ...]:
    """Coordinator flags for a single training worker, no evaluator, and one round should it be let in."""
    return ("--workers", f"{name}={uri}", "--evaluator", "", "--training-rounds", "1")


async def greet(name: str, uri: str, *, tls: ssl.SSLContext | None = None, token: bytes | None = None) -> Info:
    """Connect as the coordinator does and say hello; return the worker's info."""
    client = WorkerLink(
        name, uri, max_message_size=2**20, connect_timeout=RAW_TIMEOUT, ping_interval=None, tls=tls, auth_token=token
    )
    await client.connect()
    try:
        info = await client.request(Hello(), timeout=RAW_TIMEOUT)
    finally:
        await client.close()
    assert isinstance(info, Info)
    return info


async def raw_connect(uri: str) -> ClientConnection:
    return await connect(uri, open_timeout=RAW_TIMEOUT, close_timeout=1000 * MS, compression=None, max_size=2**20)


async def frames_until_closed(connection: ClientConnection) -> list[bytes]:
    """Every frame the peer sends until it closes the connection, or for CLOSE_TIMEOUT seconds."""
    frames: list[bytes] = []
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            while True:
                frames.append(await connection.recv(decode=False))
    return frames


# -- The secured quick start -------------------------------------------------------------------


def test_secured_quick_start_trains_over_mutual_tls(demo: Kit, demo_workers: dict[str, WorkerProcess]) -> None:
    for name, worker in demo_workers.items():
        assert worker.uri == f"wss://127.0.0.1:{demo.ports[name]}", "served over TLS on the provisioned port"
    assert_trained(coordinator(demo.site, *QUICK_START_RUN))
    for worker in demo_workers.values():
        assert "refused" not in worker.stderr()
        assert "ACCEPTS ANY COORDINATOR" not in worker.stderr()


# -- Refusals --------------------------------------------------------------------------------------


def test_coordinator_without_client_certificate_is_refused(demo: Kit, demo_workers: dict[str, WorkerProcess]) -> None:
    uri = f"wss://localhost:{demo.ports['alice']}"
    result = coordinator(demo.site, *only("alice", uri), "--tls-ca", "startup/coordinator/ca.crt")
    assert_refused(
        result,
        10,
        f"worker alice at {uri} hung up after the TLS handshake: it did not accept this coordinator's client"
        " certificate (pass --tls-cert and --tls-key signed by its CA)",
    )


def test_worker_certificate_from_another_ca_fails_verification(
    demo: Kit, other: Kit, demo_workers: dict[str, WorkerProcess]
) -> None:
    uri = f"wss://localhost:{demo.ports['alice']}"
    result = coordinator(other.site, "--config", "startup/coordinator/coordinator.toml", *only("alice", uri))
    # The worker sends its CA along with its certificate: a root this coordinator does not trust.
    assert_refused(
        result,
        10,
        f"worker alice at {uri} failed certificate verification: self-signed certificate in certificate chain",
    )


def test_client_certificates_the_worker_did_not_issue_for_coordinators_are_refused(
    demo: Kit, other: Kit, demo_workers: dict[str, WorkerProcess]
) -> None:
    uri = f"wss://localhost:{demo.ports['alice']}"
    refused = f"worker alice at {uri} hung up after the TLS handshake"
    # The other project's coordinator, trusting this project's CA: its certificate does not chain.
    foreign = other.startup / "coordinator"
    with pytest.raises(AuthenticationFailed, match=re.escape(refused)):
        run(greet("alice", uri, tls=client_tls(demo.ca, foreign / "coordinator.crt", foreign / "coordinator.key")))
    # A worker of this project posing as the coordinator: its certificate is for serving only.
    bob = demo.startup / "bob"
    with pytest.raises(AuthenticationFailed, match=re.escape(refused)):
        run(greet("alice", uri, tls=client_tls(demo.ca, bob / "bob.crt", bob / "bob.key")))


def test_wrong_host_name_fails_verification(other: Kit, erin: WorkerProcess) -> None:
    port = erin.uri.rsplit(":", 1)[1]
    coordinator_kit = other.startup / "coordinator"
    tls = client_tls(
        coordinator_kit / "ca.crt", coordinator_kit / "coordinator.crt", coordinator_kit / "coordinator.key"
    )
    # The name in its certificate works: only the address is wrong.
    assert run(greet("erin", f"wss://localhost:{port}", tls=tls)).worker_id == "erin"
    uri = f"wss://127.0.0.1:{port}"
    result = coordinator(other.site, "--config", "startup/coordinator/coordinator.toml", *only("erin", uri))
    assert_refused(
        result,
        10,
        f"worker erin at {uri} failed certificate verification:"
        " IP address mismatch, certificate is not valid for '127.0.0.1'.",
    )


def test_plain_ws_to_a_wss_worker_is_unavailable(demo: Kit, demo_workers: dict[str, WorkerProcess]) -> None:
    uri = f"ws://localhost:{demo.ports['alice']}"
    result = coordinator(demo.site, *only("alice", uri))
    assert_refused(
        result,
        5,
        f"worker alice is unavailable: {uri} did not answer a websocket handshake (is it a wss:// worker?)",
    )


def test_coordinator_not_on_the_allow_list_is_refused(
    demo: Kit, demo_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    cert, key = issue_client_certificate(demo.startup / "ca", "mallory", tmp_path)
    uri = f"wss://localhost:{demo.ports['alice']}"
    tls = ("--tls-ca", "startup/coordinator/ca.crt", "--tls-cert", str(cert), "--tls-key", str(key))
    result = coordinator(demo.site, *only("alice", uri), *tls)
    assert_refused(
        result,
        10,
        "worker alice refused this coordinator: coordinator identity 'mallory' is not allowed by this worker",
    )
    assert "refused coordinator identity 'mallory': not on the allow-list" in demo_workers["alice"].stderr()


def test_wrong_token_is_refused(token_worker: TokenSite) -> None:
    result = coordinator(token_worker.site, *only("dave", token_worker.uri), "--auth-token-file", "wrong.token")
    assert_refused(result, 10, "worker dave refused this coordinator: authentication failed: wrong token")


def test_missing_token_is_explained(token_worker: TokenSite) -> None:
    result = coordinator(token_worker.site, *only("dave", token_worker.uri))
    assert_refused(
        result,
        5,
        "worker dave is unavailable: sent an invalid reply: it requires a shared token: pass --auth-token-file",
    )


def test_replayed_response_is_refused(token_worker: TokenSite) -> None:
    async def scenario() -> tuple[Info, list[bytes], bytes, int | None, str | None]:
        # A coordinator that knows the token authenticates; its response is recorded.
        first = await raw_connect(token_worker.uri)
        try:
            challenge = await first.recv(decode=False)
            response, worker_nonce, own_nonce = auth.respond(TOKEN, challenge)
            await first.send(response)
            auth.verify_confirmation(TOKEN, worker_nonce, own_nonce, await first.recv(decode=False))
            await first.send(encode(1, Hello()))
            info = await first.recv(decode=False)
        finally:
            await first.close()
        # An eavesdropper replays it on a connection of its own, then asks for the worker's info.
        second = await raw_connect(token_worker.uri)
        try:
            await second.send(response)
            with contextlib.suppress(ConnectionClosed):
                await second.send(encode(1, Hello()))
            frames = await frames_until_closed(second)
        finally:
            await second.close()
        message = decode(info).message
        assert isinstance(message, Info)
        return message, frames, challenge, second.close_code, second.close_reason

    info, frames, challenge, code, reason = run(scenario())
    assert info.worker_id == "dave", "the recorded response was valid where it was made"
    assert len(frames) == 1 and auth.is_challenge(frames[0]), "nothing but the challenge is sent"
    assert frames[0] != challenge, "each connection gets a fresh nonce"
    assert (code, reason) == (1008, "authentication failed: wrong token")


def test_authentication_comes_before_any_application_message(token_worker: TokenSite) -> None:
    async def scenario() -> tuple[list[bytes], int | None, str | None]:
        connection = await raw_connect(token_worker.uri)
        try:
            await connection.send(encode(1, Hello()))  # a valid hello as the first frame
            frames = await frames_until_closed(connection)
        finally:
            await connection.close()
        return frames, connection.close_code, connection.close_reason

    frames, code, reason = run(scenario())
    assert len(frames) == 1 and auth.is_challenge(frames[0]), "no info reply"
    assert (code, reason) == (1008, "authentication failed: expected an authentication response, got something else")


def test_an_unauthenticated_peer_cannot_send_a_large_frame(token_worker: TokenSite) -> None:
    async def probe() -> tuple[int | None, str]:
        async with connect(token_worker.uri, compression=None, max_size=None) as connection:
            await asyncio.wait_for(connection.recv(), RAW_TIMEOUT)  # the challenge
            await connection.send(b"\0" * 10_000)  # far over the 256-byte handshake limit
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(connection.recv(), RAW_TIMEOUT)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason

    code, reason = run(probe(), 3 * RAW_TIMEOUT)
    assert code == 1009  # message too big, refused by websockets before buffering it


# -- The loud warning ------------------------------------------------------------------------------


def test_unsecured_worker_on_every_address_warns(tmp_path: Path) -> None:
    arguments = ["--id", "alice", "--host", "0.0.0.0", "--port", "0"]
    with started([("open", arguments)], tmp_path, tmp_path) as workers:
        stderr = workers["open"].stderr()
    assert (
        "syncfed.worker WARNING WORKER ALICE ACCEPTS ANY COORDINATOR ON 0.0.0.0: serving without client certificates"
        " or a token on an address other than loopback lets anyone who can reach it train on this data; use"
        " --tls-ca (see python -m syncfed provision) or --auth-token-file"
    ) in stderr


def test_token_worker_on_every_address_does_not_warn(token_worker: TokenSite) -> None:
    assert token_worker.worker.uri.startswith("ws://0.0.0.0:")
    assert "ACCEPTS ANY COORDINATOR" not in token_worker.worker.stderr()


# -- Refusals leave the workers serving -------------------------------------------------------------


def test_workers_keep_serving_after_refusals(
    demo: Kit, demo_workers: dict[str, WorkerProcess], token_worker: TokenSite, tmp_path: Path
) -> None:
    mallory = issue_client_certificate(demo.startup / "ca", "mallory", tmp_path)
    for name in (*TRAINERS, EVALUATOR):
        uri = f"wss://localhost:{demo.ports[name]}"
        with pytest.raises(AuthenticationFailed, match="hung up after the TLS handshake"):
            run(greet(name, uri, tls=client_tls(demo.ca, None, None)))
        with pytest.raises(AuthenticationFailed, match="coordinator identity 'mallory' is not allowed"):
            run(greet(name, uri, tls=client_tls(demo.ca, *mallory)))
    with pytest.raises(AuthenticationFailed, match="wrong token"):
        run(greet("dave", token_worker.uri, token=WRONG_TOKEN))
    assert run(greet("dave", token_worker.uri, token=TOKEN)).worker_id == "dave"
    assert_trained(coordinator(demo.site, *QUICK_START_RUN))
    assert all(worker.alive for worker in demo_workers.values())


def test_a_site_policy_knows_the_coordinator_by_the_certificate_it_verified(demo: Kit, tmp_path: Path) -> None:
    """Under mutual TLS a policy's coordinators name the client certificate's common name."""
    policy = tmp_path / "site-policy.toml"
    policy.write_text('coordinators = ["coordinator"]\n')
    kit, own = demo.startup / "alice", demo.startup / "coordinator"
    config = WorkerConfig(
        "alice", host="127.0.0.1", port=0, tls_cert=kit / "alice.crt", tls_key=kit / "alice.key", tls_ca=kit / "ca.crt"
    )
    worker = Worker(dataclasses.replace(config, policy=policy), tiny_digits())
    terms = Terms(job="j1", sites=3, model="digits-cnn", rounds=1)

    async def scenario() -> None:
        async with serving(worker) as (_, uri):
            tls = client_tls(demo.ca, own / "coordinator.crt", own / "coordinator.key")
            async with WorkerLink("alice", uri, max_message_size=2**20, tls=tls) as link:
                await link.request(Hello())
                assert await link.request(Propose(terms)) == Accepted()
                worker.policy = SitePolicy(coordinators=("central",))
                with pytest.raises(RemoteError) as raised:
                    await link.request(Propose(terms))
                assert raised.value.reason == "coordinators: coordinator 'coordinator' is not one of 'central'"

    run(scenario())
