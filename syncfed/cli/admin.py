"""``python -m syncfed admin``: the console of a running federation service.

Usage::

    python -m syncfed admin --config startup/ops@hospital-a.org/admin.toml workers
    python -m syncfed admin --config admin.toml submit job.toml
    python -m syncfed admin --config admin.toml jobs --json
    python -m syncfed admin --config admin.toml status JOB | abort JOB | metrics JOB
    python -m syncfed admin --config admin.toml logs JOB --follow
    python -m syncfed admin --config admin.toml download JOB --round 3 -o model.safetensors

It speaks to the service's admin API (:mod:`syncfed.net.admin_api`) over
HTTPS with the admin certificate of ``provision``'s kit, which says who the
admin is and what they may do. Each command prints a table, or with
``--json`` what the API answered; an error is one line and a nonzero exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

from ..exceptions import (
    AuthenticationFailed,
    ConfigError,
    JobStateError,
    PermissionDenied,
    SyncfedError,
    UnknownJob,
)
from ..net.transport import client_tls
from ..service_api import FINISHED_STATES
from .common import INTERRUPTED, Parser, aligned, fail, parse_arguments, run_program, size

__all__ = ["PROGRAM", "main"]

PROGRAM = "python -m syncfed admin"

# Limits
#: The largest JSON answer read: a long job log is a few megabytes.
DEFAULT_MAX_RESPONSE: Final = 64 * 2**20
#: The largest model file downloaded.
DEFAULT_MAX_DOWNLOAD: Final = 16 * 2**30
CHUNK: Final = 256 * 1024

# Timeouts
#: Seconds to connect, and to wait for each read of an answer.
DEFAULT_TIMEOUT: Final = 30.0
#: Seconds between two looks at a followed job's log, by default and at most.
DEFAULT_FOLLOW_INTERVAL: Final = 1.0
MAX_FOLLOW_INTERVAL: Final = 60.0

#: The error each status of the API stands for; others are plain SyncfedErrors.
ERRORS: Final[dict[int, type[SyncfedError]]] = {
    400: ConfigError,
    403: PermissionDenied,
    404: UnknownJob,
    409: JobStateError,
}

#: How much of a job's reason the jobs table shows; ``status JOB`` prints all of it.
REASON_WIDTH = 60


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    try:
        args = parse_arguments(_parser(), argv)
        return _COMMANDS[args.command](_Client.from_flags(args), args)
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except KeyboardInterrupt:
        return INTERRUPTED


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_FOLLOW_INTERVAL:
        raise argparse.ArgumentTypeError(f"interval {text} is not in (0, {MAX_FOLLOW_INTERVAL:g}] seconds")
    return value


def _parser() -> Parser:
    parser = Parser(prog=PROGRAM, description="the console of a running federation service (its admin API)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="admin.toml from provision: the settings below")
    parser.add_argument("--server", metavar="URL", help="the service's admin API, https://HOST:PORT")
    security = parser.add_argument_group("security (the admin's startup kit)")
    security.add_argument("--tls-cert", type=Path, metavar="FILE", help="the admin certificate: who, and which role")
    security.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    security.add_argument("--tls-ca", type=Path, metavar="FILE", help="the project CA, to verify the service")
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the service (default: %(default)s)"
    )
    limits.add_argument(
        "--max-response-size",
        type=size,
        default=DEFAULT_MAX_RESPONSE,
        help="largest answer read (default: %(default)s)",
    )
    limits.add_argument(
        "--max-download-size", type=size, default=DEFAULT_MAX_DOWNLOAD, help="largest model file (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, job: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        if job:
            sub.add_argument("job", metavar="JOB", help="the job's id, as submit and jobs print it")
        sub.add_argument("--json", action="store_true", help="print the API's answer as JSON instead of a table")
        return sub

    command("workers", "the workers the service knows: connected since, last seen, version, data", job=False)
    command("submit", "queue a job (project admins only)", job=False).add_argument(
        "file", type=Path, metavar="JOB_FILE", help="the job's TOML file"
    )
    command("jobs", "every job, newest first", job=False)
    command("status", "where a job stands, with its refusals and the reason it ended")
    command("abort", "stop a queued or running job (project admins only)")
    logs = command("logs", "a job's log")
    logs.add_argument("--follow", action="store_true", help="keep printing new lines until the job finishes")
    logs.add_argument(
        "--interval",
        type=_interval,
        default=DEFAULT_FOLLOW_INTERVAL,
        help=f"seconds between looks with --follow, at most {MAX_FOLLOW_INTERVAL:g} (default: %(default)s)",
    )
    command("metrics", "a job's metrics per round")
    download = command("download", "save a job's model as safetensors")
    download.add_argument("--round", type=int, metavar="N", help="the model of round N (default: the last kept)")
    download.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="where to write it")
    return parser


class _Readable(Protocol):
    def read(self, amount: int, /) -> bytes: ...


class _Client:
    """Requests to the admin API; every failure becomes one SyncfedError line."""

    def __init__(self, server: str, tls: ssl.SSLContext, *, timeout: float, max_response: int) -> None:
        self.server = server
        self.timeout = timeout
        self.max_response = max_response
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls))

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> _Client:
        """Raises ConfigError: a setting missing, an address that is not https://, an unreadable TLS file."""
        missing = [flag for flag in ("server", "tls_cert", "tls_key", "tls_ca") if getattr(args, flag) is None]
        if missing:
            names = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ConfigError(f"no {names}: give --config with the admin.toml of your startup kit")
        if not args.server.startswith("https://"):
            raise ConfigError(f"server {args.server!r} is not an https:// address")
        tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
        return cls(args.server.rstrip("/"), tls, timeout=args.timeout, max_response=args.max_response_size)

    def get(self, path: str, **query: object) -> Any:
        """The JSON answer of a GET (``None`` query values are left out)."""
        with self._open("GET", path, query) as response:
            return self._json(response)

    def post(self, path: str, body: bytes = b"") -> Any:
        with self._open("POST", path, {}, body) as response:
            return self._json(response)

    def download(self, path: str, output: Path, *, limit: int, **query: object) -> int:
        """Save the answer to ``output`` (complete or not at all); the bytes written."""
        with self._open("GET", path, query) as response:
            folder = output.parent if str(output.parent) else Path(".")
            descriptor, partial = tempfile.mkstemp(dir=folder, prefix=f".{output.name}.", suffix=".part")
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    written = self._copy(response, handle, limit)
                os.replace(partial, output)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        return written

    def _copy(self, response: _Readable, handle: BinaryIO, limit: int) -> int:
        written = 0
        while chunk := self._read(response, CHUNK):
            written += len(chunk)
            if written > limit:
                raise SyncfedError(f"model from {self.server} exceeds limit of {limit} bytes")
            handle.write(chunk)
        return written

    def _open(self, method: str, path: str, query: dict[str, object], body: bytes | None = None) -> Any:
        given = {key: value for key, value in query.items() if value is not None}
        url = f"{self.server}{path}" + (f"?{urllib.parse.urlencode(given)}" if given else "")
        request = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/toml")
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._refusal(exc) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _read(self, response: _Readable, amount: int) -> bytes:
        try:
            return response.read(amount)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _json(self, response: _Readable) -> Any:
        data = self._read(response, self.max_response + 1)
        if len(data) > self.max_response:
            raise SyncfedError(f"answer from {self.server} exceeds limit of {self.max_response} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SyncfedError(f"answer from {self.server} is not JSON") from None

    def _refusal(self, error: urllib.error.HTTPError) -> SyncfedError:
        """The API's one-line error, as the error type its status stands for."""
        try:
            message = str(json.loads(self._read(error, 4096))["error"])
        except (SyncfedError, ValueError, KeyError, TypeError):
            message = f"{self.server} answered HTTP {error.code} {error.reason}"
        return ERRORS.get(error.code, SyncfedError)(message)

    def _unreachable(self, reason: object) -> SyncfedError:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return AuthenticationFailed(
                f"TLS failure with {self.server}: its certificate does not verify against"
                f" the --tls-ca: {reason.verify_message}"
            )
        if isinstance(reason, ssl.SSLError):
            # e.g. TLSV1_ALERT_UNKNOWN_CA -> "tlsv1 alert unknown ca"
            text = str(reason.reason or reason).lower().replace("_", " ")
            return AuthenticationFailed(f"TLS failure with {self.server}: {text}")
        if isinstance(reason, ConnectionRefusedError):
            return SyncfedError(f"cannot reach {self.server}: connection refused")
        if isinstance(reason, TimeoutError):
            return SyncfedError(f"{self.server} did not answer within {self.timeout:g} seconds")
        if isinstance(reason, ConnectionResetError | http.client.RemoteDisconnected | BrokenPipeError):
            # A client certificate the service does not accept ends the connection after the handshake (TLS 1.3).
            return AuthenticationFailed(
                f"TLS failure with {self.server}: it closed the connection without an answer"
                " (does it accept this admin certificate?)"
            )
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        return SyncfedError(f"cannot reach {self.server}: {text}")


def _quote(job: str) -> str:
    return urllib.parse.quote(job, safe="")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _when(seconds: float | None) -> str:
    return "" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{max(0.0, time.time() - seconds):.0f} s ago"


def _workers(client: _Client, args: argparse.Namespace) -> int:
    records = client.get("/v1/workers")
    if args.json:
        _print_json(records)
        return 0
    header = ("id", "role", "connected since", "last seen", "rtt ms", "version", "data", "job")
    rows = [
        (
            record["id"],
            record["role"],
            _when(record["connected_since"]) if record["connected"] else "not connected",
            _ago(record["last_seen"]),
            "" if record["rtt_ms"] is None else f"{record['rtt_ms']:.1f}",
            record["version"],
            record["data"],
            record["job"] or "",
        )
        for record in records
    ]
    print(aligned([header, *rows], right={4}) if rows else "no workers")
    return 0


def _round(record: dict[str, Any]) -> str:
    return f"{record['round']}/{record['rounds']}"


def _shortened(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis: the table stays readable, ``status`` has it whole."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _jobs(client: _Client, args: argparse.Namespace) -> int:
    records = client.get("/v1/jobs")
    if args.json:
        _print_json(records)
        return 0
    header = ("id", "name", "state", "round", "workers", "submitted", "by", "reason")
    rows = [
        (
            record["id"],
            record["name"],
            record["state"],
            _round(record),
            ",".join(record["workers"]),
            _when(record["submitted_at"]),
            record["submitted_by"],
            _shortened(record["reason"] or "", REASON_WIDTH),
        )
        for record in records
    ]
    print(aligned([header, *rows], right=set()) if rows else "no jobs")
    return 0


def _submit(client: _Client, args: argparse.Namespace) -> int:
    try:
        text = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read job file {args.file}: {exc.strerror}") from None
    record = client.post("/v1/jobs", text)
    if args.json:
        _print_json(record)
    else:
        print(f"submitted job {record['id']} ({record['name']}): {record['state']}")
    return 0


def _describe(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A job as label-value lines: where it stands, who asked, who refused it and why it ended."""
    workers = ", ".join(record["workers"]) + (f"; evaluator {record['evaluator']}" if record["evaluator"] else "")
    lines = [
        ("job", f"{record['id']} ({record['name']})"),
        ("state", f"{record['state']}, round {_round(record)}"),
        ("submitted", f"{_when(record['submitted_at'])} by {record['submitted_by']}"),
        ("started", _when(record["started_at"])),
        ("finished", _when(record["finished_at"])),
        ("workers", workers),
    ]
    lines += [("refused by", f"{site}: {reason}") for site, reason in sorted(record["refusals"].items())]
    if record["reason"]:
        lines.append(("reason", record["reason"]))
    if record["result"]:
        lines.append(("result", ", ".join(f"{key} {_figure(value)}" for key, value in record["result"].items())))
    return [(label, value) for label, value in lines if value]


def _status(client: _Client, args: argparse.Namespace) -> int:
    record = client.get(f"/v1/jobs/{_quote(args.job)}")
    if args.json:
        _print_json(record)
    else:
        print(aligned(_describe(record), right=set()))
    return 0


def _abort(client: _Client, args: argparse.Namespace) -> int:
    record = client.post(f"/v1/jobs/{_quote(args.job)}/abort")
    if args.json:
        _print_json(record)
    else:
        print(f"job {record['id']}: {record['state']}")
    return 0


def _logs(client: _Client, args: argparse.Namespace) -> int:
    """Print the log; with ``--follow``, look again every interval until the job has finished."""
    path = f"/v1/jobs/{_quote(args.job)}"
    since = 0
    while True:
        # The state is read before the lines: a job seen finished has written all it will.
        finished = not args.follow or client.get(path)["state"] in FINISHED_STATES
        answer = client.get(f"{path}/logs", since=since)
        for line in answer["lines"]:
            print(json.dumps(line) if args.json else line, flush=args.follow)
        since = answer["next"]
        if finished:
            return 0
        time.sleep(args.interval)


def _metrics(client: _Client, args: argparse.Namespace) -> int:
    events = client.get(f"/v1/jobs/{_quote(args.job)}/metrics")
    if args.json:
        _print_json(events)
    else:
        print(_metrics_table(events) or "no metrics yet")
    return 0


def _figure(value: object) -> str:
    """A result's figure: its round as a whole number, a score to four decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) > 1 else f"{value:.4f}"


def _metrics_table(events: Sequence[dict[str, Any]]) -> str:
    """One row per round: its time and workers, and the federated model's figures."""
    rounds: dict[int, dict[str, str]] = {}
    figures: list[str] = []
    for event in events:
        row = rounds.setdefault(int(event.get("round", 0)), {})
        if event.get("event") == "round":
            row["seconds"] = f"{event.get('seconds', 0):.2f}"
            row["workers"] = str(len(event.get("workers", ())))
            row["failed"] = str(len(event.get("failed", {})))
        elif event.get("event") == "eval" and event.get("model") == "federated":
            for key, value in event.items():
                if key in ("round", "n", "correct") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                figures += [key] if key not in figures else []
                row[key] = f"{value:.4f}"
    header = ["round", "seconds", "workers", "failed", *figures]
    rows = [[str(number), *(row.get(column, "") for column in header[1:])] for number, row in sorted(rounds.items())]
    return aligned([header, *rows], right=set(range(len(header)))) if rows else ""


def _download(client: _Client, args: argparse.Namespace) -> int:
    written = client.download(
        f"/v1/jobs/{_quote(args.job)}/model", args.output, limit=args.max_download_size, round=args.round
    )
    if args.json:
        _print_json({"job": args.job, "round": args.round, "path": str(args.output), "bytes": written})
    else:
        print(f"wrote {args.output} ({written} bytes)")
    return 0


_COMMANDS = {
    "workers": _workers,
    "submit": _submit,
    "jobs": _jobs,
    "status": _status,
    "abort": _abort,
    "logs": _logs,
    "metrics": _metrics,
    "download": _download,
}
