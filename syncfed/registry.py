"""The model registry: recorded global model versions, their lineage and their scores.

A registry is a directory::

    registry.sqlite3            one row per version: run, round, model, participants,
                                strategy, settings, metrics, content hash
    weights/<hash>.safetensors  the weights, named by their content hash

Weights are content-addressed, as git stores objects: the file name is the
SHA-256 of the tensors' names, dtypes, shapes and bytes (:func:`content_hash`),
so reading a version back checks every byte, and two versions with equal
weights share one file. A version's id is the SHA-256 of its run, round,
content hash, model name and settings: every field that decides what code
runs on export (the model to build, the input shape to trace), so an edited
row no longer matches its id and is refused on load and export. A digest is
not a signature: whoever can write the database can also recompute it, which
is why ONNX export imports a model path only when the caller names it too.
The database is SQLite in WAL mode, so the ``models``
command can read while a coordinator writes; one connection per call keeps
the object usable from any thread. It is made for one writer at a time (busy
writers wait up to ``timeout`` seconds), on a local disk (WAL needs shared
memory, which network file systems do not give).

Re-recording a ``(run_id, round)`` -- a resumed run repeating the round that
was in progress at a crash -- *replaces* the entry, since the run's later
rounds build on the new weights; the entry's metrics survive only when its
weights are unchanged (then its id and creation time stay too).

Usage::

    registry = ModelRegistry(Path("runs/registry"))
    version = registry.record(run_id="demo", round=3, model="digits-cnn", weights=weights,
                              participants=["alice", "bob"], strategy={"name": "fedavg"},
                              settings={"input_shape": [1, 8, 8]})
    registry.add_metrics("demo", 3, {"accuracy": 0.97, "loss": 0.11})
    best = registry.best("accuracy")
    registry.export(best, Path("model.onnx"))  # the format comes from the extension
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from .checkpoint import save_weights
from .exceptions import CheckpointError, ConfigError, ModelError, describe
from .tensors import DTYPES, Weights, encode_tensor

__all__ = [
    "DATABASE_FILE",
    "Database",
    "EXPORT_FORMATS",
    "SCHEMA_VERSION",
    "WEIGHTS_FOLDER",
    "ModelVersion",
    "ModelRegistry",
    "content_hash",
    "export_format",
]

DATABASE_FILE: Final = "registry.sqlite3"
WEIGHTS_FOLDER: Final = "weights"
SCHEMA_VERSION: Final = 2  # 2: the version id covers the model name and the settings
EXPORT_FORMATS: Final = ("safetensors", "onnx")
#: The file extensions that name an export format; a file named otherwise is written as the caller says.
FORMAT_OF_SUFFIX: Final = {".safetensors": "safetensors", ".onnx": "onnx"}
#: Extensions of torch's pickled files, which syncfed never writes: torch.load would fail on what it got.
PICKLE_SUFFIXES: Final = (".pt", ".pth")

#: Upper bound on a run id's length: it is shown in tables and error lines.
MAX_RUN_ID = 200
#: Seconds a call waits for another connection's write lock before giving up.
DEFAULT_TIMEOUT = 30.0

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HASH_DOMAIN = b"syncfed-weights/1\n"  # a new scheme gets a new tag, never an equal digest
_ID_DOMAIN = "syncfed-version/2"

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE versions (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    model TEXT NOT NULL,
    created TEXT NOT NULL,
    participants TEXT NOT NULL,
    strategy TEXT NOT NULL,
    settings TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (run_id, round)
);
CREATE INDEX versions_by_hash ON versions (hash);
CREATE TABLE metrics (
    version_id TEXT NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (version_id, name)
);
"""
_COLUMNS = "id, run_id, round, model, created, participants, strategy, settings, hash"


