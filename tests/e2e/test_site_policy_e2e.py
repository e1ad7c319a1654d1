"""Site policies over real worker processes: one secure-aggregation run in which one site refuses the job.

ana requires secure aggregation, the session's bob has no policy, carl allows at
most 2 rounds and only feature statistics. A 3-round ``--secure-agg`` job goes
on with ana and bob (ana's fits come masked, so her policy serves them), carl's
refusal is in the report, the metrics file and carl's log, and ana and bob are
proposed the job again as one of 2 sites; an analytics query gets the same
treatment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import THREADS, run, running_workers
from units import MS

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator
from syncfed.coordinator.query_round import QueryRound, QuerySettings
from syncfed.exceptions import QuorumNotMet
from syncfed.net.link import WorkerLink
from syncfed.net.spawn import WorkerProcess

CARL_REFUSES = "max_rounds: the job asks 3 rounds, the policy allows at most 2"


@pytest.fixture(scope="module")
def policy_workers(
    tmp_path_factory: pytest.TempPathFactory, digits_workers: dict[str, WorkerProcess]
) -> Iterator[dict[str, WorkerProcess]]:
    """ana and carl with their policies, started here, and the session's bob between them."""
    folder = tmp_path_factory.mktemp("policies")
    (folder / "ana.toml").write_text("[training]\nrequire_secure_agg = true\n")
    (folder / "carl.toml").write_text('[training]\nmax_rounds = 2\n[analytics]\nqueries = ["feature-stats"]\n')
    plan = [
        ("ana", [*THREADS, "--digits", "0-3", "--policy", str(folder / "ana.toml")]),
        ("carl", [*THREADS, "--digits", "7-9", "--policy", str(folder / "carl.toml")]),
    ]
    with running_workers(plan) as workers:
        yield {"ana": workers["ana"], "bob": digits_workers["bob"], "carl": workers["carl"]}


def settings(workers: dict[str, WorkerProcess], **changes: object) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers={name: worker.uri for name, worker in workers.items()},
        evaluator={},
        training_rounds=3,
        federate_after_n_batches=2,
        connect_timeout=10_000 * MS,
        request_timeout=60_000 * MS,
        **changes,  # type: ignore[arg-type]
    )


def test_a_refusing_site_leaves_a_secure_run_that_goes_on_without_it(
    policy_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    said: list[str] = []
    events: list[dict[str, object]] = []
    config = settings(policy_workers, secure_agg=True, min_workers=2, metrics_out=metrics)
    run(Coordinator(config, report=said.append, listeners=[events.append]).run())
    assert f"carl refused the job: {CARL_REFUSES}" in said
    refused = {"event": "refused", "worker": "carl", "reason": CARL_REFUSES}
    assert events[0] == refused
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[0] == refused
    rounds = [line for line in lines if line["event"] == "round"]
    assert [line["round"] for line in rounds] == [1, 2, 3]
    assert all(line["workers"] == ["ana", "bob"] for line in rounds)  # ana served every masked fit
    assert any("policy: refused job" in line and CARL_REFUSES in line for line in policy_workers["carl"].output)
    # Proposed again without carl: the sites that train are the sites the terms count.
    assert any(
        line.endswith(": 3 rounds of digits-cnn over 2 sites secure-agg") for line in policy_workers["ana"].output
    )


def test_an_honest_distributed_dp_job_passes_the_sites_noise_checks(policy_workers: dict[str, WorkerProcess]) -> None:
    # carl allows 2 rounds: every site takes part, and ana and carl check each fit's noise against epsilon 8.
    config = dataclasses.replace(
        settings(policy_workers, secure_agg=True, dp="distributed", dp_target_epsilon=8.0), training_rounds=2
    )
    result = run(Coordinator(config, report=lambda line: None).run())
    assert [record.workers for record in result.rounds] == [("ana", "bob", "carl")] * 2


def test_without_a_quorum_the_error_names_the_refusals(policy_workers: dict[str, WorkerProcess]) -> None:
    said: list[str] = []
    with pytest.raises(QuorumNotMet) as raised:
        run(Coordinator(settings(policy_workers, min_workers=2), report=said.append).run())
    assert said[-2:] == [
        "ana refused the job: require_secure_agg: the job does not use secure aggregation",
        f"carl refused the job: {CARL_REFUSES}",
    ]
    assert str(raised.value) == (
        "1 of 3 training workers accepted the job, quorum is 2"
        f" (ana refused the job: require_secure_agg: the job does not use secure aggregation;"
        f" carl refused the job: {CARL_REFUSES})"
    )


def test_an_analytics_query_a_site_does_not_allow_is_refused(policy_workers: dict[str, WorkerProcess]) -> None:
    def link(name: str, uri: str) -> WorkerLink:
        return WorkerLink(name, uri, max_message_size=2**20, connect_timeout=10_000 * MS)

    endpoints = {name: worker.uri for name, worker in policy_workers.items()}
    answers = run(QueryRound(endpoints, QuerySettings("label-histogram"), link=link).run())
    assert sorted(answers.results) == ["ana", "bob"]
    assert answers.refusals == {"carl": "queries: query 'label-histogram' is not one of 'feature-stats'"}
