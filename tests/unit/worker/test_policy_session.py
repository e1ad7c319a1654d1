"""A worker with a site policy, through a LinkPair: a real worker in this event loop over a real socket.

The rules themselves are tested in tests/unit/test_policy.py; here they are seen from
the wire: the proposal, requests with and without terms, and the worker's log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from linkpair import LinkPair, digits_weights

from syncfed.exceptions import RemoteError
from syncfed.fit_ledger import FitLedger
from syncfed.protocol import (
    Accepted,
    Fit,
    FitResult,
    Hello,
    Message,
    Propose,
    Query,
    SecAggStart,
    Terms,
    TrainingPlan,
)
from syncfed.secagg import SecAggConfig

JOB = Terms(job="j1", sites=3, model="digits-cnn", rounds=2)
ANALYTICS = Terms(job="a1", sites=3)  # [analytics] rules: a training job's own queries answer to [training]
PLAN = TrainingPlan(round=1, batch_size=8, num_batches=1, lr=0.05, seed=3)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return digits_weights()


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "site-policy.toml"
    path.write_text('min_other_sites = 1\n[training]\nmax_rounds = 2\n[analytics]\nqueries = ["label-histogram"]\n')
    return path


async def refused(pair: LinkPair, request: Message) -> str:
    with pytest.raises(RemoteError) as raised:
        await pair.client.request(request)
    assert raised.value.code == "policy"
    return raised.value.reason


def test_a_site_with_a_policy_refuses_before_any_work(
    weights: dict[str, np.ndarray], policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with LinkPair(policy=policy) as pair:
            await pair.client.request(Hello())
            assert await pair.client.request(Propose(JOB)) == Accepted()
            long_job = dataclasses.replace(JOB, rounds=3)
            assert await refused(pair, Propose(long_job)) == (
                "max_rounds: the job asks 3 rounds, the policy allows at most 2"
            )
            assert await refused(pair, Fit("digits-cnn", weights, PLAN)) == (
                "terms: the fit carries no job terms, and this site has a policy"
            )
            late = dataclasses.replace(PLAN, round=3)
            assert await refused(pair, Fit("digits-cnn", weights, late, terms=JOB)) == (
                "terms: fit round 3 exceeds the job's 2 rounds"
            )
            assert await refused(pair, Query("feature-stats", (0,), terms=ANALYTICS)) == (
                "queries: query 'feature-stats' is not one of 'label-histogram'"
            )
            alone = dataclasses.replace(JOB, sites=1)
            assert await refused(pair, Fit("digits-cnn", weights, PLAN, terms=alone)) == (
                "min_other_sites: the job has 0 other sites, the policy needs at least 1"
            )
            # The refusals cost the session nothing: a fit within the terms trains.
            assert isinstance(await pair.client.request(Fit("digits-cnn", weights, PLAN, terms=JOB)), FitResult)
            with pytest.raises(RemoteError) as raised:  # past the policy, the tiny shard's group size answers
                await pair.client.request(Query("label-histogram", terms=JOB))
            assert raised.value.code == "refused"

    with caplog.at_level(logging.WARNING, logger="syncfed.worker"):
        asyncio.run(asyncio.wait_for(scenario(), 60))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("policy: ")]
    assert len(lines) == 5
    assert lines[0].startswith("policy: refused job j1 (propose) of an unverified coordinator at 127.0.0.1:")
    assert lines[0].endswith(": max_rounds: the job asks 3 rounds, the policy allows at most 2")
    assert lines[1].startswith("policy: refused a request without terms (fit) of an unverified coordinator")


def test_a_policy_that_lists_coordinators_refuses_one_it_cannot_verify(tmp_path: Path) -> None:
    path = tmp_path / "site-policy.toml"
    path.write_text('coordinators = ["coordinator"]\n')

    async def scenario() -> None:
        async with LinkPair(policy=path) as pair:  # plain ws://: no certificate proves a name
            await pair.client.request(Hello())
            assert await refused(pair, Propose(JOB)) == (
                "coordinators: the coordinator proved no name (no verified certificate)"
            )

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_site_without_a_policy_serves_as_before(weights: dict[str, np.ndarray]) -> None:
    async def scenario() -> None:
        async with LinkPair() as pair:
            await pair.client.request(Hello())
            assert await pair.client.request(Propose(dataclasses.replace(JOB, rounds=10**6))) == Accepted()
            assert isinstance(await pair.client.request(Fit("digits-cnn", weights, PLAN)), FitResult)
            late = dataclasses.replace(PLAN, round=3)
            assert isinstance(await pair.client.request(Fit("digits-cnn", weights, late, terms=JOB)), FitResult)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_site_refuses_repeated_rounds_starved_noise_and_a_small_secure_round(
    weights: dict[str, np.ndarray], tmp_path: Path
) -> None:
    policy = tmp_path / "site-policy.toml"
    policy.write_text("min_other_sites = 2\n")
    transfer = dataclasses.replace(PLAN, num_batches=0)  # a round of pure transfer: the rules, not the training
    private = Terms(job="j2", sites=3, model="digits-cnn", rounds=2, dp="distributed", dp_epsilon=1.0, dp_delta=1e-5)

    async def scenario() -> None:
        async with LinkPair(policy=policy) as pair:
            pair.worker.ledger = FitLedger(max_fits_per_round=2)
            await pair.client.request(Hello())
            assert await refused(pair, Fit("digits-cnn", weights, transfer, terms=JOB)) == (
                "terms: job j1 was not proposed on this connection"
            )
            for terms in (JOB, private):
                assert isinstance(await pair.client.request(Propose(terms)), Accepted)
            assert await refused(
                pair, Fit("digits-cnn", weights, transfer, terms=dataclasses.replace(JOB, sites=9))
            ) == ("terms: the request declares 9 sites, the job was accepted for 3")
            assert await refused(
                pair, Fit("digits-cnn", weights, transfer, terms=dataclasses.replace(JOB, rounds=9))
            ) == ("terms: the request's terms of job j1 differ from those the site accepted")
            for _ in range(2):
                assert isinstance(await pair.client.request(Fit("digits-cnn", weights, transfer, terms=JOB)), FitResult)
            assert await refused(pair, Fit("digits-cnn", weights, transfer, terms=JOB)) == (
                "terms: round 1 of job j1 was served 2 times, the limit is 2"
            )
            starved = dataclasses.replace(transfer, delta=True, clip=100.0, noise_std=1e-12)
            assert (await refused(pair, Fit("digits-cnn", weights, starved, terms=private))).startswith(
                "terms: the fit's noise std 1e-12 is below the "
            )
            small = SecAggConfig(num_clients=2, threshold=2, length=4, clip=1.0, session=bytes(16))
            assert await refused(pair, SecAggStart(small, 0)) == (
                "min_other_sites: the secure round has 1 other sites, the policy needs at least 2"
            )
            # The refused fits counted for nothing: round 2 of the job still has its two.
            later = dataclasses.replace(transfer, round=2)
            assert isinstance(await pair.client.request(Fit("digits-cnn", weights, later, terms=JOB)), FitResult)

    asyncio.run(asyncio.wait_for(scenario(), 60))
