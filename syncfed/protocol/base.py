"""What every message shares: the version, the error codes, the limits and the field checks.

The underscore helpers are the package's own: each message module checks its
fields with them, and :mod:`syncfed.protocol` does not export them. Every
check raises :class:`~syncfed.exceptions.LocalProtocolError`, because a
message that fails one was built wrong here; the decode path
(:mod:`syncfed.protocol.envelope`) re-raises what a peer's body fails as
:class:`~syncfed.exceptions.RemoteProtocolError`, as h11 does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import numpy as np

from ..exceptions import LocalProtocolError, describe
from ..tensors import Weights

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "MAX_ID",
    "MAX_NAME",
    "MAX_CLASSES",
    "MAX_SHARD",
    "MAX_PLAN_SIZE",
    "Message",
]

PROTOCOL_VERSION: Final = 1

#: Error codes a worker may answer with, and what they mean.
ERROR_CODES: Final[dict[str, str]] = {
    "malformed": "the message is not a valid msgpack envelope or a field is invalid",
    "too_large": "the message exceeds the receiver's size limit",
    "bad_tensor": "a tensor's dtype, shape or byte count is invalid",
    "unknown_kind": "the message kind is not a request this peer serves",
    "unsupported_version": "the envelope's protocol version is not supported",
    "out_of_order": "the request came before hello, or reuses an id still in flight",
    "unknown_model": "the named model is not registered on the worker",
    "incompatible": "the weights do not fit the model or the worker's data",
    "wrong_role": "the worker's role does not serve this request (e.g. fit on the evaluator)",
    "busy": "too many requests are in flight on this connection",
    "internal": "the worker failed while serving the request; details are in its log",
    "refused": "the answer would describe a group smaller than the worker's minimum group size,"
    " or a secure aggregation step has fewer clients than the round's threshold",
    "policy": "the site's policy refuses the job's terms, or the request has none or strays from them",
}

MAX_ID: Final = 2**63 - 1
MAX_NAME: Final = 256
MAX_CLASSES: Final = 100_000
#: The most examples a worker may say it holds, trained on or answers for (a histogram's total, a validation
#: split, a fit result's or a query answer's count): the coordinator weighs updates and sizes secure rounds
#: by these claims, and it keeps every histogram sum within int64.
MAX_SHARD: Final = 2**32
#: The largest batch size and number of batches a request may ask for.
MAX_PLAN_SIZE: Final = 1_000_000


def _check(condition: bool, reason: str) -> None:
    """Every field check raises through here, as the caller's mistake; decoding re-raises it as the peer's."""
    if not condition:
        raise LocalProtocolError(reason)


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_name(value: Any, what: str) -> None:
    _check(
        isinstance(value, str) and 0 < len(value) <= MAX_NAME,
        f"{what} must be a string of 1 to {MAX_NAME} characters, not {describe(value)}",
    )


def _check_weights(value: Any) -> None:
    _check(
        isinstance(value, Mapping)
        and all(isinstance(name, str) and isinstance(array, np.ndarray) for name, array in value.items()),
        "weights must be a map from tensor names to arrays",
    )


def _check_counts(value: Any, what: str) -> None:
    _check(
        isinstance(value, (list, tuple)) and len(value) <= MAX_CLASSES and all(_is_int(n) and n >= 0 for n in value),
        f"{what} must be a list of at most {MAX_CLASSES} non-negative integers",
    )


class Message:
    """Base class of every message: ``kind`` names it on the wire."""

    kind: ClassVar[str]

    def to_body(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Message:
        """The message a body's map describes, checked as the constructor checks it.

        Raises:
            LocalProtocolError: if the body is invalid; :func:`~syncfed.protocol.decode`
                raises it as a :class:`~syncfed.exceptions.RemoteProtocolError` instead.
        """
        raise NotImplementedError


def _fields(body: Mapping[str, Any], kind: str, names: set[str], optional: frozenset[str] = frozenset()) -> None:
    """Require exactly ``names``, plus any of ``optional`` (fields a newer peer may add with a default)."""
    _check(
        names <= set(body) <= names | optional,
        f"{kind} body has fields {sorted(body)}, expected {sorted(names)}"
        + (f" and optionally {sorted(optional)}" if optional else ""),
    )


def _weights_equal(a: Weights, b: Weights) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _optional_weights_equal(a: Weights | None, b: Weights | None) -> bool:
    return a is b if a is None or b is None else _weights_equal(a, b)
