"""Secure aggregation on the wire (Bonawitz et al. 2017; the rules are in :mod:`syncfed.secagg`).

The coordinator carries each step's messages between the workers; maps keyed
by client id travel as lists of [id, value] pairs, since msgpack map keys are
strings here. A request names the round's session so that a worker never
mixes two rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np

from ..exceptions import ConfigError, LocalProtocolError, describe
from ..secagg import (
    MAX_CLIENTS,
    AdvertiseKeys,
    ForwardedShares,
    MaskedInput,
    NeighbourKeys,
    SecAggConfig,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from ..tensors import decode_tensor, encode_tensor
from .base import Message, _check, _fields, _is_int, _is_number
from .queries import Query
from .training_messages import Fit

__all__ = [
    "MAX_SESSION",
    "SecAggStart",
    "SecAggKeys",
    "SecAggShare",
    "SecAggShares",
    "SecAggMask",
    "SecAggMasked",
    "SecAggUnmask",
    "SecAggUnmasked",
]

#: Bytes of a round's session string (see ``SecAggConfig``).
MAX_SESSION: Final = 64
_SECAGG_INTS: Final = ("num_clients", "threshold", "length", "graph_seed", "bits", "max_count")


def _check_session(value: Any) -> None:
    _check(
        isinstance(value, bytes) and 0 < len(value) <= MAX_SESSION,
        f"session must be 1 to {MAX_SESSION} bytes, not {describe(value)}",
    )


def _check_client(value: Any, what: str) -> None:
    _check(_is_int(value) and 0 <= value < MAX_CLIENTS, f"{what} must be a client id below {MAX_CLIENTS}")


def _pairs(by_client: Mapping[int, Any]) -> list[list[Any]]:
    return [[client, value] for client, value in sorted(by_client.items())]


def _by_client(value: Any, what: str) -> dict[int, Any]:
    """A map keyed by client id from its wire form; the secagg message built from it checks the values."""
    _check(
        isinstance(value, list)
        and len(value) <= MAX_CLIENTS
        and all(isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) for pair in value),
        f"{what} must be a list of at most {MAX_CLIENTS} [client id, value] pairs",
    )
    result = {pair[0]: pair[1] for pair in value}
    _check(len(result) == len(value), f"{what} lists a client twice")
    return result


def _secagg_config_body(config: SecAggConfig) -> dict[str, Any]:
    return {
        **{name: getattr(config, name) for name in _SECAGG_INTS},
        "clip": float(config.clip),
        "session": config.session,
        **({"neighbours": config.neighbours} if config.neighbours is not None else {}),
    }


def _secagg_config(body: Any) -> SecAggConfig:
    """A round's settings from a message body: a setting out of range breaks the message, so it is no ConfigError.

    Raised as a local error like every field check; the decode path makes it the peer's.
    """
    _check(isinstance(body, Mapping), "secure aggregation config must be a map")
    _fields(body, "secure aggregation config", {*_SECAGG_INTS, "clip", "session"}, frozenset({"neighbours"}))
    for name in (*_SECAGG_INTS, *(("neighbours",) if "neighbours" in body else ())):
        _check(_is_int(body[name]), f"{name} must be an integer, not {describe(body[name])}")
    _check(_is_number(body["clip"]), f"clip must be a finite number, not {describe(body['clip'])}")
    _check_session(body["session"])
    try:
        return SecAggConfig(**body)
    except ConfigError as exc:
        raise LocalProtocolError(f"invalid secure aggregation config: {exc}") from None


@dataclass(frozen=True)
class SecAggStart(Message):
    """Open a secure aggregation round on this connection as client ``client``; answered with :class:`SecAggKeys`."""

    kind: ClassVar[str] = "secagg_start"
    config: SecAggConfig
    client: int

    def __post_init__(self) -> None:
        _check(isinstance(self.config, SecAggConfig), "config must be a SecAggConfig")
        _check(
            _is_int(self.client) and 0 <= self.client < self.config.num_clients,
            f"client id {describe(self.client)} must be below the {self.config.num_clients} clients",
        )

    def to_body(self) -> dict[str, Any]:
        return {"config": _secagg_config_body(self.config), "client": self.client}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggStart:
        _fields(body, cls.kind, {"config", "client"})
        return cls(_secagg_config(body["config"]), body["client"])


@dataclass(frozen=True)
class SecAggKeys(Message):
    """Step 0's answer: the worker's two public keys."""

    kind: ClassVar[str] = "secagg_keys"
    keys: AdvertiseKeys

    def __post_init__(self) -> None:
        _check(isinstance(self.keys, AdvertiseKeys), "keys must be AdvertiseKeys")

    def to_body(self) -> dict[str, Any]:
        return {"client": self.keys.client, "c_public": self.keys.c_public, "s_public": self.keys.s_public}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggKeys:
        _fields(body, cls.kind, {"client", "c_public", "s_public"})
        return cls(AdvertiseKeys(body["client"], body["c_public"], body["s_public"]))


@dataclass(frozen=True)
class SecAggShare(Message):
    """Step 1: the public keys of the worker's neighbours; answered with :class:`SecAggShares`."""

    kind: ClassVar[str] = "secagg_share"
    session: bytes
    keys: NeighbourKeys

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.keys, NeighbourKeys), "keys must be NeighbourKeys")

    def to_body(self) -> dict[str, Any]:
        return {"session": self.session, "c_public": _pairs(self.keys.c_public), "s_public": _pairs(self.keys.s_public)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggShare:
        _fields(body, cls.kind, {"session", "c_public", "s_public"})
        keys = NeighbourKeys(
            _by_client(body["c_public"], "encryption public keys"), _by_client(body["s_public"], "masking public keys")
        )
        return cls(body["session"], keys)


@dataclass(frozen=True)
class SecAggShares(Message):
    """Step 1's answer: the worker's shares, encrypted for each neighbour (the coordinator cannot read them)."""

    kind: ClassVar[str] = "secagg_shares"
    shares: ShareKeys

    def __post_init__(self) -> None:
        _check(isinstance(self.shares, ShareKeys), "shares must be ShareKeys")

    def to_body(self) -> dict[str, Any]:
        return {"client": self.shares.client, "ciphertexts": _pairs(self.shares.ciphertexts)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggShares:
        _fields(body, cls.kind, {"client", "ciphertexts"})
        return cls(ShareKeys(body["client"], _by_client(body["ciphertexts"], "ciphertexts")))


@dataclass(frozen=True, eq=False)
class SecAggMask(Message):
    """Step 2: the shares addressed to the worker, and the task whose result it masks.

    For a :class:`Fit` the worker trains as asked, then masks its float
    tensors' update and its example count (or 1, when not ``weighted``). For
    a :class:`Query` it masks its answer as sums (see
    :func:`syncfed.analytics.sums`) and a count of 1: answers are summed
    unweighted. Answered with :class:`SecAggMasked`; on the wire the task
    travels under its kind, ``fit`` or ``query``.
    """

    kind: ClassVar[str] = "secagg_mask"
    session: bytes
    shares: ForwardedShares
    task: Fit | Query
    weighted: bool = True

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.shares, ForwardedShares), "shares must be ForwardedShares")
        _check(isinstance(self.task, (Fit, Query)), "task must be a Fit or a Query")
        _check(type(self.weighted) is bool, f"weighted must be true or false, not {describe(self.weighted)}")
        _check(isinstance(self.task, Fit) or not self.weighted, "a query's answers are summed unweighted")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecAggMask):
            return NotImplemented
        return (self.session, self.shares, self.weighted) == (other.session, other.shares, other.weighted) and (
            self.task == other.task
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "ciphertexts": _pairs(self.shares.ciphertexts),
            self.task.kind: self.task.to_body(),
            "weighted": self.weighted,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggMask:
        _fields(body, cls.kind, {"session", "ciphertexts", "weighted"}, frozenset({"fit", "query"}))
        tasks = [kind for kind in ("fit", "query") if kind in body]
        _check(len(tasks) == 1, f"{cls.kind} must carry one task, a fit or a query, not {describe(tasks)}")
        (kind,) = tasks
        _check(isinstance(body[kind], dict), f"{kind} must be a map")
        task = Fit.from_body(body[kind]) if kind == "fit" else Query.from_body(body[kind])
        shares = ForwardedShares(_by_client(body["ciphertexts"], "ciphertexts"))
        return cls(body["session"], shares, task, body["weighted"])


@dataclass(frozen=True, eq=False)
class SecAggMasked(Message):
    """Step 2's answer: the masked ring vector, and the training loss and time (in the clear, like a fit's)."""

    kind: ClassVar[str] = "secagg_masked"
    masked: MaskedInput
    loss: float
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check(isinstance(self.masked, MaskedInput), "masked must be a MaskedInput")
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_number(self.seconds) and self.seconds >= 0, "seconds must be a non-negative number")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecAggMasked):
            return NotImplemented
        mine, theirs = self.masked, other.masked
        return (
            (mine.client, self.loss, self.seconds) == (theirs.client, other.loss, other.seconds)
            and mine.vector.dtype == theirs.vector.dtype
            and np.array_equal(mine.vector, theirs.vector)
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "client": self.masked.client,
            "vector": encode_tensor(self.masked.vector),
            "loss": float(self.loss),
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggMasked:
        _fields(body, cls.kind, {"client", "vector", "loss", "seconds"})
        _check_client(body["client"], "client")
        vector = decode_tensor(body["vector"], name="masked input")
        return cls(MaskedInput(body["client"], vector), body["loss"], body["seconds"])


@dataclass(frozen=True)
class SecAggUnmask(Message):
    """Step 3: who sent a masked input and who dropped after sharing keys; answered with :class:`SecAggUnmasked`."""

    kind: ClassVar[str] = "secagg_unmask"
    session: bytes
    request: UnmaskRequest

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.request, UnmaskRequest), "request must be an UnmaskRequest")

    def to_body(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "survivors": list(self.request.survivors),
            "dropped": list(self.request.dropped),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggUnmask:
        _fields(body, cls.kind, {"session", "survivors", "dropped"})
        return cls(body["session"], UnmaskRequest(body["survivors"], body["dropped"]))


@dataclass(frozen=True)
class SecAggUnmasked(Message):
    """Step 3's answer: one share per neighbour the request named, of its self-mask seed or of its mask key."""

    kind: ClassVar[str] = "secagg_unmasked"
    shares: UnmaskShares

    def __post_init__(self) -> None:
        _check(isinstance(self.shares, UnmaskShares), "shares must be UnmaskShares")

    def to_body(self) -> dict[str, Any]:
        return {
            "client": self.shares.client,
            "seed_shares": _pairs(self.shares.seed_shares),
            "key_shares": _pairs(self.shares.key_shares),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggUnmasked:
        _fields(body, cls.kind, {"client", "seed_shares", "key_shares"})
        seed_shares = _by_client(body["seed_shares"], "self-mask seed shares")
        key_shares = _by_client(body["key_shares"], "mask key shares")
        return cls(UnmaskShares(body["client"], seed_shares, key_shares))
