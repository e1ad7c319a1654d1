"""TLS files for the dashboard's tests: a provisioned project, and certificates naming an admin role.

``provision`` makes the CA and the coordinator's certificate (which serves
HTTPS on 127.0.0.1); an admin's certificate is issued here from the same CA,
its organizational unit the role, as :mod:`syncfed.net.web` reads it. A
stranger's certificate comes from another CA.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncfed.provision import Participant, Project, provision

__all__ = ["Kit", "make_kit", "spki_pin"]


@dataclass(frozen=True)
class Kit:
    """The files a dashboard test needs: the server's and each client's (cert, key) pair."""

    ca: Path
    server: tuple[Path, Path]
    viewer: tuple[Path, Path]
    project_admin: tuple[Path, Path]
    worker: tuple[Path, Path]  # signed by the CA, but naming no admin role
    stranger: tuple[Path, Path]  # a viewer's name and role, from another CA


def make_kit(folder: Path) -> Kit:
    workers = (Participant("alice", dial_out=True),)  # a dial-in worker: the coordinator's certificate serves
    kits = provision(Project("dash", "coordinator", workers, coordinator_hosts=("127.0.0.1",)), folder / "startup")
    ca_dir = folder / "startup" / "ca"
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    other_ca = _certificate(other_name, other_name, other_key, other_key, ca=True)
    coordinator = kits["coordinator"]
    return Kit(
        ca=ca_dir / "ca.crt",
        server=(coordinator / "coordinator.crt", coordinator / "coordinator.key"),
        viewer=_admin(folder, "grace", "viewer", ca_cert.subject, ca_key),
        project_admin=_admin(folder, "ada", "project-admin", ca_cert.subject, ca_key),
        worker=(kits["alice"] / "alice.crt", kits["alice"] / "alice.key"),
        stranger=_admin(folder, "mallory", "viewer", other_ca.subject, other_key),
    )


def spki_pin(cert: Path) -> str:
    """What Chromium's ``--ignore-certificate-errors-spki-list`` takes: base64 of the SHA-256 of the public key."""
    public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _admin(folder: Path, name: str, role: str, issuer: x509.Name, issuer_key: object) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = _certificate(subject, issuer, key, issuer_key, ca=False)
    paths = (folder / f"{name}.crt", folder / f"{name}.key")
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _certificate(
    subject: x509.Name, issuer: x509.Name, key: object, issuer_key: object, *, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[attr-defined]
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
