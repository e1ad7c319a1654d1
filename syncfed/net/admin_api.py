"""The service's admin API: JSON over HTTPS, for ``python -m syncfed admin``.

Every client proves who it is with an admin certificate from ``provision``
(mutual TLS: a certificate of another CA fails the handshake); its common
name is the admin, its organizational unit the role, and
:func:`syncfed.service_api.allowed` decides each request. Every request,
granted or refused, an unknown path or method included, is one line of the
audit log before it is answered; a submit or an abort is also recorded as an
attempt before it is carried out, and is not carried out if that line cannot
be written. A request whose line cannot be written is answered 500.

Endpoints (docs/protocol.md, "Admin API")::

    GET  /v1/workers                      list of WorkerRecord
    GET  /v1/jobs                         list of JobRecord, newest first
    POST /v1/jobs                         body: the job's TOML text -> JobRecord
    GET  /v1/jobs/{job}                   JobRecord
    POST /v1/jobs/{job}/abort             JobRecord
    GET  /v1/jobs/{job}/logs?since=N      {"lines": [...], "next": N}
    GET  /v1/jobs/{job}/metrics           list of metrics events
    GET  /v1/jobs/{job}/model?round=N     the safetensors file

An error is ``{"error": "one line"}`` with 400 (a bad setting), 403 (not
allowed), 404 (no such job), 409 (not in this state),
504 (too slow) or 500 (anything else; the details stay in the service's log).

Usage::

    api = await start_admin_api(service, host="0.0.0.0", port=8443, tls=https_tls(cert, key, ca,
                                require_certificate=True), audit=AuditLog(Path("audit.jsonl")))
    ...
    await api.close()
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from ..audit import AuditLog
from ..config import url_host
from ..exceptions import ConfigError, JobStateError, PermissionDenied, SyncfedError, UnknownJob
from ..service_api import ADMIN_ROLES, WRITE_ACTIONS, FederationService, allowed, whole_number
from .web import Peer, peer_from_certificate

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "AdminAPI",
    "start_admin_api",
]

logger = logging.getLogger("syncfed.admin")

# Limits
#: The largest job text a submit may carry: a job file is a few hundred bytes.
DEFAULT_MAX_BODY: Final = 64 * 1024
#: Bytes of a model file read and sent at a time.
CHUNK: Final = 256 * 1024

# Timeouts
#: Seconds a request may take, reading its body and asking the service included.
DEFAULT_REQUEST_TIMEOUT: Final = 30.0
#: Seconds a model download may take to reach the client.
DEFAULT_DOWNLOAD_TIMEOUT: Final = 600.0
#: Seconds a connection may sit without a request (before its first one, too) before it is closed.
DEFAULT_IDLE_TIMEOUT: Final = 30.0

#: HTTP status by error type; the first match wins.
STATUS: Final[tuple[tuple[type[SyncfedError], int], ...]] = (
    (PermissionDenied, 403),
    (UnknownJob, 404),
    (JobStateError, 409),
    (ConfigError, 400),
    (SyncfedError, 400),
)

#: What an endpoint does once allowed: the answer (JSON-ready, or a file to send) and what the audit line adds.
Body = Callable[["_Settings", web.Request, Peer], Awaitable[tuple[Any, dict[str, Any]]]]


class AdminAPI:
    """The running API: where it listens, and how to stop it."""

    def __init__(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self._runner = runner
        self.address = address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{url_host(host)}:{port}"

    async def close(self) -> None:
        """Stop listening and end the open requests."""
        await self._runner.cleanup()


async def start_admin_api(
    service: FederationService,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    audit: AuditLog,
    # Limits
    max_body: int = DEFAULT_MAX_BODY,
    # Timeouts
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> AdminAPI:
    """Serve ``service``'s admin API on ``host:port`` (0: any free port) in the running event loop.

    ``tls`` should come from :func:`syncfed.net.web.https_tls` with
    ``require_certificate=True``: the role is read from the client's certificate.

    Raises:
        ConfigError: if ``tls`` does not require a client certificate.
        OSError: if the address cannot be bound.
    """
    if tls.verify_mode != ssl.CERT_REQUIRED:
        raise ConfigError("the admin API's TLS context must require client certificates (require_certificate=True)")
    settings = _Settings(service, audit, max_body, request_timeout, download_timeout)
    app = web.Application(middlewares=[settings.refusals], client_max_size=max_body)
    routes = (
        ("GET", "/v1/workers", "workers", _workers),
        ("GET", "/v1/jobs", "jobs", _jobs),
        ("POST", "/v1/jobs", "submit", _submit),
        ("GET", "/v1/jobs/{job}", "status", _status),
        ("POST", "/v1/jobs/{job}/abort", "abort", _abort),
        ("GET", "/v1/jobs/{job}/logs", "logs", _logs),
        ("GET", "/v1/jobs/{job}/metrics", "metrics", _metrics),
        ("GET", "/v1/jobs/{job}/model", "download", _download),
    )
    for method, path, action, body in routes:
        app.router.add_route(method, path, settings.endpoint(action, body))
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout, shutdown_timeout=request_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return AdminAPI(runner, (str(bound[0]), int(bound[1])))


class _Settings:
    """What every endpoint shares: the service, the audit log, the limits."""

    def __init__(
        self,
        service: FederationService,
        audit: AuditLog,
        max_body: int,
        request_timeout: float,
        download_timeout: float,
    ) -> None:
        self.service = service
        self.audit = audit
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.download_timeout = download_timeout

    def endpoint(self, action: str, body: Body) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A handler that checks the role, runs ``body`` within the timeout, audits and answers."""

        async def handle(request: web.Request) -> web.StreamResponse:
            peer = _peer(request)
            who, role = peer if peer is not None else ("", "")
            target = request.match_info.get("job", "")
            if peer is None or not allowed(role, action):
                refusal = PermissionDenied(
                    f"{role} {who} may not {action}"
                    if role in ADMIN_ROLES
                    else f"the certificate of {who!r} names no admin role"
                )
                await self._record(who, role, action, target, "denied")
                return _error(refusal)
            if action in WRITE_ACTIONS:  # on record before it is done: it never stands unaudited
                await self._record(who, role, action, target, "attempt")
            try:
                async with asyncio.timeout(self.request_timeout):
                    answer, details = await body(self, request, peer)
            except SyncfedError as exc:
                await self._record(who, role, action, target, f"error: {exc}")
                return _error(exc)
            except TimeoutError:
                await self._record(who, role, action, target, "error: timeout")
                return web.json_response(
                    {"error": f"the service took longer than {self.request_timeout:g} seconds"}, status=504
                )
            except Exception:
                logger.exception("admin %s by %s failed", action, who)
                await self._record(who, role, action, target, "error: internal error")
                return web.json_response({"error": "internal error; the service's log has the details"}, status=500)
            await self._record(who, role, action, target, "ok", **details)
            if isinstance(answer, Path):
                return await self._send_file(request, answer)
            return web.json_response(answer)

        return handle

    async def _record(self, who: str, role: str, action: str, target: str, result: str, **details: Any) -> None:
        """One audit line, written off the event loop (it waits for the disk).

        Raises:
            web.HTTPInternalServerError: it cannot be written; :meth:`refusals` answers it as JSON.
        """
        try:
            await asyncio.to_thread(
                self.audit.record, who=who, role=role, action=action, target=target, result=result, **details
            )
        except OSError as exc:
            logger.error("cannot write the audit log %s: %s", self.audit.path, exc)
            raise web.HTTPInternalServerError(reason="the audit log cannot be written") from None

    @web.middleware
    async def refusals(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own refusals (unknown path, wrong method) audited and answered as one JSON line like ours."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status != 500:  # 500 is an audit line that could not be written: do not try again
                who, role = _peer(request) or ("", "")
                target = f"{request.method} {request.path}"[:200]
                await self._record(who, role, "unknown", target, f"error: {exc.reason.lower()}")
            return web.json_response({"error": exc.reason.lower()}, status=exc.status)

    async def _send_file(self, request: web.Request, path: Path) -> web.StreamResponse:
        """Stream ``path`` to the client within the download timeout, a chunk in memory at a time."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        with path.open("rb") as handle:
            response.content_length = path.stat().st_size
            try:
                async with asyncio.timeout(self.download_timeout):
                    await response.prepare(request)
                    while chunk := await asyncio.to_thread(handle.read, CHUNK):
                        await response.write(chunk)
                    await response.write_eof()
            except TimeoutError:
                logger.warning("download of %s took longer than %g seconds: cut off", path, self.download_timeout)
                if request.transport is not None:
                    request.transport.abort()
        return response


def _error(error: SyncfedError) -> web.Response:
    status = next(code for kind, code in STATUS if isinstance(error, kind))
    return web.json_response({"error": str(error)}, status=status)


def _peer(request: web.Request) -> Peer | None:
    transport = request.transport
    return peer_from_certificate(transport.get_extra_info("peercert") if transport is not None else None)


def _number(request: web.Request, name: str) -> int | None:
    """A query parameter that must be a whole number from 0 on; ``None`` when absent.

    Raises:
        ConfigError: naming the parameter and its value.
    """
    text = request.query.get(name)
    if text is None:
        return None
    number = whole_number(text)
    if number is None:
        raise ConfigError(f"{name} {text[:32]!r} is not a whole number from 0 on")
    return number


async def _workers(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    return await settings.service.workers(), {}


async def _jobs(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    return await settings.service.jobs(), {}


async def _submit(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    limit = settings.max_body
    if request.content_length is not None and request.content_length > limit:
        raise ConfigError(f"job text of {request.content_length} bytes exceeds limit of {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # sent in chunks, without a length
        raise ConfigError(f"job text exceeds limit of {limit} bytes") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("job text is not utf-8") from None
    record = await settings.service.submit(text, by=peer.name)
    return record, {"job": record["id"]}


async def _status(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    return await settings.service.job(request.match_info["job"]), {}


async def _abort(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    record = await settings.service.abort(request.match_info["job"], by=peer.name)
    return record, {"state": record["state"]}


async def _logs(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    lines, following = await settings.service.logs(request.match_info["job"], since=_number(request, "since") or 0)
    return {"lines": lines, "next": following}, {}


async def _metrics(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    return await settings.service.metrics(request.match_info["job"]), {}


async def _download(settings: _Settings, request: web.Request, peer: Peer) -> tuple[Any, dict[str, Any]]:
    chosen = _number(request, "round")
    path = await settings.service.model(request.match_info["job"], round=chosen)
    return path, {"round": chosen, "bytes": path.stat().st_size}
