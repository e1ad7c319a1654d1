"""The job's terms, proposed to every worker at the start of a run: who refuses, and why.

A site with a policy (``run_websocket_server.py --policy``) answers the
proposal before any training or query; a site that refuses is unavailable for
the run and the quorum decides whether the run goes on. Those that accept
get the terms in every later request (:attr:`WorkerLink.terms`), so that they
check each one against the job it belongs to. See docs/security.md, "Site policies".
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ..config import CoordinatorConfig
from ..exceptions import RemoteError, SyncfedError
from ..net.link import WorkerLink
from ..protocol import Accepted, Propose, Terms

__all__ = ["new_job_id", "training_terms", "propose", "agree", "refused_event", "refusal_line"]


def new_job_id(kind: str) -> str:
    """A fresh job id for a run that has none: its kind, the time and a random suffix."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def training_terms(config: CoordinatorConfig, model: str, job: str) -> Terms:
    """What a training run declares: its model and rounds, its sites, its privacy and its data set."""
    return Terms(
        job=job,
        sites=len(config.workers),
        model=model,
        rounds=config.training_rounds,
        secure_agg=config.secure_agg,
        dp=config.dp,
        dp_epsilon=config.dp_target_epsilon if config.dp is not None else None,
        dp_delta=config.dp_delta if config.dp is not None else None,
        dataset_key=config.dataset_key,
    )


async def propose(
    links: Sequence[WorkerLink],
    terms: Terms,
    *,
    timeout: float | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Propose ``terms`` to every worker at once; each site that refuses them, with its reason.

    A worker that accepts, or that is unreachable now (it is checked per request when it
    comes back), declares the terms from now on; one that does not know the proposal (a
    worker before site policies, ``unknown_kind``) has no policy, and gets requests as before.
    ``timeout``: seconds each worker has to answer (``None``: its link's request timeout);
    ``report`` gets one line per refusal.
    """
    for link in links:
        link.terms = terms
    outcomes = await asyncio.gather(
        *(link.request(Propose(terms), timeout=timeout) for link in links), return_exceptions=True
    )
    refusals: dict[str, str] = {}
    for link, outcome in zip(links, outcomes, strict=True):
        if isinstance(outcome, Accepted):
            continue
        if isinstance(outcome, RemoteError) and outcome.code == "policy":
            refusals[link.name] = outcome.reason
            link.terms = None
            if report is not None:
                report(refusal_line(link.name, outcome.reason))
        elif isinstance(outcome, RemoteError) and outcome.code == "unknown_kind":
            link.terms = None
        elif isinstance(outcome, BaseException) and not isinstance(outcome, SyncfedError):
            raise outcome
    return refusals


async def agree(
    links: Sequence[WorkerLink],
    terms: Terms,
    leave: Callable[[Mapping[str, str]], Awaitable[int]],
    *,
    timeout: float | None = None,
    report: Callable[[str], None] | None = None,
) -> Terms:
    """Propose ``terms`` until the sites left all accept; the terms they accepted.

    After refusals the others accepted a job of more sites than will train: ``leave`` takes the
    refusing sites out of the run (it may raise, for a quorum) and says how many training sites
    remain, and the terms, declaring that many, are proposed again, so that each site's
    ``min_other_sites`` holds for the sites that train. Each pass drops a site, so this ends.
    """
    remaining = list(links)
    while refusals := await propose(remaining, terms, timeout=timeout, report=report):
        terms = dataclasses.replace(terms, sites=await leave(refusals))
        remaining = [link for link in remaining if link.name not in refusals]
    return terms


def refusal_line(name: str, reason: str) -> str:
    """How the coordinator reports a site's refusal: one line."""
    return f"{name} refused the job: {reason}"


def refused_event(name: str, reason: str) -> dict[str, str]:
    """The metrics event of a refusal, as the job service collects it into ``JobRecord["refusals"]``."""
    return {"event": "refused", "worker": name, "reason": reason}
