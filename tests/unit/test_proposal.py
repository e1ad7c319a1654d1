"""The terms a coordinator declares: proposed until the sites left agree, and in each fit the sites its round trains."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

import numpy as np
import pytest

from syncfed.coordinator.dispatch import Dispatch
from syncfed.coordinator.proposal import agree
from syncfed.exceptions import RemoteError, RequestFailed
from syncfed.policy import SitePolicy
from syncfed.protocol import Accepted, Fit, Message, Propose, Terms, TrainingPlan


class PolicyLink:
    """A worker link that answers a proposal as a site with ``policy`` does."""

    def __init__(self, name: str, policy: SitePolicy) -> None:
        self.name = name
        self.policy = policy
        self.terms: Terms | None = None
        self.proposed: list[int] = []  # the sites each proposal declared

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        assert isinstance(message, Propose)
        self.proposed.append(message.terms.sites)
        try:
            self.policy.check_terms(message.terms, coordinator=None, data_key="digits")
        except RequestFailed as exc:
            raise RemoteError(self.name, exc.code, exc.reason) from None
        return Accepted()


def test_sites_that_accepted_a_larger_job_are_asked_again_until_all_agree() -> None:
    links = [
        PolicyLink("alice", SitePolicy()),
        PolicyLink("bob", SitePolicy(min_other_sites=1)),
        PolicyLink("charlie", SitePolicy(min_other_sites=3)),  # accepts 4 sites; not the 3 left after dave
        PolicyLink("dave", SitePolicy(models=("mnist-cnn",))),
    ]
    left: list[dict[str, str]] = []
    training = {link.name for link in links}

    async def leave(refusals: Mapping[str, str]) -> int:
        left.append(dict(refusals))
        training.difference_update(refusals)
        return len(training)

    lines: list[str] = []
    terms = Terms(job="j1", sites=4, model="digits-cnn", rounds=3)
    agreed = asyncio.run(agree(links, terms, leave, report=lines.append))  # type: ignore[arg-type]
    assert agreed.sites == 2
    assert [list(refusals) for refusals in left] == [["dave"], ["charlie"]]
    assert (
        lines[1] == "charlie refused the job: min_other_sites: the job has 2 other sites, the policy needs at least 3"
    )
    assert [link.proposed for link in links] == [[4, 3, 2], [4, 3, 2], [4, 3], [4]]
    assert [link.terms for link in links] == [agreed, agreed, None, None]


def test_without_refusals_one_proposal_is_all() -> None:
    link = PolicyLink("alice", SitePolicy())
    terms = Terms(job="j1", sites=1, model="digits-cnn", rounds=3)

    async def leave(refusals: Mapping[str, str]) -> int:
        raise AssertionError("nobody refused")

    assert asyncio.run(agree([link], terms, leave)) == terms  # type: ignore[list-item]
    assert link.proposed == [1]


def test_a_rounds_fits_declare_the_sites_it_trains() -> None:
    link = PolicyLink("alice", SitePolicy(min_other_sites=2))
    plan = TrainingPlan(round=1, batch_size=8, num_batches=1, lr=0.1, seed=0)
    fit = Fit("digits-cnn", {"w": np.zeros(2, np.float32)}, plan)
    assert Dispatch.in_round(fit, link, 2) is fit  # type: ignore[arg-type]  # a site that declared no terms
    link.terms = Terms(job="j1", sites=3, model="digits-cnn", rounds=3)
    declared = Dispatch.in_round(fit, link, 2)  # type: ignore[arg-type]
    assert declared.terms == dataclasses.replace(link.terms, sites=2)
    with pytest.raises(RequestFailed) as raised:  # two in the round: alice's one other is too few
        link.policy.check_request(declared, coordinator=None, data_key="digits")
    assert raised.value.reason == "min_other_sites: the job has 1 other sites, the policy needs at least 2"
