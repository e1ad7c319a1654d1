"""A job file: the TOML a job is submitted as, checked as ``run_websocket_client.py --config`` checks its own.

A job has the keys of the coordinator's flags (``training-rounds``, ``lr``,
``strategy``, ``dp``, ...), read by the coordinator's own parser so that types
and choices are checked the same way, except for three:

- ``workers``: a list of worker ids, ``["alice", "bob", "charlie"]``;
- ``evaluator``: one worker id (none when absent);
- ``name``: a label for the consoles.

Where the job's connections, files and credentials are is the service's to
decide (:data:`SERVICE_KEYS`): a job that sets one is refused by name,
rather than the key being ignored. A job runs in the service's process, so
it may not make the service import code or read files of its choosing:
``strategy``, ``task`` and ``model`` name a built-in one, or an import path
the service's ``allow-imports`` lists; ``initial-weights`` must lie in the
service's state folder (its model registry included).

The coordinator's parser and config builder live in the CLI layer, which
this package does not import: ``serve`` hands them in as :class:`JobFlags`.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..config import DIAL_IN, CoordinatorConfig
from ..exceptions import ConfigError

__all__ = ["IMPORT_KEYS", "SERVICE_KEYS", "JobFile", "JobFlags", "read_job"]

#: Flags (their argparse dests) whose value the service sets for every job: its listener and credentials, the
#: settings of the connections it keeps (made before any job), the job's files under the state folder, and the
#: local-run conveniences that mean nothing in a service.
SERVICE_KEYS: Final = frozenset(
    {
        "max_message_size",
        "chunk_size",
        "request_timeout",
        "ping_interval",
        "ping_timeout",
        "listen",
        "worker_tokens",
        "insecure_listen",
        "max_pending_connections",
        "handshake_timeout",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "auth_token_file",
        "spawn_workers",
        "site",
        "worker_args",
        "dataset",
        "data_dir",
        "centralized",
        "cuda",
        "status",
        "resume",
        "checkpoint_dir",
        "metrics_out",
        "registry",
        "no_registry",
        "save_model",
        "cross_site_out",
        "tensorboard",
        "no_progress",
        "verbose",
    }
)
#: Keys whose value may be an import path (``mypkg.mod:Name``), imported in the service's process.
IMPORT_KEYS: Final = ("strategy", "task", "model")
#: The most characters of a job's name.
MAX_NAME = 100
SOURCE = "job file"


@dataclass(frozen=True)
class JobFlags:
    """The coordinator's flags as a job reads them, handed in by the CLI layer (``serve``)."""

    #: A job's settings (TOML keys) as the coordinator's parsed flags, each checked as its flag checks it; relative
    #: paths from the folder. Raises ConfigError: one line that starts with ``job file: key '...'``.
    parse: Callable[[Mapping[str, Any], Path], argparse.Namespace]
    #: The run the parsed flags, the training workers and the evaluator make. Raises ConfigError.
    build: Callable[[argparse.Namespace, dict[str, str], dict[str, str]], CoordinatorConfig]


@dataclass(frozen=True)
class JobFile:
    """A checked job: its name, its workers, and the coordinator's parsed flags (the service's still unset)."""

    name: str
    workers: tuple[str, ...]
    evaluator: str | None
    args: argparse.Namespace
    flags: JobFlags = field(repr=False, compare=False)

    @property
    def rounds(self) -> int:
        return int(self.args.training_rounds)

    def config(self, **service: Any) -> CoordinatorConfig:
        """The job's run, with the ``service``'s settings (its listener, the job's files) filled in.

        Raises:
            ConfigError: if the settings do not make a valid run (one line, naming the job file).
        """
        unknown = sorted(set(service) - SERVICE_KEYS)
        assert not unknown, f"not service settings: {unknown}"
        args = argparse.Namespace(**{**vars(self.args), **service})
        evaluator = {self.evaluator: DIAL_IN} if self.evaluator is not None else {}
        try:
            return self.flags.build(args, {name: DIAL_IN for name in self.workers}, evaluator)
        except ConfigError as exc:
            raise ConfigError(f"{SOURCE}: {exc}") from None


def read_job(
    text: str, *, known: Collection[str], folder: Path, flags: JobFlags, allow_imports: Collection[str] = ()
) -> JobFile:
    """Check a job's TOML ``text``; ``known`` are the worker ids the service lets in, ``folder`` (the service's
    state) anchors relative paths and holds any ``initial-weights``, ``allow_imports`` are the import paths a job
    may name.

    Raises:
        ConfigError: invalid TOML, an unknown key, a key the service sets, a wrong type, an unknown worker, an
            import path not allowed, weights outside ``folder``; one line.
    """
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{SOURCE}: invalid TOML: {exc}") from None
    own = dict(settings)
    for key in settings:
        if key.replace("-", "_") in SERVICE_KEYS:
            raise ConfigError(f"{SOURCE}: key {key!r} is set by the service, not by a job")
    name = own.pop("name", "job")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise ConfigError(f"{SOURCE}: key 'name': expected a string of 1 to {MAX_NAME} characters, not {name!r}")
    if not name.isprintable():  # it goes into logs, reports and other admins' terminals
        raise ConfigError(f"{SOURCE}: key 'name': {name[:MAX_NAME]!r} has a character that is not printable")
    workers = _workers(own.pop("workers", None), known)
    evaluator = own.pop("evaluator", None)
    if evaluator is not None:
        if not isinstance(evaluator, str):
            raise ConfigError(f"{SOURCE}: key 'evaluator': expected a worker id, not {evaluator!r}")
        _check_known(evaluator, known)
        if evaluator in workers:
            raise ConfigError(f"{SOURCE}: worker {evaluator} cannot both train and evaluate")
    args = flags.parse(own, folder)
    for key in IMPORT_KEYS:  # read from the parsed flags: a key may be an alias (aggregation for strategy)
        _check_import(key, getattr(args, key), allow_imports)
    _check_weights(args.initial_weights, folder)
    return JobFile(name.strip(), workers, evaluator, args, flags)


def _check_import(key: str, value: object, allowed: Collection[str]) -> None:
    """A built-in name passes (its flag checks it); an import path must be one the service allows."""
    if isinstance(value, str) and ":" in value and value not in allowed:
        shown = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(
            f"{SOURCE}: key {key!r}: import path {value[:100]!r} is not one the service allows (allow-imports: {shown})"
        )


def _check_weights(path: Path | None, folder: Path) -> None:
    """Weights are read in the service's process: only from its state folder, where its registry keeps models."""
    if path is not None and not path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"{SOURCE}: key 'initial-weights': {path} is not in the service's state folder {folder}")


def _workers(value: object, known: Collection[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f"{SOURCE}: key 'workers': expected a list of worker ids such as ['alice', 'bob'], not {value!r}"
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"{SOURCE}: key 'workers': {value!r} names a worker twice")
    for name in value:
        _check_known(name, known)
    return tuple(value)


def _check_known(name: str, known: Collection[str]) -> None:
    if name not in known:
        shown = repr(name[:64])
        raise ConfigError(f"{SOURCE}: worker {shown} is not one of the service's ({', '.join(sorted(known))})")
