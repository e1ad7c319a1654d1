"""Provisioning: a private CA and one startup kit per participant.

``python -m syncfed provision project.toml -o startup/`` reads::

    [project]
    name = "demo"
    days = 365                      # certificate lifetime (optional)

    [coordinator]
    id = "coordinator"              # the identity workers allow in
    hosts = ["fl.example.org"]      # with dial-out workers: names they dial; in the certificate
    listen = 8765                   # with dial-out workers: the port they dial (default 8765)

    [[workers]]
    id = "alice"
    hosts = ["localhost", "127.0.0.1"]   # names the coordinator dials; in the certificate
    port = 8777
    role = "trainer"                # or "evaluator"
    dial_out = false                # true: the site opens no port, it dials the coordinator

    [[admins]]
    id = "ops@hospital-a.org"       # who the admin console proves to be
    role = "project-admin"          # or "viewer": may only read

and writes ``startup/ca/`` (the CA's key: keep it offline), and for each
participant ``startup/<id>/`` with the CA certificate, its own key (mode
0600) and certificate, and a config file the scripts accept with
``--config`` (``worker.toml`` or ``coordinator.toml``). Keys are made with
the ``cryptography`` package; nothing is hand-rolled.

A dial-out worker's certificate is a client certificate whose common name is
its id: the coordinator's ``--listen`` lets it in as that id and no other.
With dial-out workers, the coordinator's certificate serves ``--listen`` too.

An admin's certificate is a client certificate whose common name is the
admin's id and whose organizational unit is the role
(:data:`syncfed.service_api.ADMIN_ROLES`); the kit's ``admin.toml`` points
``python -m syncfed admin`` at the service's admin API,
``https://<the coordinator's first host>:<[coordinator] admin>`` (port 8443
by default), which the coordinator's certificate then serves too.

With dial-out workers, the coordinator's kit also holds ``server.toml``, the
job service's settings (``python -m syncfed serve --config server.toml``):
where the workers dial, their ids, the TLS files, and the admin API's
address when the project has admins.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import url_host
from .exceptions import ConfigError
from .service_api import ADMIN_ROLES

__all__ = ["Admin", "Participant", "Project", "load_project", "provision"]

_ROLES = ("trainer", "evaluator")


@dataclass(frozen=True)
class Participant:
    id: str
    hosts: tuple[str, ...] = ()
    port: int = 0
    role: str = "trainer"
    dial_out: bool = False  # it connects to the coordinator's listen port; its certificate is a client's


@dataclass(frozen=True)
class Admin:
    id: str  # the certificate's common name, e.g. an e-mail address
    role: str  # one of ADMIN_ROLES: the certificate's organizational unit


@dataclass(frozen=True)
class Project:
    name: str
    coordinator: str
    workers: tuple[Participant, ...]
    days: int = 365
    coordinator_hosts: tuple[str, ...] = ()  # what dial-out workers dial; in the coordinator's certificate
    listen: int = 8765
    admins: tuple[Admin, ...] = ()
    admin_port: int = 8443  # the service's admin API, on the coordinator's first host


def load_project(path: Path) -> Project:
    """Read and check a project file.

    Raises:
        ConfigError: naming the file and the offending entry.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read project file {path}: {exc}") from None
    project = data.get("project", {})
    coordinator = data.get("coordinator", {}).get("id", "coordinator")
    workers = []
    for index, entry in enumerate(data.get("workers", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise ConfigError(f"{path}: workers entry {index} needs an id")
        hosts = entry.get("hosts", ["localhost"])
        if not isinstance(hosts, list) or not hosts or not all(isinstance(host, str) and host for host in hosts):
            raise ConfigError(f"{path}: worker {entry['id']} needs hosts, a list of host names or addresses")
        role = entry.get("role", "trainer")
        if role not in _ROLES:
            raise ConfigError(f"{path}: worker {entry['id']} has role {role!r}, not one of {', '.join(_ROLES)}")
        port = entry.get("port", 8777 + index)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{path}: worker {entry['id']} has port {port!r}, not in 1..65535")
        dial_out = entry.get("dial_out", False)
        if not isinstance(dial_out, bool):
            raise ConfigError(f"{path}: worker {entry['id']} has dial_out {dial_out!r}, not true or false")
        workers.append(Participant(entry["id"], tuple(hosts), port, role, dial_out))
    if not workers:
        raise ConfigError(f"{path}: no [[workers]] entries")
    admins = _load_admins(path, data.get("admins", []))
    ids = [worker.id for worker in workers] + [coordinator] + [admin.id for admin in admins]
    duplicate = next((name for name in ids if ids.count(name) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{path}: id {duplicate!r} appears twice")
    if sum(worker.role == "evaluator" for worker in workers) > 1:
        raise ConfigError(f"{path}: at most one worker may be the evaluator")
    coordinator_hosts = data.get("coordinator", {}).get("hosts", [])
    if not isinstance(coordinator_hosts, list) or not all(isinstance(host, str) and host for host in coordinator_hosts):
        raise ConfigError(f"{path}: coordinator hosts must be a list of host names or addresses")
    if any(worker.dial_out for worker in workers) and not coordinator_hosts:
        raise ConfigError(f"{path}: workers that dial out need the coordinator's hosts, the names they dial")
    if admins and not coordinator_hosts:
        raise ConfigError(f"{path}: admins need the coordinator's hosts, the names their console connects to")
    ports = {}
    for key, default in (("listen", 8765), ("admin", 8443)):
        ports[key] = data.get("coordinator", {}).get(key, default)
        if isinstance(ports[key], bool) or not isinstance(ports[key], int) or not 1 <= ports[key] <= 65535:
            raise ConfigError(f"{path}: coordinator {key} port {ports[key]!r} is not in 1..65535")
    return Project(
        str(project.get("name", path.stem)),
        coordinator,
        tuple(workers),
        int(project.get("days", 365)),
        tuple(coordinator_hosts),
        ports["listen"],
        admins,
        ports["admin"],
    )


def _load_admins(path: Path, entries: object) -> tuple[Admin, ...]:
    """The ``[[admins]]`` entries; an id becomes a folder name, so it may not be a path.

    Raises:
        ConfigError: naming the file and the entry.
    """
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: admins must be [[admins]] entries")
    admins = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise ConfigError(f"{path}: admins entry {index} needs an id")
        name = entry["id"]
        if "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
            raise ConfigError(f"{path}: admin id {name!r} is not a plain name (no slashes)")
        role = entry.get("role")
        if role not in ADMIN_ROLES:
            raise ConfigError(f"{path}: admin {name} has role {role!r}, not one of {', '.join(ADMIN_ROLES)}")
        unknown = sorted(set(entry) - {"id", "role"})
        if unknown:
            raise ConfigError(f"{path}: admin {name} has unknown key {unknown[0]!r}")
        admins.append(Admin(name, role))
    return tuple(admins)


def _name(common_name: str, project: str, unit: str = "") -> Any:
    """O = the project, OU = an admin's role (only admins have one), CN = who."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, project)]
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created owner-only: the key never exists with wider permissions.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, certificate: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _issue(
    project: Project,
    common_name: str,
    hosts: Sequence[str],
    ca_key: Any,
    ca_cert: Any,
    *,
    server: bool,
    client: bool,
    unit: str = "",
) -> tuple[Any, Any]:
    """A key and a certificate for ``common_name``: to serve TLS (``server``), to prove itself as a client, or both."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, project.name, unit))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=project.days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Key identifiers: RFC 5280 requires them, and strict verifiers (Python 3.13+) reject certificates without.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
            ),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _write_config(path: Path, settings: dict[str, Any], comment: str) -> None:
    lines = [f"# {comment}"] + [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def provision(project: Project, output: Path) -> dict[str, Path]:
    """Write the CA and every participant's kit under ``output``; return each kit's directory.

    Raises:
        ConfigError: if ``output`` already holds a CA (provisioning twice would split the project).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if (output / "ca" / "ca.key").exists():
        raise ConfigError(f"{output} already holds a provisioned project; choose another directory")
    (output / "ca").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = _name(f"{project.name} CA", project.name)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=project.days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(output / "ca" / "ca.key", ca_key)
    _write_cert(output / "ca" / "ca.crt", ca_cert)
    kits: dict[str, Path] = {}
    coordinator_uri = f"wss://{project.coordinator_hosts[0]}:{project.listen}" if project.coordinator_hosts else ""
    for worker in project.workers:
        kit = output / worker.id
        kit.mkdir(exist_ok=True)
        key, cert = _issue(
            project, worker.id, worker.hosts, ca_key, ca_cert, server=not worker.dial_out, client=worker.dial_out
        )
        _write_key(kit / f"{worker.id}.key", key)
        _write_cert(kit / f"{worker.id}.crt", cert)
        _write_cert(kit / "ca.crt", ca_cert)
        address = {"connect": coordinator_uri} if worker.dial_out else {"host": worker.hosts[0], "port": worker.port}
        _write_config(
            kit / "worker.toml",
            {
                "id": worker.id,
                **address,
                "testing": worker.role == "evaluator",
                "tls-cert": f"{worker.id}.crt",
                "tls-key": f"{worker.id}.key",
                "tls-ca": "ca.crt",
                "allow-coordinator": [project.coordinator],
            },
            f"syncfed worker {worker.id} of project {project.name}:"
            " python run_websocket_server.py --config worker.toml",
        )
        kits[worker.id] = kit
    kit = output / project.coordinator
    kit.mkdir(exist_ok=True)
    listens = any(worker.dial_out for worker in project.workers)
    serves = listens or bool(project.admins)  # the admin API is served with the coordinator's certificate
    key, cert = _issue(
        project, project.coordinator, project.coordinator_hosts, ca_key, ca_cert, server=serves, client=True
    )
    _write_key(kit / f"{project.coordinator}.key", key)
    _write_cert(kit / f"{project.coordinator}.crt", cert)
    _write_cert(kit / "ca.crt", ca_cert)

    def endpoint(worker: Participant) -> str:
        return f"{worker.id}=dial-in" if worker.dial_out else f"{worker.id}=wss://{worker.hosts[0]}:{worker.port}"

    _write_config(
        kit / "coordinator.toml",
        {
            "workers": ",".join(endpoint(worker) for worker in project.workers if worker.role == "trainer"),
            "evaluator": ",".join(endpoint(worker) for worker in project.workers if worker.role == "evaluator"),
            **({"listen": f"0.0.0.0:{project.listen}"} if listens else {}),
            "tls-cert": f"{project.coordinator}.crt",
            "tls-key": f"{project.coordinator}.key",
            "tls-ca": "ca.crt",
        },
        f"syncfed coordinator of project {project.name}: python run_websocket_client.py --config coordinator.toml",
    )
    dialing = [worker.id for worker in project.workers if worker.dial_out]
    if dialing:
        _write_config(
            kit / "server.toml",
            {
                "listen": f"0.0.0.0:{project.listen}",
                "state": "state",
                "workers": dialing,
                **({"admin": f"0.0.0.0:{project.admin_port}"} if project.admins else {}),
                "tls-cert": f"{project.coordinator}.crt",
                "tls-key": f"{project.coordinator}.key",
                "tls-ca": "ca.crt",
            },
            f"syncfed job service of project {project.name}: python -m syncfed serve --config server.toml",
        )
    kits[project.coordinator] = kit
    for admin in project.admins:
        kits[admin.id] = _admin_kit(project, admin, output / admin.id, ca_key, ca_cert)
    return kits


def _admin_kit(project: Project, admin: Admin, kit: Path, ca_key: Any, ca_cert: Any) -> Path:
    """An admin's client certificate (CN the id, OU the role) and the console's ``admin.toml``."""
    kit.mkdir(exist_ok=True)
    key, cert = _issue(project, admin.id, (), ca_key, ca_cert, server=False, client=True, unit=admin.role)
    _write_key(kit / f"{admin.id}.key", key)
    _write_cert(kit / f"{admin.id}.crt", cert)
    _write_cert(kit / "ca.crt", ca_cert)
    _write_config(
        kit / "admin.toml",
        {
            "server": f"https://{url_host(project.coordinator_hosts[0])}:{project.admin_port}",
            "tls-cert": f"{admin.id}.crt",
            "tls-key": f"{admin.id}.key",
            "tls-ca": "ca.crt",
        },
        f"syncfed admin {admin.id} ({admin.role}) of project {project.name}:"
        " python -m syncfed admin --config admin.toml workers",
    )
    return kit
