"""The audit log of a federation service: who did what to it, when, and how it ended.

Every admin action (a read as much as a submit or an abort, and every
refusal) is appended as one JSON line and forced to disk before the answer
goes out, so a crash loses no acknowledged action::

    {"time": 1765082400.5, "who": "ops@hospital-a.org", "role": "viewer", "action": "abort",
     "target": "job-3", "result": "denied"}

``result`` is ``"ok"``, ``"denied"``, ``"error: <the one line>"``, or
``"attempt"``: a submit or an abort is recorded before it is carried out, so
that an action never stands unaudited (one whose attempt cannot be written is
not carried out). Other keys say what matters about the action (the ``job`` a
submit made). Lines are pure ASCII (``\u2028`` and the like escaped), so no
value can split or forge one. The file is created readable by its owner only:
it names people and jobs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .exceptions import ConfigError

__all__ = ["AuditLog", "read_audit"]

#: The fields every line has, in this order.
FIELDS = ("time", "who", "role", "action", "target", "result")


class AuditLog:
    """An append-only JSON-lines file; :meth:`record` may be called from several threads.

    Raises:
        ConfigError: if the file cannot be opened for appending.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            # Created owner-only: the log never exists with wider permissions.
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot open audit log {path}: {exc.strerror}") from None

    def record(self, *, who: str, role: str, action: str, target: str, result: str, **details: Any) -> None:
        """Append one action and wait until it is on disk.

        Raises:
            OSError: if it cannot be written; the caller must not report the action as done.
        """
        fixed = {"time": round(time.time(), 3), "who": who, "role": role, "action": action, "target": target}
        entry = {**fixed, "result": result, **details}
        line = (json.dumps(entry, ensure_ascii=True, separators=(", ", ": ")) + "\n").encode("utf-8")
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every entry of an audit log, oldest first.

    Raises:
        ConfigError: if the file cannot be read or a line is not an entry, naming the line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read audit log {path}: {exc}") from None
    entries = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):  # record() ends every line with "\n"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or any(field not in entry for field in FIELDS):
            raise ConfigError(f"audit log {path}: line {number} is not an audit entry")
        entries.append(entry)
    return entries
