"""Security, provisioning: the startup kits that ``python -m syncfed provision`` makes.

The kits are made by the real command in a temporary folder (see
security_kit.py): every certificate chains to the project's CA and passes
strict X.509 verification, key files are their owner's only and the CA key
stays in ca/, the configs parse and name files that exist, and a second
provision into the same folder or a bad project file is refused with one clear
line. The ``demo`` fixture comes from security_kit.py, imported by name so
that pytest finds it here.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Criticality, DNSName, ExtensionPolicy, IPAddress, PolicyBuilder, Store
from security_kit import EVALUATOR, TRAINERS, Kit, load_certificate, write_project
from security_kit import demo as demo

from syncfed.__main__ import main as syncfed_main
from syncfed.cli import coordinator as client_cli
from syncfed.cli import worker as server_cli
from syncfed.cli.common import parse_arguments
from syncfed.net.transport import client_tls, server_tls


def common_name(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_provision_prints_every_kit_and_the_ca_key(demo: Kit) -> None:
    assert demo.output.splitlines() == [
        "alice: startup/alice",
        "bob: startup/bob",
        "charlie: startup/charlie",
        "testing: startup/testing",
        "coordinator: startup/coordinator",
        "CA key (keep it offline): startup/ca/ca.key",
    ]
    kits = {path.name for path in demo.startup.iterdir()}
    assert kits == {"ca", *TRAINERS, EVALUATOR, "coordinator"}


def test_certificates_chain_to_the_project_ca(demo: Kit) -> None:
    ca = load_certificate(demo.startup / "ca" / "ca.crt")
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    # The web-PKI profile, less what a private CA need not carry: key identifiers (see
    # test_certificates_pass_strict_x509_verification) and a SAN on the coordinator, whose
    # identity is its common name.
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None
    )
    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.SubjectKeyIdentifier, Criticality.NON_CRITICAL, None
    )
    verifiers = PolicyBuilder().store(Store([ca])).extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
    client_verifiers = (
        PolicyBuilder()
        .store(Store([ca]))
        .extension_policies(
            ca_policy=ca_policy,
            ee_policy=ee_policy.may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None),
        )
    )
    for name in (*TRAINERS, EVALUATOR, "coordinator"):
        kit = demo.startup / name
        assert (kit / "ca.crt").read_bytes() == (demo.startup / "ca" / "ca.crt").read_bytes(), name
        cert = load_certificate(kit / f"{name}.crt")
        assert cert.issuer == ca.subject, name
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc, name
        assert common_name(cert.subject) == name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca, name
        key = serialization.load_pem_private_key((kit / f"{name}.key").read_bytes(), password=None)
        assert key.public_key() == cert.public_key(), f"{name}'s key does not match its certificate"
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if name == "coordinator":
            assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]
            chain = client_verifiers.build_client_verifier().verify(cert, []).chain
        else:
            assert usages == [ExtendedKeyUsageOID.SERVER_AUTH], name
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == ["localhost"], name
            assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")], name
            for host in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
                chain = verifiers.build_server_verifier(host).verify(cert, [])
            with pytest.raises(Exception, match="no matching subjectAltName"):
                verifiers.build_server_verifier(DNSName("example.com")).verify(cert, [])
            # A worker's certificate cannot pass for a coordinator's.
            with pytest.raises(Exception, match="required EKU not found"):
                client_verifiers.build_client_verifier().verify(cert, [])
        assert chain == [cert, ca], name


def test_certificates_pass_strict_x509_verification(demo: Kit) -> None:
    """On Python 3.13 and later the coordinator's context verifies with VERIFY_X509_STRICT."""
    kit = demo.startup / "alice"
    worker = server_tls(kit / "alice.crt", kit / "alice.key", kit / "ca.crt")
    coordinator_kit = demo.startup / "coordinator"
    client = client_tls(demo.ca, coordinator_kit / "coordinator.crt", coordinator_kit / "coordinator.key")
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    handshake(worker, client, "localhost")
    ca = load_certificate(demo.startup / "ca" / "ca.crt")
    alice = load_certificate(kit / "alice.crt")
    PolicyBuilder().store(Store([ca])).build_server_verifier(DNSName("localhost")).verify(alice, [])


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
    """A TLS handshake between two contexts through memory buffers; raises what either side raises."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=host)
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    done: set[int] = set()
    for _ in range(10):
        for index, side in enumerate((client_side, server_side)):
            if index not in done:
                try:
                    side.do_handshake()
                    done.add(index)
                except ssl.SSLWantReadError:
                    pass
        if len(done) == 2:
            return
    raise AssertionError("the handshake did not finish")


def test_key_files_are_owner_only_and_the_ca_key_stays_in_ca(demo: Kit) -> None:
    keys = sorted(demo.startup.rglob("*.key"))
    assert [path.relative_to(demo.startup).as_posix() for path in keys] == [
        "alice/alice.key",
        "bob/bob.key",
        "ca/ca.key",
        "charlie/charlie.key",
        "coordinator/coordinator.key",
        "testing/testing.key",
    ]
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} has mode {stat.S_IMODE(path.stat().st_mode):o}"


def test_configs_parse_and_point_to_existing_files(demo: Kit) -> None:
    for name in (*TRAINERS, EVALUATOR):
        path = demo.startup / name / "worker.toml"
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
        assert settings == {
            "id": name,
            "host": "localhost",
            "port": demo.ports[name],
            "testing": name == EVALUATOR,
            "tls-cert": f"{name}.crt",
            "tls-key": f"{name}.key",
            "tls-ca": "ca.crt",
            "allow-coordinator": ["coordinator"],
        }
        # The worker's command line accepts it, and resolves the files next to it.
        config = server_cli.config_from_args(parse_arguments(server_cli.build_parser(), ["--config", str(path)]))
        assert config.secured and config.allow_coordinators == ("coordinator",)
        for file in (config.tls_cert, config.tls_key, config.tls_ca):
            assert file is not None and file.is_file(), file
    path = demo.startup / "coordinator" / "coordinator.toml"
    settings = tomllib.loads(path.read_text(encoding="utf-8"))
    endpoint = "{}=wss://localhost:{}".format
    assert settings == {
        "workers": ",".join(endpoint(name, demo.ports[name]) for name in TRAINERS),
        "evaluator": endpoint(EVALUATOR, demo.ports[EVALUATOR]),
        "tls-cert": "coordinator.crt",
        "tls-key": "coordinator.key",
        "tls-ca": "ca.crt",
    }
    args = parse_arguments(client_cli.build_parser(), ["--config", str(path)])
    for file in (args.tls_cert, args.tls_key, args.tls_ca):
        assert file.is_file(), file


def test_second_provision_into_the_same_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project, startup = tmp_path / "project.toml", tmp_path / "startup"
    write_project(project, "demo", [("alice", ["localhost"], 8777, "trainer")])
    assert syncfed_main(["provision", str(project), "-o", str(startup)]) == 0
    before = {path: path.read_bytes() for path in startup.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert syncfed_main(["provision", str(project), "-o", str(startup)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m syncfed: error: {startup} already holds a provisioned project; choose another directory"
    ]
    assert {path: path.read_bytes() for path in startup.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        pytest.param([("alice", "trainer"), ("alice", "evaluator")], "id 'alice' appears twice", id="duplicate-worker"),
        pytest.param([("coordinator", "trainer")], "id 'coordinator' appears twice", id="worker-named-coordinator"),
        pytest.param([], "no [[workers]] entries", id="no-workers"),
        pytest.param(
            [("alice", "server")], "worker alice has role 'server', not one of trainer, evaluator", id="bad-role"
        ),
    ],
)
def test_bad_project_file_gives_one_clear_line(
    workers: list[tuple[str, str]], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, startup = tmp_path / "project.toml", tmp_path / "startup"
    write_project(project, "demo", [(name, ["localhost"], 8777, role) for name, role in workers])
    assert syncfed_main(["provision", str(project), "-o", str(startup)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"python -m syncfed: error: {project}: {message}"]
    assert not startup.exists(), "nothing is written for a bad project file"
