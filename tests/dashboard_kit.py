"""TLS files for the dashboard's tests, all from ``provision``: a project whose admins hold a viewer's and a
project admin's certificate, a worker whose certificate names no admin role, and a stranger: a viewer of
another project's CA.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from syncfed.provision import Admin, Participant, Project, provision

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
    def project(name: str) -> Project:
        return Project(
            name,
            "coordinator",
            (Participant("alice", dial_out=True),),  # a dial-in worker: the coordinator's certificate serves
            coordinator_hosts=("127.0.0.1",),
            admins=(Admin("grace", "viewer"), Admin("ada", "project-admin")),
        )

    kits = provision(project("dash"), folder / "startup")
    foreign = provision(project("elsewhere"), folder / "foreign")
    return Kit(
        ca=folder / "startup" / "ca" / "ca.crt",
        server=_pair(kits, "coordinator"),
        viewer=_pair(kits, "grace"),
        project_admin=_pair(kits, "ada"),
        worker=_pair(kits, "alice"),
        stranger=_pair(foreign, "grace"),
    )


def spki_pin(cert: Path) -> str:
    """What Chromium's ``--ignore-certificate-errors-spki-list`` takes: base64 of the SHA-256 of the public key."""
    public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _pair(kits: dict[str, Path], name: str) -> tuple[Path, Path]:
    return kits[name] / f"{name}.crt", kits[name] / f"{name}.key"
