"""A site's policy: which jobs its data may serve, read from a TOML file and checked against a job's terms.

A worker started with ``--policy site-policy.toml`` checks the terms a
coordinator proposes at the start of a run, and every later request against
both its policy and the terms the request declares (see
:mod:`syncfed.protocol.terms`), so that a job it refuses trains nothing here.
A rule left out of the file restricts nothing; a file that lists
coordinators refuses one whose certificate proves no name. Pure: no I/O
beyond reading the file. Usage::

    policy = load_policy(Path("site-policy.toml"))
    policy.check_terms(terms, coordinator="coordinator", data_key="digits")  # RequestFailed("policy", ...)
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, NoReturn

from .exceptions import ConfigError, RequestFailed
from .privacy import noise_for_epsilon, noise_std
from .protocol import QUERIES, Evaluate, Fit, Message, Query, SecAggMask, Terms

__all__ = ["SitePolicy", "check_accepted", "load_policy", "policy_from", "required_noise_std", "with_terms"]

#: The error code of every refusal.
CODE: Final = "policy"
#: Relative slack on a distributed-dp fit's noise: the site computes it as the coordinator does, to the last bit.
NOISE_SLACK: Final = 1e-9


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows; ``None`` leaves a rule out (anything goes), an empty tuple allows nothing."""

    # For every job, training or analytics
    coordinators: tuple[str, ...] | None = None  # the names their TLS certificates prove
    data_keys: tuple[str, ...] | None = None  # a named data set's key; the default one by its key or data set name
    min_other_sites: int = 0  # training sites a job must have besides this one
    # Training
    models: tuple[str, ...] | None = None
    max_rounds: int | None = None
    require_secure_agg: bool = False
    require_dp: bool = False
    max_epsilon: float | None = None  # implies require_dp; a job that names no target epsilon is refused
    max_delta: float | None = None
    # Analytics
    queries: tuple[str, ...] | None = None
    analytics_secure_agg: bool = False

    def check_terms(self, terms: Terms, *, coordinator: str | None, data_key: str) -> None:
        """Refuse a job this site does not serve: the first broken rule, in one line naming it and the values.

        ``coordinator``: the name the peer's verified certificate proves (``None``: none);
        ``data_key``: the data set the job uses here.

        Raises:
            RequestFailed: code ``policy``.
        """
        if self.coordinators is not None:
            if coordinator is None:
                _refuse("coordinators", "the coordinator proved no name (no verified certificate)")
            _one_of("coordinators", "coordinator", coordinator, self.coordinators)
        if self.data_keys is not None:
            _one_of("data_keys", "data set", data_key, self.data_keys)
        self.check_sites(terms.sites, "the job")
        if terms.analytics:
            self._check_analytics(terms)
        else:
            self._check_training(terms)

    def check_sites(self, sites: int, what: str) -> None:
        """Refuse ``what`` (a job, or a secure round) whose ``sites``, this one included, leave too few others.

        Raises:
            RequestFailed: code ``policy``.
        """
        if sites - 1 < self.min_other_sites:
            _refuse(
                "min_other_sites",
                f"{what} has {sites - 1} other sites, the policy needs at least {self.min_other_sites}",
            )

    def _check_analytics(self, terms: Terms) -> None:
        if self.queries == ():
            _refuse("queries", "the policy allows no analytics queries")
        if self.analytics_secure_agg and not terms.secure_agg:
            _refuse("analytics.require_secure_agg", "the job does not use secure aggregation")

    def _check_training(self, terms: Terms) -> None:
        assert terms.model is not None
        if self.models is not None:
            _one_of("models", "model", terms.model, self.models)
        if self.max_rounds is not None and terms.rounds > self.max_rounds:
            _refuse("max_rounds", f"the job asks {terms.rounds} rounds, the policy allows at most {self.max_rounds}")
        if self.require_secure_agg and not terms.secure_agg:
            _refuse("require_secure_agg", "the job does not use secure aggregation")
        if (self.require_dp or self.max_epsilon is not None or self.max_delta is not None) and terms.dp is None:
            _refuse("require_dp", "the job uses no differential privacy")
        if self.max_epsilon is not None:
            if terms.dp_epsilon is None:
                _refuse(
                    "max_epsilon", f"the job names no target epsilon, the policy allows at most {self.max_epsilon:g}"
                )
            if terms.dp_epsilon > self.max_epsilon:
                _refuse("max_epsilon", f"the job's epsilon {terms.dp_epsilon:g} exceeds {self.max_epsilon:g}")
        if self.max_delta is not None:
            if terms.dp_delta is None:
                _refuse("max_delta", f"the job names no delta, the policy allows at most {self.max_delta:g}")
            if terms.dp_delta > self.max_delta:
                _refuse("max_delta", f"the job's delta {terms.dp_delta:g} exceeds {self.max_delta:g}")

    def check_request(
        self, request: Fit | Evaluate | Query, *, coordinator: str | None, data_key: str, secure: bool = False
    ) -> Terms:
        """The terms ``request`` declares, once they pass :meth:`check_terms` and the request keeps to them.

        ``secure``: the request came inside a secure aggregation round (``secagg_mask``).

        Raises:
            RequestFailed: code ``policy``.
        """
        terms = request.terms
        if terms is None:
            _refuse("terms", f"the {request.kind} carries no job terms, and this site has a policy")
        self.check_terms(terms, coordinator=coordinator, data_key=data_key)
        if isinstance(request, Query):
            if terms.analytics:
                if self.queries is not None:
                    _one_of("queries", "query", request.query, self.queries)
                if self.analytics_secure_agg and not secure:
                    _refuse("analytics.require_secure_agg", "the query is not part of a secure aggregation round")
            elif self.require_secure_agg and not secure:  # a training job's own statistics: its rules
                _refuse("require_secure_agg", "the job's statistics query is not part of a secure aggregation round")
            return terms
        if terms.model is None:
            _refuse("terms", f"a {request.kind} under the terms of an analytics job {terms.job}")
        if request.model != terms.model:
            _refuse("terms", f"the {request.kind} names model {request.model!r}, the job {terms.model!r}")
        if request.dataset_key != terms.dataset_key:
            _refuse("terms", f"the {request.kind} uses data set {request.dataset_key!r}, the job {terms.dataset_key!r}")
        if isinstance(request, Fit):
            _check_fit(request, terms, secure)
        return terms


