"""``python -m syncfed serve``: the job service, a coordinator that stays up and runs jobs from a queue.

Usage::

    python -m syncfed serve --config server.toml
    python -m syncfed serve --config server.toml --queue job.toml   # queue a job file as the service starts

``server.toml`` holds this command's flags as keys (``listen``, ``state``,
``workers``, ``worker-tokens`` or ``tls-cert``/``tls-key``/``tls-ca``, ...);
flags given on the command line win. See :mod:`syncfed.coordinator.service`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..auth import read_token
from ..config import parse_listen
from ..coordinator.job_file import SOURCE, JobFlags
from ..coordinator.service import Service, ServiceSettings
from ..exceptions import ConfigError, SyncfedError
from ..net.admin_api import start_admin_api
from ..net.dashboard import start_dashboard
from ..net.web import https_tls
from . import coordinator
from .allocator import keep_freed_memory
from .common import (
    INTERRUPTED,
    Parser,
    add_connection_limits,
    add_listen_flags,
    fail,
    parse_arguments,
    run_program,
    settings_defaults,
    setup_logging,
)

__all__ = ["PROGRAM", "build_parser", "main"]

PROGRAM = "python -m syncfed serve"
#: Who ``--queue`` submits as, in the job's record.
QUEUED_BY = "serve --queue"


def _job_flags(settings: Mapping[str, Any], folder: Path) -> argparse.Namespace:
    """A job's keys as the coordinator's flags, each checked as ``run_websocket_client.py --config`` checks it."""
    parser = coordinator.build_parser()
    parser.prog = "a job"
    parser.set_defaults(**settings_defaults(parser, settings, folder=folder, source=SOURCE))
    return parser.parse_args([])


#: How the service reads a job file: with the coordinator's own parser and config builder.
JOB_FLAGS = JobFlags(parse=_job_flags, build=coordinator.config_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        description="Keep dial-in workers connected and run jobs from a queue. Settings may come from --config.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="read settings from this TOML file (flags win)")
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("state"),
        metavar="DIR",
        help="jobs.sqlite3, the model registry registry/ and each job's files in jobs/ID/ (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        default=[],
        metavar="ID",
        help="the ids of the workers let in, trainers and evaluators; in the config file a list",
    )
    parser.add_argument(
        "--queue",
        action="append",
        type=Path,
        default=[],
        metavar="JOB",
        help="queue this job file (TOML) as the service starts, before its workers connect, unless a job of the"
        " same text is queued or running already (a restart does not queue it twice); repeatable",
    )
    parser.add_argument(
        "--allow-imports",
        nargs="+",
        default=[],
        metavar="MOD:NAME",
        help="import paths a job's strategy, task or model may name (they run in the service's process);"
        " by default only the built-in ones; in the config file a list",
    )
    add_listen_flags(parser)
    consoles = parser.add_argument_group("the admin API and the dashboard (HTTPS with the service's certificate)")
    consoles.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve the admin API here (python -m syncfed admin); admins prove themselves with a certificate"
        " from provision, and every request is appended to STATE/audit.jsonl",
    )
    consoles.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve the read-only dashboard here, to viewer or project-admin certificates",
    )
    consoles.add_argument(
        "--dashboard-token-file",
        type=Path,
        metavar="FILE",
        help="also let in whoever opens the dashboard with ?token= this file's token (local use)",
    )
    security = parser.add_argument_group("security (the coordinator's startup kit from provision)")
    security.add_argument("--tls-cert", type=Path, metavar="FILE", help="the service's certificate: it serves wss://")
    security.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key")
    security.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="require worker certificates signed by this CA; their name is the id",
    )
    limits = parser.add_argument_group("limits and timeouts")
    add_connection_limits(limits)
    limits.add_argument(
        "--ping-interval", type=float, default=20.0, help="seconds between pings of each worker (default: %(default)s)"
    )
    limits.add_argument(
        "--ping-timeout", type=float, default=20.0, help="a worker silent this long is dropped (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="log requests and connections")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Raises ConfigError: no --listen."""
    if args.listen is None:
        raise ConfigError("the service needs --listen HOST:PORT for its workers to dial")
    return ServiceSettings(
        state=args.state,
        listen=args.listen,
        workers=tuple(args.workers),
        worker_tokens=args.worker_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        insecure_listen=args.insecure_listen,
        max_message_size=args.max_message_size,
        max_pending_connections=args.max_pending_connections,
        connect_timeout=args.connect_timeout,
        handshake_timeout=args.handshake_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        allow_imports=tuple(args.allow_imports),
    )