def export_format(path: Path, format: str | None = None) -> str:
    """The format to write ``path`` in: the one its extension names, else ``format``, else safetensors.

    A file's name is what its reader goes by, so a ``format`` that contradicts
    the extension is refused rather than silently written under the wrong name.

    Raises:
        ConfigError: for an unknown format, a format the extension contradicts, or a ``.pt`` name.
    """
    if format is not None and format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ConfigError(
            f"{path.name} names a torch pickle, which syncfed does not write: name it .safetensors"
            " (safetensors.torch.load_file reads it for load_state_dict) or .onnx"
        )
    named = FORMAT_OF_SUFFIX.get(suffix)
    if named is None:
        return format or "safetensors"
    if format is not None and format != named:
        raise ConfigError(f"export format {format} does not match {path.name}, which names {named}")
    return named


def content_hash(weights: Mapping[str, np.ndarray]) -> str:
    """The SHA-256 of ``weights``: each tensor's name, dtype, shape and little-endian bytes, in order.

    The order is part of the content (it is the model's state-dict order), and
    the bytes are those the wire carries (:func:`syncfed.tensors.encode_tensor`).

    Raises:
        ConfigError: if ``weights`` is empty or holds something that is not an array of a wire dtype.
    """
    if not weights:
        raise ConfigError("weights hold no tensors")
    digest = hashlib.sha256(_HASH_DOMAIN)
    for name, array in weights.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor name {describe(name)} must be a non-empty string")
        if not isinstance(array, np.ndarray):
            raise ConfigError(f"tensor {name} is a {type(array).__name__}, not a numpy array")
        if array.dtype.name not in DTYPES:
            raise ConfigError(f"tensor {name} has dtype {array.dtype.name}, not one of {', '.join(DTYPES)}")
        tensor = encode_tensor(array)
        # Length-prefixed header, then exactly the bytes its dtype and shape call for: no two inputs collide.
        header = json.dumps([name, tensor["dtype"], tensor["shape"]]).encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(tensor["data"])
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One recorded global model: where it came from, how it scored, where its weights are."""

    id: str  # SHA-256 of (run_id, round, hash, model, settings): a resumed run that recomputes a round gets the same id
    run_id: str
    round: int
    model: str  # registry name or import path, for syncfed.models.resolve_model
    created: str  # UTC, ISO 8601
    participants: tuple[str, ...]
    strategy: dict[str, Any]
    settings: dict[str, Any]
    metrics: dict[str, float]  # NaN for a recorded NaN (a diverged run)
    hash: str  # content_hash of the weights
    path: Path  # the weights file

    def __post_init__(self) -> None:
        if not _HEX64.fullmatch(self.id):
            raise ConfigError(f"version id {describe(self.id)} is not 64 lowercase hex digits")
        if not _HEX64.fullmatch(self.hash):
            raise ConfigError(f"content hash {describe(self.hash)} is not 64 lowercase hex digits")
        _check_run_id(self.run_id)
        _check_round(self.round)
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model {describe(self.model)} must be a non-empty string")
        if not all(isinstance(name, str) for name in self.participants):
            raise ConfigError(f"participants {describe(self.participants)} must be strings")


class Database:
    """A SQLite file: its schema, WAL mode, one connection per call and explicit transactions.

    The registry's by default; the job service's job store (:mod:`syncfed.coordinator.job_store`) passes its own
    ``schema``, ``version`` and the ``what`` its errors name.

    Raises:
        CheckpointError: if the database cannot be opened or has another schema version.
    """

    def __init__(
        self,
        path: Path,
        timeout: float,
        *,
        schema: str = _SCHEMA,
        version: int = SCHEMA_VERSION,
        what: str = "model registry",
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.schema, self.version, self.what = schema, version, what
        self._initialize()

    def _initialize(self) -> None:
        """Switch to WAL and create the schema on first use; refuse another schema version."""
        try:
            with self.connection() as connection:
                connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open {self.what} {self.path}: {exc}") from None
        with self.transaction() as connection:
            exists = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                # One statement at a time: executescript() would commit the open transaction first.
                for statement in self.schema.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (self.version,))
                return
            row = connection.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row is not None else None
        if version != self.version:
            raise CheckpointError(
                f"{self.what} {self.path} has schema version {version}, this syncfed reads {self.version}"
            )

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode: transactions are explicit (:meth:`transaction`)."""
        connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; a writer takes the lock up front (``BEGIN IMMEDIATE``) so it never deadlocks a reader."""
        try:
            with self.connection() as connection:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield connection
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CheckpointError(f"{self.what} {self.path} failed: {exc}") from None


class ModelRegistry:
    """Records global model versions in ``directory`` and finds, loads and exports them.

    Raises:
        ConfigError: if ``create`` is false and ``directory`` holds no registry.
        CheckpointError: if the database cannot be opened or has another schema version.
    """

    def __init__(self, directory: Path, *, create: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.directory = directory.resolve()
        self.database = self.directory / DATABASE_FILE
        self.timeout = timeout
        if not self.database.is_file():
            if not create:
                raise ConfigError(f"no model registry in {directory}: {DATABASE_FILE} is missing")
            try:
                (self.directory / WEIGHTS_FOLDER).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"cannot create model registry in {directory}: {exc}") from None
        self._db = Database(self.database, timeout)

    # Writing

    def record(
        self,
        *,
        run_id: str,
        round: int,
        model: str,
        weights: Mapping[str, np.ndarray],
        participants: Sequence[str],
        strategy: Mapping[str, Any],
        settings: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> ModelVersion:
        """Store ``weights`` as round ``round`` of run ``run_id`` and return the entry.

        Replaces an earlier entry for the same run and round (see the module
        docstring). Put the model's ``input_shape`` (without the batch
        dimension) in ``settings`` to allow ONNX export without naming it.

        Raises:
            ConfigError: if a value is invalid or not JSON.
            CheckpointError: if the weights or the database cannot be written.
        """
        _check_run_id(run_id)
        _check_round(round)
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model {describe(model)} must be a non-empty string")
        if isinstance(participants, str) or not all(isinstance(name, str) for name in participants):
            raise ConfigError(f"participants {describe(participants)} must be a sequence of strings")
        for what, value in (("strategy", strategy), ("settings", settings)):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{what} must be a mapping, not {type(value).__name__}")
        values = _check_metrics(metrics or {})
        texts = [_json(list(participants), "participants"), _json(strategy, "strategy"), _json(settings, "settings")]
        digest = content_hash(weights)
        version_id = _version_id(run_id, round, digest, model, json.loads(texts[2]))
        self._store(digest, weights)
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
        with self._db.transaction() as connection:
            old = connection.execute(
                "SELECT id, hash, created FROM versions WHERE run_id = ? AND round = ?", (run_id, round)
            ).fetchone()
            kept: list[tuple[str, float | None]] = []
            if old is not None:
                if old[1] == digest:  # the same weights: the entry keeps its creation time and metrics
                    created = old[2]
                    query = "SELECT name, value FROM metrics WHERE version_id = ?"
                    kept = connection.execute(query, (old[0],)).fetchall()
                connection.execute("DELETE FROM versions WHERE id = ?", (old[0],))
            connection.execute(
                f"INSERT INTO versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version_id, run_id, round, model, created, *texts, digest),
            )
            connection.executemany(
                "INSERT INTO metrics (version_id, name, value) VALUES (?, ?, ?)",
                [(version_id, name, value) for name, value in kept],
            )
            _put_metrics(connection, version_id, values)
        if old is not None and old[1] != digest:
            self._drop_unreferenced(old[1])
        return self.get(version_id)

    def add_metrics(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None:
        """Merge ``metrics`` into the entry of ``run_id`` and ``round``: evaluation comes after aggregation.

        Raises:
            ConfigError: if there is no such entry or a metric is invalid.
        """
        _check_run_id(run_id)
        _check_round(round)
        values = _check_metrics(metrics)
        with self._db.transaction() as connection:
            row = connection.execute("SELECT id FROM versions WHERE run_id = ? AND round = ?", (run_id, round))
            found = row.fetchone()
            if found is None:
                raise ConfigError(f"no version of run {run_id!r} round {round} in registry {self.directory}")
            _put_metrics(connection, found[0], values)

    # Reading

    def versions(self, run_id: str | None = None) -> list[ModelVersion]:
        """Every version, or those of ``run_id``, oldest first."""
        if run_id is not None:
            _check_run_id(run_id)
        where, parameters = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        return self._select(f"{where} ORDER BY created, run_id, round", parameters)

    def get(self, reference: str) -> ModelVersion:
        """The version named by a full id, a unique prefix of one, or ``"run_id:round"``.

        Raises:
            ConfigError: if no version or several match.
        """
        if not isinstance(reference, str) or not reference:
            raise ConfigError(f"version {describe(reference)} must be an id, an id prefix or run_id:round")
        run_id, colon, round_text = reference.rpartition(":")
        if colon:
            if not round_text.isdigit() or not run_id:
                raise ConfigError(f"version {reference!r} must be an id, an id prefix or run_id:round")
            found = self._select("WHERE run_id = ? AND round = ?", (run_id, int(round_text)))
            if not found:
                raise ConfigError(f"no version of run {run_id!r} round {round_text} in registry {self.directory}")
            return found[0]
        prefix = reference.lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
            raise ConfigError(f"version {reference!r} must be an id, an id prefix or run_id:round")
        found = self._select("WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6", (len(prefix), prefix))
        if not found:
            raise ConfigError(f"no version with id {reference!r} in registry {self.directory}")
        if len(found) > 1:
            shown = ", ".join(version.id[:12] for version in found[:5])
            more = "" if len(found) <= 5 else ", ..."
            raise ConfigError(f"version id {reference!r} is ambiguous: it starts {shown}{more}; give more digits")
        return found[0]

    def best(self, metric: str, *, run_id: str | None = None, lowest: bool = False) -> ModelVersion:
        """The version with the highest ``metric`` (the lowest with ``lowest``), among those of ``run_id`` if given.

        Ties go to the earliest recorded version: with equal scores, the one
        that needed fewer rounds. NaN scores never win.

        Raises:
            ConfigError: if no version has a number for ``metric``.
        """
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"metric {describe(metric)} must be a non-empty string")
        where = "WHERE metrics.name = ? AND metrics.value IS NOT NULL"
        parameters: tuple[Any, ...] = (metric,)
        if run_id is not None:
            _check_run_id(run_id)
            where, parameters = where + " AND versions.run_id = ?", (metric, run_id)
        order = "ASC" if lowest else "DESC"
        with self._db.connection() as connection:
            row = connection.execute(
                f"SELECT versions.id FROM versions JOIN metrics ON metrics.version_id = versions.id {where}"
                f" ORDER BY metrics.value {order}, versions.created, versions.run_id, versions.round LIMIT 1",
                parameters,
            ).fetchone()
        if row is None:
            scope = f" of run {run_id!r}" if run_id is not None else ""
            raise ConfigError(f"no version{scope} in registry {self.directory} has a value for metric {metric!r}")
        return self.get(row[0])

    def load_weights(self, version: ModelVersion | str) -> Weights:
        """The weights of ``version`` (an entry or a reference for :meth:`get`), checked against its hash.

        Raises:
            CheckpointError: if the entry does not match its id, or the file is missing, unreadable
                or not the recorded content.
        """
        entry = version if isinstance(version, ModelVersion) else self.get(version)
        _check_id(entry)
        weights = _read_weights(entry.path)
        actual = content_hash(weights)
        if actual != entry.hash:
            raise CheckpointError(
                f"weights of version {entry.id[:12]} in {entry.path} have hash {actual[:12]},"
                f" the registry recorded {entry.hash[:12]}: the file was changed"
            )
        return weights

    def export(
        self,
        version: ModelVersion | str,
        path: Path,
        format: str | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        models: Sequence[str] = (),
    ) -> Path:
        """Write the weights of ``version`` to ``path`` as safetensors or as an ONNX model, atomically.

        The format is the one ``path``'s extension names (:func:`export_format`): ``.onnx`` or
        ``.safetensors``; ``format`` is needed only for other names, and must agree with the extension.

        ONNX export builds the model with ``resolve_model``, loads the checked
        weights and traces it with a dummy input of ``input_shape`` (default:
        the entry's ``settings["input_shape"]``), batch dimension dynamic. It
        needs the ``onnx`` and ``onnxscript`` packages, which torch's exporter
        uses; the file holds its weights inline, so models must stay under
        ONNX's 2 GB limit. A model named by import path is imported only if
        ``models`` names it too: the database alone never decides what code runs.

        Raises:
            ConfigError: for an unknown format or one the extension contradicts, a missing input
                shape, missing onnx packages, or an import path that ``models`` does not name.
            CheckpointError: if the weights do not check out or ``path`` cannot be written.
            ModelError: if the model cannot be built, does not fit the weights or cannot be exported.
        """
        format = export_format(path, format)
        entry = version if isinstance(version, ModelVersion) else self.get(version)
        _check_id(entry)
        if format == "onnx":
            if ":" in entry.model and entry.model not in models:
                raise ConfigError(
                    f"version {entry.id[:12]} names model {entry.model!r}, an import path: pass --model"
                    f" {entry.model} to import it"
                )
            shape = _input_shape(entry, input_shape)
            _require_onnx()
        weights = self.load_weights(entry)
        try:
            if format == "onnx":
                _export_onnx(entry.model, weights, shape, path)
            else:
                description = {"id": entry.id, "run_id": entry.run_id, "round": entry.round, "model": entry.model}
                save_weights(path, weights, {"format": "pt", "syncfed": json.dumps(description)})
        except OSError as exc:
            raise CheckpointError(f"cannot write {path}: {exc}") from None
        return path

    def delete(self, versions: Sequence[ModelVersion]) -> int:
        """Remove ``versions`` and each weights file no remaining version uses; the bytes freed."""
        with self._db.transaction() as connection:
            connection.executemany("DELETE FROM versions WHERE id = ?", [(version.id,) for version in versions])
        return sum(self._drop_unreferenced(digest) for digest in sorted({version.hash for version in versions}))

    # Storage

    def _store(self, digest: str, weights: Mapping[str, np.ndarray]) -> None:
        """Write the weights file unless an intact one is there already."""
        path = self._weights_path(digest)
        if path.is_file():
            with contextlib.suppress(CheckpointError):
                if content_hash(_read_weights(path)) == digest:
                    return
        try:
            save_weights(path, dict(weights), {"format": "pt", "syncfed": json.dumps({"order": list(weights)})})
        except OSError as exc:
            raise CheckpointError(f"cannot write weights to {path}: {exc}") from None

    def _drop_unreferenced(self, digest: str) -> int:
        """Delete the weights file of ``digest`` if no version uses it; the bytes freed."""
        with self._db.connection() as connection:
            used = connection.execute("SELECT 1 FROM versions WHERE hash = ? LIMIT 1", (digest,)).fetchone()
        path = self._weights_path(digest)
        if used is not None or not path.is_file():
            return 0
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        return size

    def _weights_path(self, digest: str) -> Path:
        return self.directory / WEIGHTS_FOLDER / f"{digest}.safetensors"

    def _select(self, clause: str, parameters: tuple[Any, ...]) -> list[ModelVersion]:
        with self._db.transaction(write=False) as connection:
            rows = connection.execute(f"SELECT {_COLUMNS} FROM versions {clause}", parameters).fetchall()
            metrics: dict[str, dict[str, float]] = {row[0]: {} for row in rows}
            for version_id in metrics:
                for name, value in connection.execute(
                    "SELECT name, value FROM metrics WHERE version_id = ? ORDER BY name", (version_id,)
                ):
                    metrics[version_id][name] = math.nan if value is None else float(value)
        try:
            return [
                ModelVersion(
                    id=row[0],
                    run_id=row[1],
                    round=row[2],
                    model=row[3],
                    created=row[4],
                    participants=tuple(json.loads(row[5])),
                    strategy=json.loads(row[6]),
                    settings=json.loads(row[7]),
                    metrics=metrics[row[0]],
                    hash=row[8],
                    path=self._weights_path(row[8]),
                )
                for row in rows
            ]
        except (ValueError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"registry {self.database} holds an invalid entry: {exc}") from None


def _version_id(run_id: str, round: int, digest: str, model: str, settings: Mapping[str, Any]) -> str:
    """The id of a version: a digest of every field that decides what its weights are and what export runs."""
    fields = [_ID_DOMAIN, run_id, round, digest, model, settings]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _check_id(entry: ModelVersion) -> None:
    """Refuse an entry whose row was edited after it was recorded (its fields no longer give its id)."""
    if _version_id(entry.run_id, entry.round, entry.hash, entry.model, entry.settings) != entry.id:
        raise CheckpointError(
            f"version {entry.id[:12]} does not match its id: its run, round, weights hash, model or settings"
            " were changed in the registry database"
        )


def _check_run_id(run_id: object) -> None:
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID or not run_id.isprintable():
        raise ConfigError(f"run id {describe(run_id)} must be 1 to {MAX_RUN_ID} printable characters")


def _check_round(round: object) -> None:
    if type(round) is not int or round < 0:
        raise ConfigError(f"round {describe(round)} must be an integer of at least 0")


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    values = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"metric name {describe(name)} must be a non-empty string")
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
            raise ConfigError(f"metric {name} is {describe(value)}, not a number")
        values[name] = float(value)
    return values


def _put_metrics(connection: sqlite3.Connection, version_id: str, metrics: Mapping[str, float]) -> None:
    # sqlite stores NaN as NULL, which reads back as NaN and never wins best().
    connection.executemany(
        "INSERT OR REPLACE INTO metrics (version_id, name, value) VALUES (?, ?, ?)",
        [(version_id, name, value) for name, value in metrics.items()],
    )


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} cannot be stored as JSON: {exc}") from None


def _read_weights(path: Path) -> Weights:
    """The tensors of a weights file, in the order it records."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            order = json.loads((handle.metadata() or {})["syncfed"])["order"]
            if sorted(order) != sorted(handle.keys()):
                raise CheckpointError(f"weights file {path} lists tensors it does not hold")
            return {name: handle.get_tensor(name) for name in order}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, JSON and key errors all mean the same thing here
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None


def _input_shape(entry: ModelVersion, given: Sequence[int] | None) -> tuple[int, ...]:
    shape = given if given is not None else entry.settings.get("input_shape")
    if shape is None:
        raise ConfigError(f"version {entry.id[:12]} records no input_shape in its settings; give one, such as 1,8,8")
    if (
        isinstance(shape, str | bytes)
        or not isinstance(shape, Sequence)
        or not shape
        or not all(type(size) is int and size > 0 for size in shape)
    ):
        raise ConfigError(f"input shape {describe(shape)} must be one or more positive sizes, without the batch")
    return tuple(shape)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("onnx export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None


def _export_onnx(model_name: str, weights: Weights, input_shape: tuple[int, ...], path: Path) -> None:
    """Trace the model with a dynamic batch dimension and write one self-contained ONNX file."""
    # Imported here: torch takes a second or two to load, and only this command needs it.
    import torch

    from .models import resolve_model, set_weights

    model = resolve_model(model_name)()
    set_weights(model, weights)
    model.eval()
    # A batch of 2: torch.export specializes sizes 0 and 1, which would pin the batch dimension.
    dummy = torch.zeros((2, *input_shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                (dummy,),
                str(partial),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types for a model it cannot trace
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write {path}: {exc}") from None
        raise ModelError(f"cannot export model {model_name!r} to onnx: {exc}") from None
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


#: The logger torch's exporter names each torchvision operator it skips on: a note for torchvision's users.
_REGISTRATION_LOGGER: Final = "torch.onnx._internal.exporter._registration"


def _not_torchvision(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide what torch's exporter says about itself during one export: that it skips torchvision's operators
    (which no syncfed model uses) and its own internal deprecations. The model's own warnings still show."""
    logger = logging.getLogger(_REGISTRATION_LOGGER)
    logger.addFilter(_not_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|copyreg)(\.|$)")
            yield
    finally:
        logger.removeFilter(_not_torchvision)