def check_accepted(terms: Terms, accepted: Terms | None, *, secure_clients: int | None = None) -> None:
    """Refuse a request whose terms are not a job this site accepted on this connection, as accepted.

    Only ``sites`` may differ, and only downwards: the coordinator declares the sites a round trains,
    never more than the site accepted. Inside a secure round (``secure_clients``: its number of clients,
    which the masks prove) a request may not declare more sites than that either, since a larger
    count would lower the noise a site must add. So a coordinator can neither skip the proposal
    (which the worker logs) nor change a job's terms after it was accepted.

    Raises:
        RequestFailed: code ``policy``.
    """
    if accepted is None:
        _refuse("terms", f"job {terms.job} was not proposed on this connection")
    if replace(terms, sites=accepted.sites) != accepted:
        _refuse("terms", f"the request's terms of job {terms.job} differ from those the site accepted")
    if terms.sites > accepted.sites:
        _refuse("terms", f"the request declares {terms.sites} sites, the job was accepted for {accepted.sites}")
    if secure_clients is not None and terms.sites > secure_clients:
        _refuse("terms", f"the request declares {terms.sites} sites, its secure round has {secure_clients} clients")


def with_terms(message: Message, terms: Terms | None) -> Message:
    """``message`` declaring the job's ``terms``: a fit, evaluate or query, or the task a ``secagg_mask`` carries.

    The coordinator's half of the rules above; other requests, and those that declare terms already, go as they are.
    """
    if terms is None:
        return message
    if isinstance(message, Fit | Evaluate | Query) and message.terms is None:
        return replace(message, terms=terms)
    if isinstance(message, SecAggMask) and message.task.terms is None:
        return replace(message, task=replace(message.task, terms=terms))
    return message


def _check_fit(fit: Fit, terms: Terms, secure: bool) -> None:
    """What a site verifies of a fit itself: its round, its clipping and noise, and that it is masked."""
    plan = fit.plan
    if plan.round > terms.rounds:
        _refuse("terms", f"fit round {plan.round} exceeds the job's {terms.rounds} rounds")
    if terms.secure_agg and not secure:
        _refuse("terms", "the job declares secure aggregation, but the fit is not part of a secure round")
    if terms.dp is not None and plan.clip is None:
        _refuse("terms", f"the job declares {terms.dp} dp, but the fit's plan has no clip")
    if terms.dp == "distributed" and not plan.noise_std:
        _refuse("terms", "the job declares distributed dp, but the fit's plan adds no noise")
    if terms.dp == "distributed" and terms.dp_epsilon is not None:
        assert plan.clip is not None and plan.noise_std is not None
        required = required_noise_std(terms, plan.clip)
        if plan.noise_std < required * (1 - NOISE_SLACK):
            _refuse(
                "terms",
                f"the fit's noise std {plan.noise_std:.6g} is below the {required:.6g} that the job's epsilon"
                f" {terms.dp_epsilon:g} over {terms.rounds} rounds and {terms.sites} sites needs at clip {plan.clip:g}",
            )