async def serve(args: argparse.Namespace) -> None:
    """Run the service until SIGTERM or Ctrl-C; running jobs stay "running", to resume at the next start.

    Raises:
        ConfigError: invalid settings, or a --queue job file that is unreadable or invalid.
    """
    for flag, address in (("--admin", args.admin), ("--dashboard", args.dashboard)):
        if address is not None:  # before any worker is let in
            parse_listen(address, flag)
            _kit(args, flag)
    if args.dashboard_token_file is not None and args.dashboard is None:
        raise ConfigError("--dashboard-token-file goes with --dashboard HOST:PORT")
    token = read_token(args.dashboard_token_file).decode() if args.dashboard_token_file is not None else None
    service = Service(settings_from_args(args), flags=JOB_FLAGS, report=functools.partial(print, flush=True))
    queued = []
    for path in args.queue:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read job file {path}: {exc}") from None
        try:
            queued.append((path, text, service.check(text)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await service.start()
    try:
        for path, text, job in queued:
            pending = service.store.unfinished(text)
            if pending is not None:
                print(f"Not queued again: {path} is job {pending['id']}, {pending['state']}", flush=True)
                continue
            record = service.queue(text, job, by=QUEUED_BY)
            print(f"Queued job {record['id']} ({record['name']})", flush=True)
        async with consoles(args, service, token):
            await stop.wait()
        print("Stopping (SIGTERM): a running job resumes from its checkpoint at the next start", flush=True)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)
        await service.close()


@contextlib.asynccontextmanager
async def consoles(args: argparse.Namespace, service: Service, token: str | None) -> AsyncIterator[None]:
    """The admin API and the dashboard (which also lets in ``token``), as asked for, served beside the
    service in its event loop.

    Raises:
        ConfigError: one is asked for without the service's certificate, key and CA.
    """
    async with contextlib.AsyncExitStack() as stack:
        if args.admin is not None:
            host, port = parse_listen(args.admin, "--admin")
            api = await start_admin_api(
                service,
                host=host,
                port=port,
                tls=https_tls(*_kit(args, "--admin"), require_certificate=True),
                audit=AuditLog(args.state / "audit.jsonl"),
            )
            stack.push_async_callback(api.close)
            print(f"Admin API on {api.url}", flush=True)
        if args.dashboard is not None:
            host, port = parse_listen(args.dashboard, "--dashboard")
            page = await start_dashboard(
                service,
                host=host,
                port=port,
                tls=https_tls(*_kit(args, "--dashboard"), require_certificate=False),
                token=token,
            )
            stack.push_async_callback(page.close)
            print(f"Dashboard on {page.url}", flush=True)
        yield


def _kit(args: argparse.Namespace, flag: str) -> tuple[Path, Path, Path]:
    """The certificate, key and CA an HTTPS console serves with. Raises ConfigError: one is missing."""
    if args.tls_cert is None or args.tls_key is None or args.tls_ca is None:
        raise ConfigError(f"{flag} needs --tls-cert, --tls-key and --tls-ca: the service's kit from provision")
    return args.tls_cert, args.tls_key, args.tls_ca


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line after ``serve``."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_arguments(build_parser(), sys.argv[2:] if argv is None else argv)
    except ConfigError as exc:
        return fail(PROGRAM, exc)
    setup_logging(args.verbose, default=30)
    keep_freed_memory()  # before any thread: each round's model-sized buffers reuse the last round's pages
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except OSError as exc:  # the listen address is taken, say
        print(f"{PROGRAM}: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
