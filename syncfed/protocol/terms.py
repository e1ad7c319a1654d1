"""A job's terms: what a coordinator declares a job to be, so that a site can refuse it before any training.

A coordinator proposes the terms once at the start of a run (:class:`Propose`,
answered :class:`Accepted` or an ``error`` with code ``policy``), then sends
them again in every ``fit``, ``evaluate`` and ``query`` (a ``secagg_mask``
carries them in its task), so that a worker checks each request against the
terms it declares, keeping only a bounded count of the fits it served per
job (:mod:`syncfed.fit_ledger`). After refusals the coordinator proposes
again with ``sites`` counting the sites left, and a synchronous round's fits
declare the sites that round trains. A worker without a site policy accepts
any terms and serves requests without them as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ..exceptions import describe
from .base import MAX_ID, Message, _check, _check_name, _fields, _is_int, _is_number

__all__ = ["DP_MODES", "Terms", "Propose", "Accepted", "terms_from", "terms_field"]

#: How a job adds differential privacy: noise on the sum by the coordinator, or a share of it by each site.
DP_MODES: Final = ("central", "distributed")


@dataclass(frozen=True)
class Terms:
    """What a job is: its id, model, rounds and sites, its privacy, and the data set it uses.

    ``model`` ``None`` and ``rounds`` 0 declare an analytics job, which trains
    nothing. ``sites`` counts the training sites, this one included: that the
    job has, or in a synchronous round's fit, that the round trains.
    ``dp_epsilon`` (and ``dp_delta``) is the privacy budget the coordinator
    promises to stop within; ``None`` with ``dp`` set: it names none.
    """

    job: str
    sites: int
    model: str | None = None
    rounds: int = 0
    secure_agg: bool = False
    dp: str | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dataset_key: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.job, "terms job")
        _check(
            _is_int(self.sites) and 1 <= self.sites <= MAX_ID,
            f"terms sites must be a positive integer, not {describe(self.sites)}",
        )
        if self.model is not None:
            _check_name(self.model, "terms model")
        _check(
            _is_int(self.rounds) and 0 <= self.rounds <= MAX_ID,
            f"terms rounds must be a non-negative integer, not {describe(self.rounds)}",
        )
        _check((self.model is None) == (self.rounds == 0), "terms name a model exactly when they have rounds")
        _check(
            type(self.secure_agg) is bool, f"terms secure_agg must be true or false, not {describe(self.secure_agg)}"
        )
        _check(
            self.dp is None or self.dp in DP_MODES,
            f"terms dp must be one of {', '.join(DP_MODES)}, not {describe(self.dp)}",
        )
        _check(
            self.dp_epsilon is None or (_is_number(self.dp_epsilon) and self.dp_epsilon > 0),
            f"terms dp_epsilon must be a positive finite number, not {describe(self.dp_epsilon)}",
        )
        _check(
            self.dp_delta is None or (_is_number(self.dp_delta) and 0 < self.dp_delta < 1),
            f"terms dp_delta must be a number in (0, 1), not {describe(self.dp_delta)}",
        )
        _check(self.dp is not None or (self.dp_epsilon is None and self.dp_delta is None), "terms dp_epsilon needs dp")
        if self.dataset_key is not None:
            _check_name(self.dataset_key, "terms dataset_key")

    @property
    def analytics(self) -> bool:
        return self.model is None

    def to_body(self) -> dict[str, Any]:
        optional = {
            "model": self.model,
            "rounds": self.rounds or None,
            "secure_agg": self.secure_agg or None,
            "dp": self.dp,
            "dp_epsilon": None if self.dp_epsilon is None else float(self.dp_epsilon),
            "dp_delta": None if self.dp_delta is None else float(self.dp_delta),
            "dataset_key": self.dataset_key,
        }
        # Defaults stay off the wire, like a plan's.
        return {"job": self.job, "sites": self.sites, **{k: v for k, v in optional.items() if v is not None}}

    @classmethod
    def from_body(cls, body: Any) -> Terms:
        _check(isinstance(body, Mapping), "terms must be a map")
        _fields(
            body,
            "terms",
            {"job", "sites"},
            frozenset({"model", "rounds", "secure_agg", "dp", "dp_epsilon", "dp_delta", "dataset_key"}),
        )
        epsilon, delta = body.get("dp_epsilon"), body.get("dp_delta")
        return cls(
            body["job"],
            body["sites"],
            body.get("model"),
            body.get("rounds", 0),
            body.get("secure_agg", False),
            body.get("dp"),
            float(epsilon) if type(epsilon) is int else epsilon,
            float(delta) if type(delta) is int else delta,
            body.get("dataset_key"),
        )

    def describe(self) -> str:
        """One line for logs: the job and what it asks."""
        what = f"{self.rounds} rounds of {self.model}" if self.model is not None else "analytics"
        privacy = (" secure-agg" if self.secure_agg else "") + (
            f" dp {self.dp}" + ("" if self.dp_epsilon is None else f" epsilon {self.dp_epsilon:g}")
            if self.dp is not None
            else ""
        )
        return f"job {self.job}: {what} over {self.sites} sites{privacy}"


def terms_from(body: Mapping[str, Any]) -> Terms | None:
    """A request's optional ``terms`` field."""
    return Terms.from_body(body["terms"]) if body.get("terms") is not None else None


def terms_field(terms: Terms | None) -> dict[str, Any]:
    """The ``terms`` field of a request body; absent without terms, so a request reads as before."""
    return {"terms": terms.to_body()} if terms is not None else {}


@dataclass(frozen=True)
class Propose(Message):
    """The start of a run: the job's terms, which a site with a policy accepts or refuses before any training."""

    kind: ClassVar[str] = "propose"
    terms: Terms

    def __post_init__(self) -> None:
        _check(isinstance(self.terms, Terms), "terms must be Terms")

    def to_body(self) -> dict[str, Any]:
        return terms_field(self.terms)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Propose:
        _fields(body, cls.kind, {"terms"})
        return cls(Terms.from_body(body["terms"]))


@dataclass(frozen=True)
class Accepted(Message):
    """The answer to :class:`Propose`: this site serves the job (a refusal is an ``error`` reply, code ``policy``)."""

    kind: ClassVar[str] = "accepted"

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Accepted:
        _fields(body, cls.kind, set())
        return cls()
