"""Exceptions raised by syncfed.

Every error derives from :class:`SyncfedError`, so callers can catch one type::

    SyncfedError
    ├── ConfigError          the caller misused the API or a command-line flag
    ├── DatasetError         data files are missing, unreadable or inconsistent
    ├── ModelError           a model name cannot be resolved or weights do not fit it
    ├── ProtocolError        a message on the wire is invalid
    │   ├── LocalProtocolError   this side built an invalid message: the caller's settings or code
    │   └── RemoteProtocolError  a peer sent an invalid message
    │       ├── MessageTooLarge  a message exceeds the configured size limit
    │       └── TensorError      a tensor's dtype, shape or bytes are inconsistent
    ├── AggregationError     updates cannot be combined (names, shapes, counts)
    │   └── SecAggError      too few clients or shares remain to unmask a secure sum
    ├── RemoteError          a peer answered a request with an error reply
    ├── RequestFailed        a worker cannot serve a request: it answers with an error reply
    ├── WorkerUnavailable    a worker cannot be reached or its connection was lost
    │   └── WorkerTimeout    a worker did not answer a request in time
    ├── IncompatibleWorkers  workers disagree with each other or with the model
    ├── AuthenticationFailed a peer failed authentication (token, certificate, allow-list)
    │   └── PermissionDenied an admin's role does not allow the action
    ├── QuorumNotMet         too few workers answered a round, even after retries
    ├── CheckpointError      a checkpoint cannot be read or does not fit the run
    ├── UnknownJob           the job service has no job of this id
    └── JobStateError        a job's state does not allow what was asked

Messages name the offending value and the limit, in lowercase, without a
trailing period, as in "message with 12 bytes exceeds limit of 8 bytes".
"""

from __future__ import annotations

import reprlib

__all__ = [
    "describe",
    "SyncfedError",
    "ConfigError",
    "DatasetError",
    "ModelError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "MessageTooLarge",
    "TensorError",
    "AggregationError",
    "SecAggError",
    "RemoteError",
    "RequestFailed",
    "WorkerUnavailable",
    "WorkerTimeout",
    "IncompatibleWorkers",
    "AuthenticationFailed",
    "QuorumNotMet",
    "CheckpointError",
    "UnknownJob",
    "JobStateError",
    "PermissionDenied",
]


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlevel = 2


def describe(value: object) -> str:
    """A bounded repr of a value a peer sent, for error messages: never longer than about 100 characters."""
    return _REPR.repr(value)


class SyncfedError(Exception):
    """Base class for every error raised by syncfed."""


class ConfigError(SyncfedError):
    """The caller passed an invalid setting."""


class DatasetError(SyncfedError):
    """A data set cannot be loaded."""


class ModelError(SyncfedError):
    """A model cannot be built or does not match the given weights."""


class ProtocolError(SyncfedError):
    """A message breaks the wire protocol; catch it for either side's mistake.

    ``code`` is the error code sent back to the peer (see ``docs/protocol.md``);
    ``request_id`` is the id of the request it concerns, when that was readable.
    """

    code = "malformed"

    def __init__(self, reason: str, *, code: str | None = None, request_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code
        self.request_id = request_id


class LocalProtocolError(ProtocolError):
    """This side built a message the protocol forbids, e.g. a training plan with ``batch_size=0``.

    The caller's code or settings are wrong, not the peer: the command-line
    tools exit as for a configuration error. A message's own checks raise it;
    decoding turns what a peer's message fails into a :class:`RemoteProtocolError`
    (h11 splits its errors the same way).
    """


class RemoteProtocolError(ProtocolError):
    """A peer sent a message that breaks the protocol: unreadable, out of bounds or inconsistent."""


class MessageTooLarge(RemoteProtocolError):
    """A message exceeds the receiver's size limit."""

    code = "too_large"

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message with {size} bytes exceeds limit of {limit} bytes")


class TensorError(RemoteProtocolError):
    """A tensor on the wire is inconsistent (dtype, shape or byte count).

    Also raised when encoding an array whose dtype the wire does not carry.
    """

    code = "bad_tensor"


class AggregationError(SyncfedError):
    """Updates cannot be aggregated."""


class SecAggError(AggregationError):
    """Secure aggregation cannot finish: too few clients or shares are left to remove the masks.

    Nothing was revealed: below the threshold no secret can be rebuilt.
    """


class RemoteError(SyncfedError):
    """A peer answered with an error reply."""

    def __init__(self, peer: str, code: str, reason: str) -> None:
        self.peer = peer
        self.code = code
        self.reason = reason
        super().__init__(f"{peer} answered with error {code}: {reason}")


class RequestFailed(SyncfedError):
    """A worker cannot serve a request; it becomes the error reply (``code``, ``reason``), and the session goes on.

    The worker's side of what :class:`RemoteError` is on the coordinator's: raised by the
    session rules and by every handler, and never leaves the worker as an exception.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WorkerUnavailable(SyncfedError):
    """A worker cannot be reached, closed the connection or timed out."""

    def __init__(self, worker: str, reason: str) -> None:
        self.worker = worker
        self.reason = reason
        super().__init__(f"worker {worker} is unavailable: {reason}")


class WorkerTimeout(WorkerUnavailable):
    """A worker is connected but did not answer a request within its timeout."""


class IncompatibleWorkers(SyncfedError):
    """Workers disagree with each other or with the model."""


class QuorumNotMet(SyncfedError):
    """Fewer workers than the quorum contributed to a round, after every retry."""


class CheckpointError(SyncfedError):
    """A checkpoint cannot be read, or resuming it would mix two different runs."""


class AuthenticationFailed(SyncfedError):
    """A peer could not prove who it is, or is not allowed in."""


class UnknownJob(SyncfedError):
    """No job of the service has this id."""


class JobStateError(SyncfedError):
    """What was asked of a job does not fit its state: aborting a finished job, downloading an unsaved round."""


class PermissionDenied(AuthenticationFailed):
    """An admin proved who they are, but their role does not allow the action."""
