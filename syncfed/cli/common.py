"""What the command-line tools share: flag spelling, logging, exit codes, the flags of worker connections."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import difflib
import logging
import os
import re
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from ..auth import read_token
from ..config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REQUEST_TIMEOUT,
)
from ..exceptions import (
    AuthenticationFailed,
    CheckpointError,
    ConfigError,
    DatasetError,
    IncompatibleWorkers,
    LocalProtocolError,
    ModelError,
    ProtocolError,
    QuorumNotMet,
    RemoteError,
    SyncfedError,
    WorkerUnavailable,
)
from ..net.link import LinkSettings
from ..net.transport import client_tls

__all__ = [
    "EXIT_CODES",
    "exit_code",
    "Parser",
    "normalize_flags",
    "parse_arguments",
    "settings_defaults",
    "setup_logging",
    "size",
    "fail",
    "aligned",
    "add_client_security_flags",
    "add_connection_limits",
    "add_listen_flags",
    "add_secure_agg_flags",
    "link_settings",
    "FromFlags",
    "config_from_flags",
]

#: Exit status by error type; the first matching entry wins.
EXIT_CODES: tuple[tuple[type[SyncfedError], int], ...] = (
    (ConfigError, 2),
    (DatasetError, 3),
    (ModelError, 3),
    (IncompatibleWorkers, 4),
    (WorkerUnavailable, 5),
    (RemoteError, 6),
    (LocalProtocolError, 2),  # the settings built a message the protocol forbids: a configuration error
    (ProtocolError, 7),  # a peer sent garbage
    (QuorumNotMet, 8),
    (CheckpointError, 9),
    (AuthenticationFailed, 10),
    (SyncfedError, 1),
)
INTERRUPTED = 130
#: The exit status of a program stopped by SIGTERM (128 + 15), once it has cleaned up.
TERMINATED = 143

Config = TypeVar("Config", bound="DataclassInstance")
#: How a config field is read from the parsed flags when it is not simply the flag of its name.
FromFlags = Callable[[argparse.Namespace], Any]


def exit_code(error: SyncfedError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


_T = TypeVar("_T")


class Terminated(Exception):
    """The program was sent SIGTERM and its run was cancelled (its ``finally`` blocks ran)."""


def run_terminable(main: Callable[[], Awaitable[_T]]) -> _T:
    """``asyncio.run(main())``, with SIGTERM cancelling it as Ctrl-C does, so that what the run started
    (spawned worker processes, above all) is stopped on the way out rather than orphaned.

    Raises:
        Terminated: if SIGTERM ended the run.
    """
    terminated = False

    async def body() -> _T:
        nonlocal terminated
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: the caller handles signals
            loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            return await main()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # False, and nothing done, when none was added

    try:
        return asyncio.run(body())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise


class _EndOfInput(asyncio.Protocol):
    """Resolves ``ended`` when standard input closes; what is written to it is ignored (``Protocol``'s default)."""

    def __init__(self, ended: asyncio.Future[None]) -> None:
        self.ended = ended

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def until_input_ends(work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` until it ends, or until standard input reaches its end and it is cancelled.

    A parent that starts a process with a pipe as its input holds the pipe's
    other end: when the parent exits, however it exits (SIGKILL included), the
    kernel closes that end, and the child stops instead of living on as an
    orphan. Returns whether the input's end stopped ``work``.

    Raises:
        ConfigError: if standard input is a regular file, which has no end to wait for.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    try:
        transport, _ = await loop.connect_read_pipe(lambda: _EndOfInput(ended), sys.stdin)
    except ValueError:  # asyncio reads only pipes, sockets and terminals
        work.close()
        raise ConfigError("standard input is a file, not a pipe: its end cannot stop the program") from None
    running = asyncio.ensure_future(work)
    try:
        await asyncio.wait({running, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        transport.close()
        if not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    if running.cancelled():
        return True
    running.result()  # what ended it, raised
    return False


#: The exit status of a program whose output's reader went away (128 + SIGPIPE), as Unix tools end.
BROKEN_PIPE = 141


def run_program(body: Callable[[], int]) -> int:
    """Run a program's ``body`` and flush its output; a reader that went away (``| head``) ends it quietly.

    The flush is here so that buffered output meets a closed pipe inside the
    program, not in the interpreter's exit (which would print a traceback and
    exit 120).
    """
    try:
        status = body()
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed()
    return status


def stdout_closed() -> int:
    """End quietly when standard output's reader has gone (``| head``), as Unix tools do.

    Standard output is pointed at the null device, so that the interpreter's
    last flush at exit does not fail on the closed pipe a second time.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE


def fail(program: str, error: SyncfedError) -> int:
    """Print one clear line for ``error`` and return its exit status."""
    print(f"{program}: error: {error}", file=sys.stderr)
    return exit_code(error)


def aligned(rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Rows in columns two spaces apart, the ``right`` ones (numbers) right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse as the programs use it: no abbreviated flags, and a mistake costs one line.

    Abbreviations are refused (``--spawn-worker`` is not ``--spawn-workers``),
    so that a script keeps working when a flag is added. An error is printed
    as one line, with the closest flag for a misspelt one and a pointer to
    ``--help``, instead of the whole usage first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """``; did you mean --x?`` for the first unknown flag in ``message`` that is close to a real one."""
        known = [option for option in self._option_string_actions if option.startswith("--")]
        for token in re.findall(r"(?<![\w-])(--[\w-]+)", message):
            if token in known:
                continue
            close = difflib.get_close_matches(token, known, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """Accept ``--training_rounds`` as ``--training-rounds``: underscores in flag names become dashes."""
    normalized = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        normalized.append(token)
    return normalized


def size(text: str) -> int:
    """Parse a byte count such as ``1048576``, ``512MiB`` or ``1GiB`` for argparse."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number, multiplier = lowered[: -len(unit)], factor
            break
    else:
        number, multiplier = lowered, 1
    try:
        value = int(float(number) * multiplier)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 536870912 or 512MiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    """The flags with which a coordinator-side tool proves itself to workers and checks them (TLS, token)."""
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="verify wss:// workers against this CA (default: the system's)"
    )
    security.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate for mutual TLS")
    security.add_argument("--tls-key", type=Path, metavar="FILE", help="the client certificate's private key")
    security.add_argument(
        "--auth-token-file", type=Path, metavar="FILE", help="prove to workers that this coordinator knows the token"
    )


def add_listen_flags(parser: argparse.ArgumentParser) -> None:
    """The coordinator's flags for workers that dial in (docs/protocol.md, "Dial-out workers")."""
    group = parser.add_argument_group("workers that dial in (name them as NAME=dial-in in --workers or --evaluator)")
    group.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="accept the dial-in workers here (their run_websocket_server.py --connect); wss:// with --tls-cert"
        " and --tls-key, client certificates whose common name is the worker id with --tls-ca",
    )
    group.add_argument(
        "--worker-tokens",
        type=Path,
        metavar="FILE",
        help="lines 'ID TOKEN-FILE' (paths relative to FILE): the token each dial-in worker must prove",
    )
    group.add_argument(
        "--insecure-listen",
        action="store_true",
        help="let dial-in workers in without a token or a client certificate: local tests only",
    )
    group.add_argument(
        "--max-pending-connections",
        type=int,
        default=64,
        metavar="N",
        help="dial-ins still authenticating; a newcomer beyond N closes the oldest (default: %(default)s)",
    )
    group.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time a dial-in has for the TLS handshake, the websocket upgrade and the token (default: %(default)s)",
    )


def add_connection_limits(limits: argparse._ArgumentGroup) -> None:
    """The size limit and the connect timeout of a coordinator-side tool's worker connections."""
    limits.add_argument(
        "--max-message-size",
        type=size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest reply accepted (default: %(default)s bytes)",
    )
    limits.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to connect and greet each worker; one that refuses (still starting) is tried again"
        " until then; --status asks once (default: %(default)s)",
    )


def config_from_flags(
    kind: type[Config], args: argparse.Namespace, special: Mapping[str, FromFlags | None], **given: Any
) -> Config:
    """A frozen config of dataclass ``kind`` from parsed flags.

    Each field is the flag (argparse dest) of its name, unless ``given``
    holds it or ``special`` says how to read it (a renamed flag, a parsed or
    derived value); ``None`` there marks a field with no flag, which keeps
    its default. Fields are read in their declared order, so the first bad
    flag is the one reported.

    Raises:
        ConfigError: if the config refuses the values.
        TypeError: if a field has no flag and no entry in ``special``, or ``special`` names no field:
            the table and the config drifted apart.
    """
    names = [field.name for field in dataclasses.fields(kind)]
    unknown = sorted(set(special) - set(names))
    if unknown:
        raise TypeError(f"{kind.__name__} has no fields {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name in names:
        if name in given:
            values[name] = given[name]
        elif name in special:
            read = special[name]
            if read is not None:
                values[name] = read(args)
        elif hasattr(args, name):
            values[name] = getattr(args, name)
        else:
            raise TypeError(f"{kind.__name__}.{name} has no flag of its name and no entry among the special cases")
    return kind(**values)


def link_settings(
    args: argparse.Namespace, uri: str, *, request_timeout: float = DEFAULT_REQUEST_TIMEOUT
) -> LinkSettings:
    """The link settings of a short-lived tool (``--status``, analytics) from the flags of
    :func:`add_client_security_flags` and :func:`add_connection_limits`.

    No liveness pings: these tools ask once and go. The TLS context is made
    for a wss:// ``uri`` only, so that a plain worker never needs the TLS files.

    Raises:
        ConfigError: if the TLS files or the token file cannot be read.
    """
    return LinkSettings(
        max_message_size=args.max_message_size,
        connect_timeout=args.connect_timeout,
        request_timeout=request_timeout,
        ping_interval=None,
        tls=client_tls(args.tls_ca, args.tls_cert, args.tls_key) if uri.startswith("wss://") else None,
        auth_token=read_token(args.auth_token_file) if args.auth_token_file is not None else None,
    )


def add_secure_agg_flags(group: argparse._ArgumentGroup, *, summed: str, among: str) -> None:
    """``--secure-agg`` and ``--secagg-threshold`` of a coordinator-side tool: what it sums, and among whom."""
    group.add_argument(
        "--secure-agg",
        action="store_true",
        help=f"secure aggregation (Bonawitz et al. 2017): the coordinator learns only the sum of {summed}",
    )
    group.add_argument(
        "--secagg-threshold",
        type=int,
        metavar="T",
        help=f"workers that must survive to unmask a sum, more than half of {among} (default: two thirds of"
        " them, rounded up)",
    )


def setup_logging(verbose: bool, *, default: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every frame at DEBUG: too much even for --verbose.
    logging.getLogger("websockets").setLevel(logging.INFO if verbose else logging.WARNING)
    # dp-accounting's calibration logs harmless absl warnings while it searches.
    logging.getLogger("absl").setLevel(logging.ERROR)


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; settings from ``--config FILE`` (TOML) become defaults that flags override.

    Keys are flag names without dashes (``tls-cert`` or ``tls_cert``); relative
    paths are resolved against the config file's folder, so a startup kit can
    be moved as a whole.

    Raises:
        ConfigError: if the file cannot be read or names an unknown setting.
    """
    argv = normalize_flags(argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", type=Path)
    known, _ = first.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_config_defaults(parser, known.config))
    return parser.parse_args(argv)


def _config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The settings of a TOML file as parser defaults, each checked as its flag would be.

    TOML values are typed, so they would reach the program without argparse's
    checks: each is converted by its flag's ``type`` and checked against its
    ``choices``; flags without a value take ``true`` or ``false``, repeatable
    ones a list.

    Raises:
        ConfigError: one line naming the file and the key, for any value its flag would refuse.
    """
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return settings_defaults(parser, settings, folder=path.parent, source=f"config file {path}")


def settings_defaults(
    parser: argparse.ArgumentParser, settings: Mapping[str, Any], *, folder: Path, source: str
) -> dict[str, Any]:
    """Parsed TOML ``settings`` as parser defaults, each checked as its flag would be; see :func:`_config_defaults`.

    A job file (:mod:`syncfed.coordinator.job_file`) is read with it too; ``source`` starts each error line.

    Raises:
        ConfigError: one line naming ``source`` and the key, for any value its flag would refuse.
    """
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        actions.setdefault(action.dest, action)
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
    defaults: dict[str, Any] = {}
    for key, value in settings.items():
        found = actions.get(key.replace("-", "_"))
        if found is None:
            raise ConfigError(f"{source}: key {key!r}: not a setting of {parser.prog}")
        try:
            defaults[found.dest] = _config_value(found, value, folder)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{source}: key {key!r}: {exc}") from None
    return defaults


def _config_value(action: argparse.Action, value: Any, folder: Path) -> Any:
    """``value`` as its flag would give it; relative paths are taken from the config file's ``folder``.

    Raises:
        argparse.ArgumentTypeError: if the flag would refuse it.
    """
    if action.nargs == 0:  # store_true and the like: the flag given or not
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, not {_toml(value)}")
        return action.const if value else action.default
    repeated = isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?")
    if not repeated:
        return _config_scalar(action, value, folder)
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise argparse.ArgumentTypeError(f"expected a list of {action.nargs} values, not {_toml(value)}")
    if action.nargs == "+" and not items:
        raise argparse.ArgumentTypeError("expected a list of at least one value, not []")
    return [_config_scalar(action, item, folder) for item in items]


def _config_scalar(action: argparse.Action, value: Any, folder: Path) -> Any:
    """One value through the flag's ``type`` and ``choices``, as argparse checks a command-line string."""
    convert = action.type or str
    if convert in (str, Path) and not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a string, not {_toml(value)}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise argparse.ArgumentTypeError(f"expected a {getattr(convert, '__name__', 'value')}, not {_toml(value)}")
    text = str(value)
    try:
        converted = convert(text)  # type: ignore[operator]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"invalid {getattr(convert, '__name__', repr(convert))} value: {value!r}"
        ) from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        raise argparse.ArgumentTypeError(f"invalid choice: {converted!r} (choose from {choices})")
    if isinstance(converted, Path) and not converted.is_absolute():
        return folder / converted
    return converted


def _toml(value: Any) -> str:
    """A TOML value as the file spells it, for error lines."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)