def required_noise_std(terms: Terms, clip: float) -> float:
    """The least noise each site adds to a distributed-dp fit at ``clip`` for the job to keep its declared budget.

    The multiplier the coordinator calibrates (:func:`syncfed.privacy.noise_for_epsilon`) for the terms'
    epsilon and delta over all their rounds, with every site in every round (sampling rate 1: the
    coordinator knows whom it samples, so sampling hides nothing from it), shared by the terms' sites.

    Raises:
        RequestFailed: code ``policy``, when the terms name no delta or the site cannot do the accounting.
    """
    assert terms.dp_epsilon is not None
    if terms.dp_delta is None:
        _refuse("terms", f"the job names epsilon {terms.dp_epsilon:g} but no delta, so its noise cannot be checked")
    try:
        return noise_std(_multiplier(terms.dp_epsilon, terms.rounds, terms.dp_delta), clip, terms.sites)
    except ConfigError as exc:
        _refuse("terms", f"the site cannot check the job's noise: {exc}")
    except Exception as exc:  # the accountant's own errors on budgets it cannot solve: a refusal, not a crash
        _refuse("terms", f"the site cannot check the job's noise: {type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=64)
def _multiplier(epsilon: float, rounds: int, delta: float) -> float:
    """Cached: every fit of a job asks the same, and a calibration takes milliseconds."""
    return noise_for_epsilon(epsilon, rounds, 1.0, delta)


def _refuse(rule: str, why: str) -> NoReturn:
    raise RequestFailed(CODE, f"{rule}: {why}")


def _one_of(rule: str, what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        listed = ", ".join(repr(name) for name in allowed[:8]) if allowed else "none"
        _refuse(rule, f"{what} {value!r} is not one of {listed}")


# The policy file: each key, the table it belongs to, and its check.
_Check = Callable[[Any], Any]


def _names(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("expected a list of non-empty strings")
    return tuple(value)


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _flag(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("expected true or false")
    return value


def _positive(value: Any) -> float:
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise ValueError("expected a positive number")
    return float(value)


def _queries(value: Any) -> tuple[str, ...] | None:
    names = _names(value)
    unknown = [name for name in names or () if name not in QUERIES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not one of {', '.join(QUERIES)}")
    return names


_KEYS: Final[dict[str, dict[str, tuple[str, _Check]]]] = {
    "": {
        "coordinators": ("coordinators", _names),
        "data_keys": ("data_keys", _names),
        "min_other_sites": ("min_other_sites", _count),
    },
    "training": {
        "models": ("models", _names),
        "max_rounds": ("max_rounds", _count),
        "require_secure_agg": ("require_secure_agg", _flag),
        "require_dp": ("require_dp", _flag),
        "max_epsilon": ("max_epsilon", _positive),
        "max_delta": ("max_delta", _positive),
    },
    "analytics": {
        "queries": ("queries", _queries),
        "require_secure_agg": ("analytics_secure_agg", _flag),
    },
}


def load_policy(path: Path) -> SitePolicy:
    """Read and check a site policy file.

    Raises:
        ConfigError: one line naming the file and the key, for an unreadable file,
            an unknown key or a wrong value.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from None
    return policy_from(data, str(path))


def policy_from(data: Mapping[str, Any], source: str) -> SitePolicy:
    """The policy a parsed TOML document describes; ``source`` names it in errors.

    Raises:
        ConfigError: for an unknown key or a wrong value.
    """
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key in _KEYS and key:
            if not isinstance(value, dict):
                raise ConfigError(f"policy file {source}: key {key!r}: expected a table")
            entries = [(f"{key}.{name}", _KEYS[key].get(name), item) for name, item in value.items()]
        else:
            entries = [(key, _KEYS[""].get(key), value)]
        for name, known, item in entries:
            if known is None:
                raise ConfigError(f"policy file {source}: key {name!r}: not a policy setting")
            field, check = known
            try:
                settings[field] = check(item)
            except ValueError as exc:
                raise ConfigError(f"policy file {source}: key {name!r}: {exc}, not {item!r}") from None
    if settings.get("max_delta", 0) >= 1:
        raise ConfigError(f"policy file {source}: key 'training.max_delta': expected a number below 1")
    return SitePolicy(**settings)
