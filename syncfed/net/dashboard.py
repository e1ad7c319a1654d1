"""The live dashboard: a read-only web page of the service's workers, jobs and the running jobs' curves.

It runs in the service's event loop (aiohttp) over HTTPS and only reads,
through :class:`~syncfed.service_api.FederationService`; actions stay in the
admin console. A client gets in with a certificate from the project's CA
naming an admin role (viewer or project-admin), or, for local use, with the
dashboard's token: ``/?token=...`` once, which answers with an HttpOnly,
Secure, SameSite=Strict cookie and sends the browser on without the token in
its address bar. Anything else is answered 401. The page and its scripts are
package data (no CDN: it works offline) and poll ``/api/state``::

    dashboard = await start_dashboard(service, host="127.0.0.1", port=8443, tls=tls, token=token)
    print(dashboard.url)
    ...
    await dashboard.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import ssl
import time
from importlib import resources
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import url_host
from ..curves import curves
from ..exceptions import ConfigError, SyncfedError
from ..service_api import ADMIN_ROLES, FederationService
from .web import peer_from_certificate

__all__ = ["COOKIE", "MIN_TOKEN_LENGTH", "Dashboard", "start_dashboard"]

#: The cookie the token is exchanged for.
COOKIE: Final = "syncfed_dashboard"

#: A shorter token could be guessed: refused rather than served.
MIN_TOKEN_LENGTH: Final = 16

#: The page's files, served from syncfed/net/static/, and their types; nothing else is.
_STATIC: Final = {
    "index.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "chart.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}

#: On every answer: the page loads nothing from anywhere else, runs no inline script and is never framed.
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Dashboard:
    """A started dashboard: where it listens, and how to stop it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"https://{url_host(self.host)}:{self.port}/"

    async def close(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()


async def start_dashboard(
    service: FederationService,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    token: str | None = None,
    # Limits
    max_jobs: int = 100,
    max_line_size: int = 8190,
    max_field_size: int = 8190,
    # Timeouts
    state_timeout: float = 10.0,
    keepalive_timeout: float = 75.0,
) -> Dashboard:
    """Serve the dashboard of ``service`` on ``host``:``port`` (0: any free port) over ``tls``.

    ``tls`` should come from :func:`syncfed.net.web.https_tls` with ``require_certificate=False``, so that
    a viewer's certificate is asked for but a token may stand in. ``max_jobs``: the newest jobs the page
    lists; ``state_timeout``: how long one ``/api/state`` may wait on the service before answering 503.

    Raises:
        ConfigError: no token and a context that asks for no certificate (nobody could get in), a token
            shorter than :data:`MIN_TOKEN_LENGTH`, or an address that cannot be bound.
    """
    if token is None and tls.verify_mode == ssl.CERT_NONE:
        raise ConfigError("the dashboard needs a token or a tls context that asks for client certificates")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"dashboard token of {len(token)} characters is shorter than {MIN_TOKEN_LENGTH}")
    if max_jobs < 1:
        raise ConfigError(f"max_jobs {max_jobs} must be at least 1")
    files = _static_files()
    # The cookie holds a keyed digest of the token, not the token: a new start makes old cookies worthless.
    session = hmac.new(secrets.token_bytes(32), token.encode(), hashlib.sha256).hexdigest() if token else None
    app = web.Application(
        middlewares=[_gate(token, session)],
        client_max_size=1024,  # it reads no request bodies
    )

    async def page(request: web.Request) -> web.Response:
        return _file(files, "index.html")

    async def static(request: web.Request) -> web.Response:
        return _file(files, request.match_info["name"])

    async def state(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(state_timeout):
                body = await _state(service, max_jobs)
        except TimeoutError:
            return web.json_response({"error": f"the service did not answer in {state_timeout:g} s"}, status=503)
        except SyncfedError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response(body)

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/state", state)
    app.on_response_prepare.append(_secure_headers)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        max_line_size=max_line_size,
        max_field_size=max_field_size,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=1.0,  # close() does not wait on a polling browser's open connection
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None
    bound = runner.addresses[0]
    return Dashboard(runner, host, int(bound[1]))


async def _state(service: FederationService, max_jobs: int) -> dict[str, Any]:
    """What the page shows: the workers, the newest jobs, and each running job's curves."""
    workers = await service.workers()
    jobs = (await service.jobs())[:max_jobs]
    running = [job["id"] for job in jobs if job["state"] == "running"]
    events = await asyncio.gather(*(service.metrics(job) for job in running))
    return {
        "time": time.time(),
        "workers": workers,
        "jobs": jobs,
        "curves": {job: curves(job_events) for job, job_events in zip(running, events, strict=True)},
    }


def _gate(token: str | None, session: str | None) -> Middleware:
    """The middleware that lets in an admin certificate, the token cookie, or ``?token=`` (swapped for the
    cookie); and answers 401 otherwise."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peer = peer_from_certificate(transport.get_extra_info("peercert") if transport is not None else None)
        if peer is not None and peer.role in ADMIN_ROLES:
            return await handler(request)
        if token is not None and session is not None:
            cookie = request.cookies.get(COOKIE, "")
            if hmac.compare_digest(cookie.encode(), session.encode()):
                return await handler(request)
            offered = request.query.get("token")
            if offered is not None and hmac.compare_digest(offered.encode(), token.encode()):
                # On to the page without the token, so it stays out of the address bar and history.
                response = web.Response(status=303, headers={"Location": "/"})
                response.set_cookie(COOKIE, session, path="/", secure=True, httponly=True, samesite="Strict")
                return response
        return web.Response(status=401, text="unauthorized: present a viewer certificate or the dashboard's token\n")

    return gate


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_HEADERS)


def _static_files() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    folder = resources.files(__package__ or "syncfed.net") / "static"
    return {name: (folder / name).read_bytes() for name in _STATIC}


def _file(files: dict[str, bytes], name: str) -> web.Response:
    if name not in files:
        raise web.HTTPNotFound()
    return web.Response(body=files[name], content_type=_STATIC[name], charset="utf-8")
