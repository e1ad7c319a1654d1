"""The analytics round: greet the workers, ask them one query, and gather their answers or their secure sum.

A workflow of its own beside the training rounds, as NVFlare's statistics
controller is: it takes the workers and the query's settings and returns
what came back, with each failed worker's error. Combining the answers,
adding noise and printing them stay with the caller
(:mod:`syncfed.analytics`, ``python -m syncfed analytics``).

Usage::

    round_ = QueryRound(endpoints, QuerySettings("label-histogram"), link=make_link)
    answers = await round_.run()
    answers.results, answers.failures

Kept at the top of the package until ``syncfed/coordinator/`` exists; it does
I/O and belongs there.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..analytics import from_sums, secure_clip, sums_length
from ..compatibility import agreed_plan
from ..exceptions import ConfigError, IncompatibleWorkers, QuorumNotMet, RemoteError, SecAggError, SyncfedError
from ..net.link import WorkerLink
from ..net.secure_round import SESSION_SIZE, SecureRound, secagg_threshold
from ..protocol import DataPlan, Hello, Info, Query, QueryResult, Terms
from ..secagg import SecAggConfig
from .proposal import agree, new_job_id

__all__ = [
    "DEFAULT_QUERY_TIMEOUT",
    "SECURE_SUM",
    "QuerySettings",
    "QueryAnswers",
    "QueryRound",
    "ask_each",
    "build_query",
    "query_width",
    "sum_securely",
]

#: Seconds a worker has to answer a query (MNIST's 60,000 images take about a second).
DEFAULT_QUERY_TIMEOUT: Final = 60.0

#: The key of the combined answer among the results of a secure round.
SECURE_SUM: Final = "secure sum"


@dataclass(frozen=True)
class QuerySettings:
    """What to ask every worker, and how.

    ``features`` are indices into the flattened input; ``None`` asks for all
    of them, over a table its numeric columns (label histograms take none). ``clip_range`` makes the workers clip
    every value of a ``feature-stats`` query, as differential privacy and
    secure aggregation need bounded sums.
    """

    query: str  # label-histogram, feature-stats or quantiles
    features: tuple[int, ...] | None = ()
    bins: int | None = None  # quantiles: equal bins over value_range
    value_range: tuple[float, float] | None = None
    clip_range: tuple[float, float] | None = None
    # Secure aggregation
    secure_agg: bool = False  # learn only the sum of the answers (Bonawitz et al. 2017)
    secagg_threshold: int | None = None  # None: two thirds of the workers that answered the greeting
    # The job's terms, which a site's policy checks (syncfed.policy)
    job: str | None = None  # None: a fresh id
    dp_epsilon: float | None = None  # the epsilon of the noise the caller adds to the answer (central DP)
    # Timeouts
    request_timeout: float = DEFAULT_QUERY_TIMEOUT  # the secure round's steps; plain queries use the link's own


@dataclass
class QueryAnswers:
    """What asking the workers gave: the query sent, the answers, each failed worker's error.

    With secure aggregation ``results`` holds the one combined answer under
    :data:`SECURE_SUM` and ``secure`` describes the round (the JSON's ``secure_agg``).
    """

    query: Query | None = None
    results: dict[str, QueryResult] = field(default_factory=dict)
    failures: dict[str, SyncfedError] = field(default_factory=dict)
    secure: dict[str, Any] | None = None
    #: Why there is no answer at all (workers that disagree, a secure round that could not
    #: finish), reported after the workers' own failures.
    error: SyncfedError | None = None

    @property
    def refusals(self) -> dict[str, str]:
        """The failures that are a site's policy refusing the job or its query, with the reasons."""
        return {
            name: error.reason
            for name, error in self.failures.items()
            if isinstance(error, RemoteError) and error.code == "policy"
        }


def build_query(settings: QuerySettings, infos: Mapping[str, Info]) -> Query:
    """The query for workers that hold ``infos``; the settings are checked against their input size.

    Over a user's own data the query carries the plan the workers' schemas
    agree on (without standardisation): features index its encoded input, and
    "all of them" (``features`` ``None``) are a table's numeric columns.

    Raises:
        IncompatibleWorkers: if the workers' inputs differ in size, or their own data does not agree.
        ConfigError: if a feature lies beyond the workers' inputs.
    """
    plan = agreed_plan(infos)
    if plan is None:
        sizes = {name: math.prod(info.input_shape) for name, info in infos.items()}
        if len(set(sizes.values())) > 1:
            raise IncompatibleWorkers(
                "workers hold inputs of different sizes: " + ", ".join(f"{name} {n}" for name, n in sizes.items())
            )
        num_features = next(iter(sizes.values()))
    else:
        num_features = math.prod(plan.input_shape)
    features: tuple[int, ...] = ()
    if settings.query != "label-histogram":
        features = _every_feature(plan, num_features) if settings.features is None else settings.features
    if features and features[-1] >= num_features:
        raise ConfigError(f"feature {features[-1]} is beyond the workers' {num_features} features")
    if settings.query == "feature-stats" and settings.clip_range is not None:
        return Query(settings.query, features, None, settings.clip_range, plan)
    if settings.query != "quantiles":
        return Query(settings.query, features, data=plan)
    return Query(settings.query, features, settings.bins, settings.value_range, plan)


def _every_feature(plan: DataPlan | None, num_features: int) -> tuple[int, ...]:
    """What "all features" selects: every input value, but of a table only its numeric columns, since a
    one-hot slot would count a category's rows (which its workers refuse)."""
    if plan is not None and plan.kind == "table":
        return tuple(plan.numeric_slots().tolist())
    return tuple(range(num_features))


def query_width(query: Query, infos: Mapping[str, Info]) -> int:
    """How many values one example gives the query: its plan's encoded input, else the workers' input."""
    return math.prod(query.data.input_shape if query.data is not None else next(iter(infos.values())).input_shape)


class QueryRound:
    """One analytics round over ``endpoints`` (``{name: uri}``).

    ``link(name, uri)`` makes the (unconnected) link to a worker; an error it
    raises counts as that worker's failure, as an unreachable worker does.
    """

    def __init__(
        self, endpoints: Mapping[str, str], settings: QuerySettings, *, link: Callable[[str, str], WorkerLink]
    ) -> None:
        self.endpoints = dict(endpoints)
        self.settings = settings
        self._link = link

    async def run(self) -> QueryAnswers:
        """Greet every worker, then send the query to those that answered; gather answers and failures."""
        answers = QueryAnswers()
        failures = answers.failures
        links: dict[str, WorkerLink] = {}
        infos: dict[str, Info] = {}
        try:
            greetings = await asyncio.gather(
                *(self._greet(name, uri) for name, uri in self.endpoints.items()), return_exceptions=True
            )
            unexpected: BaseException | None = None
            for name, greeting in zip(self.endpoints, greetings, strict=True):
                if isinstance(greeting, SyncfedError):
                    failures[name] = greeting
                elif isinstance(greeting, BaseException):
                    unexpected = unexpected or greeting
                else:
                    links[name], infos[name] = greeting
            if unexpected is not None:
                raise unexpected
            await self._propose(links, answers)
            try:
                if links:
                    answers.query = query = build_query(self.settings, infos)
                    if self.settings.secure_agg:
                        combined, answers.secure = await self._sum_securely(query, links, infos, failures)
                        answers.results[SECURE_SUM] = combined
                    else:
                        results, failed = await ask_each(query, links)
                        answers.results.update(results)
                        failures.update(failed)
            except SyncfedError as exc:  # the answer as a whole failed: reported after the workers' own failures
                answers.error = exc
        finally:
            await asyncio.gather(*(link.close() for link in links.values()))
        answers.failures = {name: failures[name] for name in self.endpoints if name in failures}
        return answers

    async def _propose(self, links: dict[str, WorkerLink], answers: QueryAnswers) -> None:
        """Propose the job's terms before any query: the sites that refuse them leave ``links`` for ``answers``,
        and those left are asked again with terms that count only the sites that answer."""
        settings = self.settings
        terms = Terms(
            job=settings.job or new_job_id("analytics"),
            sites=len(self.endpoints),
            secure_agg=settings.secure_agg,
            dp=None if settings.dp_epsilon is None else "central",
            dp_epsilon=settings.dp_epsilon,
        )

        async def leave(refusals: Mapping[str, str]) -> int:
            for name, reason in refusals.items():
                answers.failures[name] = RemoteError(name, "policy", reason)
                await links.pop(name).close()
            return max(len(links), 1)  # the sites that answer; terms count at least one

        await agree(list(links.values()), terms, leave)

    async def _greet(self, name: str, uri: str) -> tuple[WorkerLink, Info]:
        """Connect and say hello, within the link's connect timeout."""
        link = self._link(name, uri)
        await link.connect()
        try:
            info = await link.request(Hello(), timeout=link.connect_timeout)
        except BaseException:
            await link.close()
            raise
        assert isinstance(info, Info)
        return link, info

    async def _sum_securely(
        self,
        query: Query,
        links: dict[str, WorkerLink],
        infos: dict[str, Info],
        failures: dict[str, SyncfedError],
    ) -> tuple[QueryResult, dict[str, Any]]:
        """The combined answer of ``links`` by one secure aggregation round, and what the round did.

        Workers that fail or refuse leave the round (into ``failures``); those
        whose masked answer arrived stay in the sum even if they leave later.

        Raises:
            QuorumNotMet: if fewer workers than the threshold are left to unmask the sum.
            IncompatibleWorkers: if the workers' label histograms differ in length.
        """
        classes = {name: info.num_classes for name, info in infos.items()}
        if query.data is not None:  # own data: the agreed classes, whichever each site holds
            classes = dict.fromkeys(infos, query.data.num_classes)
        if query.query == "label-histogram" and len(set(classes.values())) > 1:
            raise IncompatibleWorkers(
                "workers hold different numbers of classes: " + ", ".join(f"{name} {c}" for name, c in classes.items())
            )
        return await sum_securely(
            query,
            links,
            num_features=query_width(query, infos),
            num_classes=next(iter(classes.values())),
            largest=max(info.num_examples for info in infos.values()),  # a withheld histogram's bound is as good
            threshold=self.settings.secagg_threshold,
            timeout=self.settings.request_timeout,
            failures=failures,
        )


async def ask_each(
    query: Query, links: Mapping[str, WorkerLink], *, timeout: float | None = None
) -> tuple[dict[str, QueryResult], dict[str, SyncfedError]]:
    """Send ``query`` to every worker at once: the answers, and each failed worker's error.

    ``timeout``: seconds each worker has to answer; ``None``, its link's request timeout.
    """
    results: dict[str, QueryResult] = {}
    failures: dict[str, SyncfedError] = {}
    replies = await asyncio.gather(
        *(link.request(query, timeout=timeout) for link in links.values()), return_exceptions=True
    )
    for name, reply in zip(links, replies, strict=True):
        if isinstance(reply, SyncfedError):
            failures[name] = reply
        elif isinstance(reply, BaseException):
            raise reply
        else:
            assert isinstance(reply, QueryResult)  # request() checked the reply's kind
            results[name] = reply
    return results, failures


async def sum_securely(
    query: Query,
    links: Mapping[str, WorkerLink],
    *,
    num_features: int,
    num_classes: int,
    largest: int,
    threshold: int | None,
    timeout: float,
    failures: dict[str, SyncfedError],
) -> tuple[QueryResult, dict[str, Any]]:
    """The combined answer of ``links`` by one secure aggregation round, and what the round did.

    ``num_features`` is the width of the data the query reads, ``num_classes``
    the length of a label histogram, ``largest`` the most examples a worker
    holds. Workers that fail or refuse leave the round (into ``failures``);
    those whose masked answer arrived stay in the sum even if they leave later.

    Raises:
        QuorumNotMet: if fewer workers than the threshold are left to unmask the sum.
    """
    n = len(links)
    needed = secagg_threshold(n, threshold)
    if n < 2 or needed > n:
        raise QuorumNotMet(f"secure aggregation needs {max(needed, 2)} workers, {n} answered the greeting")
    config = SecAggConfig(
        num_clients=n,
        threshold=needed,
        length=sums_length(query, num_classes),
        clip=secure_clip(query, largest, num_features, n),
        session=os.urandom(SESSION_SIZE),
        bits=64,
        max_count=1,
    )

    async def failure(link: WorkerLink, error: BaseException) -> str:
        if not isinstance(error, SyncfedError):
            raise error
        failures[link.name] = error
        return str(error)

    secure = SecureRound(list(links.values()), config, timeout=timeout, failure=failure)
    try:
        result = await secure.run(dict.fromkeys(links, query), weighted=False)
    except SecAggError as exc:
        raise QuorumNotMet(f"secure aggregation aborted: {exc}") from None
    names = list(links)
    for name in secure.recovered:  # its answer is in the sum: not left out
        del failures[name]
    exact = query.query not in ("feature-stats", "label-stats")
    round_ = {
        "workers": n,
        "threshold": needed,
        "summed": [names[u] for u in result.clients],
        "recovered": secure.recovered,
        "sum_error_bound": 0.0 if exact else config.quantizer.error_bound,
    }
    return from_sums(query, result.weighted_sum, num_features), round_
