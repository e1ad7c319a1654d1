"""What the service's HTTPS endpoints (admin API, dashboard) share: their TLS and who the peer proved to be.

Admins and viewers prove themselves with a certificate from ``provision``:
its common name is who they are, its organizational unit their role
(:data:`syncfed.service_api.ADMIN_ROLES`). A worker's certificate, signed by
the same CA, names no such role and is refused as an admin.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NamedTuple

from .transport import server_tls, subject

__all__ = ["Peer", "https_tls", "peer_from_certificate"]


class Peer(NamedTuple):
    """Who a verified client certificate names, and the role it grants ("" when it names none)."""

    name: str
    role: str


def https_tls(cert: Path, key: Path, ca: Path, *, require_certificate: bool) -> ssl.SSLContext:
    """A server context whose clients' certificates must be signed by ``ca``: always when
    ``require_certificate``, else only when they present one (the dashboard also takes a token).

    Raises:
        ConfigError: if a file cannot be read.
    """
    context = server_tls(cert, key, ca)
    if not require_certificate:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_from_certificate(peercert: object) -> Peer | None:
    """The name and role of a verified peer certificate (``SSLObject.getpeercert()`` form); ``None`` without one."""
    fields = subject(peercert)
    name = fields.get("commonName")
    if not name:
        return None
    return Peer(name, fields.get("organizationalUnitName", ""))
