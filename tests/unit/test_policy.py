"""Site policies: the file's keys and types, each rule at and past its limit, and a request against its terms."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.exceptions import ConfigError, RequestFailed
from syncfed.policy import SitePolicy, check_accepted, load_policy, policy_from, required_noise_std, with_terms
from syncfed.privacy import noise_for_epsilon, noise_std
from syncfed.protocol import Evaluate, Fit, Ping, Query, Terms, TrainingPlan

JOB = Terms(job="j1", sites=3, model="digits-cnn", rounds=3)
ANALYTICS = Terms(job="a1", sites=3)
WEIGHTS = {"w": np.zeros(2, np.float32)}


def refusal(policy: SitePolicy, terms: Terms, *, coordinator: str | None = "coordinator", key: str = "digits") -> str:
    with pytest.raises(RequestFailed) as raised:
        policy.check_terms(terms, coordinator=coordinator, data_key=key)
    assert raised.value.code == "policy"
    return raised.value.reason


def fit(round_: int = 1, *, terms: Terms | None = JOB, **plan: object) -> Fit:
    fields: dict[str, object] = {"round": round_, "batch_size": 8, "num_batches": 1, "lr": 0.1, "seed": 0, **plan}
    return Fit("digits-cnn", WEIGHTS, TrainingPlan(**fields), terms=terms)  # type: ignore[arg-type]


def request_refusal(policy: SitePolicy, request: Fit | Evaluate | Query, *, secure: bool = False) -> str:
    with pytest.raises(RequestFailed) as raised:
        policy.check_request(request, coordinator="coordinator", data_key="digits", secure=secure)
    return raised.value.reason


# The file -----------------------------------------------------------------------


def test_a_full_policy_file_reads_into_its_rules(tmp_path: Path) -> None:
    path = tmp_path / "site-policy.toml"
    path.write_text(
        """
coordinators = ["coordinator"]
data_keys = ["digits", "ward7"]
min_other_sites = 2

[training]
models = ["digits-cnn"]
max_rounds = 40
require_secure_agg = true
max_epsilon = 8
max_delta = 1e-5

[analytics]
queries = ["label-histogram"]
require_secure_agg = true
"""
    )
    assert load_policy(path) == SitePolicy(
        coordinators=("coordinator",),
        data_keys=("digits", "ward7"),
        min_other_sites=2,
        models=("digits-cnn",),
        max_rounds=40,
        require_secure_agg=True,
        max_epsilon=8.0,
        max_delta=1e-5,
        queries=("label-histogram",),
        analytics_secure_agg=True,
    )


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"max_rounds": 3}, "key 'max_rounds': not a policy setting"),
        ({"training": {"max_round": 3}}, "key 'training.max_round': not a policy setting"),
        ({"training": 3}, "key 'training': expected a table"),
        ({"training": {"max_rounds": "3"}}, "key 'training.max_rounds': expected a non-negative integer, not '3'"),
        ({"training": {"max_rounds": True}}, "key 'training.max_rounds': expected a non-negative integer, not True"),
        ({"training": {"require_dp": 1}}, "key 'training.require_dp': expected true or false, not 1"),
        ({"training": {"max_epsilon": 0}}, "key 'training.max_epsilon': expected a positive number, not 0"),
        ({"training": {"max_delta": 1}}, "key 'training.max_delta': expected a number below 1"),
        (
            {"coordinators": "coordinator"},
            "key 'coordinators': expected a list of non-empty strings, not 'coordinator'",
        ),
        ({"min_other_sites": -1}, "key 'min_other_sites': expected a non-negative integer, not -1"),
        ({"analytics": {"queries": ["histogram"]}}, "key 'analytics.queries': 'histogram' is not one of"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_in_one_line(document: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        policy_from(document, "site-policy.toml")
    assert str(raised.value).startswith(f"policy file site-policy.toml: {error}")
    assert "\n" not in str(raised.value)


def test_an_unreadable_policy_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("max_rounds = [")
    with pytest.raises(ConfigError, match=f"^cannot read policy file {path}: "):
        load_policy(path)


# The rules ----------------------------------------------------------------------


@given(
    terms=st.builds(
        Terms, job=st.just("j"), sites=st.integers(1, 100), model=st.just("m"), rounds=st.integers(1, 2**63 - 1)
    )
)
def test_a_policy_without_rules_accepts_any_job(terms: Terms) -> None:
    SitePolicy().check_terms(terms, coordinator=None, data_key="anything")


@given(rounds=st.integers(1, 10**6), limit=st.integers(0, 10**6))
def test_max_rounds_refuses_exactly_the_longer_jobs(rounds: int, limit: int) -> None:
    policy, terms = SitePolicy(max_rounds=limit), dataclasses.replace(JOB, rounds=rounds)
    if rounds <= limit:
        policy.check_terms(terms, coordinator=None, data_key="digits")
    else:
        assert refusal(policy, terms) == f"max_rounds: the job asks {rounds} rounds, the policy allows at most {limit}"


@given(sites=st.integers(1, 50), needed=st.integers(0, 50))
def test_min_other_sites_counts_the_sites_besides_this_one(sites: int, needed: int) -> None:
    policy, terms = SitePolicy(min_other_sites=needed), dataclasses.replace(JOB, sites=sites)
    if sites - 1 >= needed:
        policy.check_terms(terms, coordinator=None, data_key="digits")
    else:
        assert refusal(policy, terms) == (
            f"min_other_sites: the job has {sites - 1} other sites, the policy needs at least {needed}"
        )


def test_coordinators_refuse_another_name_and_an_unverified_one() -> None:
    policy = SitePolicy(coordinators=("coordinator",))
    policy.check_terms(JOB, coordinator="coordinator", data_key="digits")
    assert (
        refusal(policy, JOB, coordinator="mallory") == "coordinators: coordinator 'mallory' is not one of 'coordinator'"
    )
    assert refusal(policy, JOB, coordinator=None) == (
        "coordinators: the coordinator proved no name (no verified certificate)"
    )


def test_models_and_data_keys() -> None:
    assert refusal(SitePolicy(models=("mnist-cnn",)), JOB) == "models: model 'digits-cnn' is not one of 'mnist-cnn'"
    assert refusal(SitePolicy(models=()), JOB) == "models: model 'digits-cnn' is not one of none"
    assert refusal(SitePolicy(data_keys=("ward7",)), JOB, key="digits") == (
        "data_keys: data set 'digits' is not one of 'ward7'"
    )


def test_privacy_rules() -> None:
    secure = SitePolicy(require_secure_agg=True)
    assert refusal(secure, JOB) == "require_secure_agg: the job does not use secure aggregation"
    secure.check_terms(dataclasses.replace(JOB, secure_agg=True), coordinator=None, data_key="digits")
    assert refusal(SitePolicy(require_dp=True), JOB) == "require_dp: the job uses no differential privacy"
    budget = SitePolicy(max_epsilon=8.0, max_delta=1e-5)
    assert refusal(budget, JOB) == "require_dp: the job uses no differential privacy"
    central = dataclasses.replace(JOB, dp="central")
    assert refusal(budget, central) == "max_epsilon: the job names no target epsilon, the policy allows at most 8"
    over = dataclasses.replace(central, dp_epsilon=8.5, dp_delta=1e-5)
    assert refusal(budget, over) == "max_epsilon: the job's epsilon 8.5 exceeds 8"
    at = dataclasses.replace(central, dp_epsilon=8.0, dp_delta=1e-5)
    budget.check_terms(at, coordinator=None, data_key="digits")
    assert refusal(budget, dataclasses.replace(at, dp_delta=1e-4)) == "max_delta: the job's delta 0.0001 exceeds 1e-05"


def test_analytics_jobs_answer_to_the_analytics_rules_only() -> None:
    training_only = SitePolicy(models=(), max_rounds=1, require_dp=True)
    training_only.check_terms(ANALYTICS, coordinator=None, data_key="digits")
    assert refusal(SitePolicy(queries=()), ANALYTICS) == "queries: the policy allows no analytics queries"
    assert refusal(SitePolicy(analytics_secure_agg=True), ANALYTICS) == (
        "analytics.require_secure_agg: the job does not use secure aggregation"
    )


# A request against its terms ------------------------------------------------------


def test_a_request_without_terms_is_refused() -> None:
    assert request_refusal(SitePolicy(), fit(terms=None)) == (
        "terms: the fit carries no job terms, and this site has a policy"
    )


def test_a_fit_must_keep_to_its_terms() -> None:
    policy = SitePolicy()
    assert policy.check_request(fit(3), coordinator=None, data_key="digits") == JOB
    assert request_refusal(policy, fit(4)) == "terms: fit round 4 exceeds the job's 3 rounds"
    other = dataclasses.replace(fit(), model="mnist-cnn")
    assert request_refusal(policy, other) == "terms: the fit names model 'mnist-cnn', the job 'digits-cnn'"
    keyed = dataclasses.replace(fit(), dataset_key="ward7")
    assert request_refusal(policy, keyed) == "terms: the fit uses data set 'ward7', the job None"
    assert request_refusal(policy, fit(terms=ANALYTICS)) == "terms: a fit under the terms of an analytics job a1"


def test_a_fit_must_carry_the_privacy_its_terms_declare() -> None:
    policy = SitePolicy()
    masked = dataclasses.replace(JOB, secure_agg=True)
    assert request_refusal(policy, fit(terms=masked, delta=True)) == (
        "terms: the job declares secure aggregation, but the fit is not part of a secure round"
    )
    policy.check_request(fit(terms=masked, delta=True), coordinator=None, data_key="digits", secure=True)
    central = dataclasses.replace(JOB, dp="central")
    assert (
        request_refusal(policy, fit(terms=central))
        == "terms: the job declares central dp, but the fit's plan has no clip"
    )
    policy.check_request(fit(terms=central, delta=True, clip=1.0), coordinator=None, data_key="digits")
    distributed = dataclasses.replace(JOB, dp="distributed")
    assert request_refusal(policy, fit(terms=distributed, delta=True, clip=1.0)) == (
        "terms: the job declares distributed dp, but the fit's plan adds no noise"
    )
    policy.check_request(fit(terms=distributed, delta=True, clip=1.0, noise_std=0.5), coordinator=None, data_key="d")


def test_a_query_answers_to_the_allowed_queries() -> None:
    policy = SitePolicy(queries=("label-histogram",))
    policy.check_request(Query("label-histogram", terms=ANALYTICS), coordinator=None, data_key="digits")
    asked = Query("feature-stats", (0, 1), terms=ANALYTICS)
    assert request_refusal(policy, asked) == "queries: query 'feature-stats' is not one of 'label-histogram'"
    secure = SitePolicy(analytics_secure_agg=True)
    in_the_clear = Query("label-histogram", terms=dataclasses.replace(ANALYTICS, secure_agg=True))
    assert request_refusal(secure, in_the_clear) == (
        "analytics.require_secure_agg: the query is not part of a secure aggregation round"
    )
    secure.check_request(in_the_clear, coordinator=None, data_key="digits", secure=True)


def test_a_training_jobs_own_statistics_queries_answer_to_its_training_rules() -> None:
    # Federated normalisation asks feature-stats of a job the site accepted: [analytics] is for analytics jobs.
    policy = SitePolicy(queries=("label-histogram",), analytics_secure_agg=True, require_secure_agg=True)
    statistics = Query("feature-stats", (0, 1), terms=dataclasses.replace(JOB, secure_agg=True))
    policy.check_request(statistics, coordinator=None, data_key="digits", secure=True)
    assert request_refusal(policy, statistics) == (
        "require_secure_agg: the job's statistics query is not part of a secure aggregation round"
    )
    SitePolicy(queries=()).check_request(statistics, coordinator=None, data_key="digits")


def test_with_terms_declares_the_job_on_data_requests_only() -> None:
    bare = fit(terms=None)
    assert with_terms(bare, JOB) == fit()
    assert with_terms(bare, None) is bare
    assert with_terms(Ping(), JOB) == Ping()
    declared = fit(terms=ANALYTICS)
    assert with_terms(declared, JOB) is declared  # terms already declared are kept
    assert with_terms(Evaluate("digits-cnn", WEIGHTS, 8), JOB).terms == JOB  # type: ignore[attr-defined]


# Distributed dp: the noise each site adds, against the budget its terms declare ---------------------------------

DP_JOB = dataclasses.replace(JOB, dp="distributed", dp_epsilon=1.0, dp_delta=1e-5)


def test_distributed_noise_below_the_declared_budget_is_refused() -> None:
    # The review's case: epsilon 1 declared, noise 1e-12 at clip 100.
    policy = SitePolicy(max_rounds=3, max_epsilon=1.0)
    assert request_refusal(policy, fit(terms=DP_JOB, delta=True, clip=100.0, noise_std=1e-12)) == (
        "terms: the fit's noise std 1e-12 is below the 404.539 that the job's epsilon 1 over 3 rounds"
        " and 3 sites needs at clip 100"
    )


def test_the_coordinators_own_calibration_passes_and_a_hair_less_does_not() -> None:
    policy = SitePolicy()
    # What PrivateRounds asks of each of 3 sites: the multiplier for epsilon 1 over 3 rounds, shared by 3.
    std = noise_std(noise_for_epsilon(1.0, 3, 1.0, 1e-5), 2.0, 3)
    policy.check_request(fit(terms=DP_JOB, delta=True, clip=2.0, noise_std=std), coordinator=None, data_key="d")
    assert request_refusal(policy, fit(terms=DP_JOB, delta=True, clip=2.0, noise_std=std * (1 - 1e-6))).startswith(
        "terms: the fit's noise std"
    )


# No deadline: the first example pays for the accountant's first search (0.8 s when no test before it did).
@settings(deadline=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=1, max_value=6))
def test_fewer_sites_or_more_rounds_need_more_noise_from_each(sites: int, rounds: int) -> None:
    terms = dataclasses.replace(DP_JOB, sites=sites, rounds=rounds)
    required = required_noise_std(terms, 1.0)
    assert required_noise_std(dataclasses.replace(terms, sites=sites + 1), 1.0) < required
    assert required_noise_std(dataclasses.replace(terms, rounds=rounds + 1), 1.0) > required
    assert required_noise_std(terms, 2.0) == pytest.approx(2 * required)


def test_a_budget_without_delta_cannot_be_checked() -> None:
    no_delta = dataclasses.replace(DP_JOB, dp_delta=None)
    assert request_refusal(SitePolicy(), fit(terms=no_delta, delta=True, clip=1.0, noise_std=100.0)) == (
        "terms: the job names epsilon 1 but no delta, so its noise cannot be checked"
    )


# The sites of a secure round ------------------------------------------------------------------------------------


def test_a_secure_round_needs_min_other_sites_besides_this_one() -> None:
    policy = SitePolicy(min_other_sites=2)
    policy.check_sites(3, "the secure round")
    with pytest.raises(RequestFailed) as raised:
        policy.check_sites(2, "the secure round")
    assert raised.value.reason == "min_other_sites: the secure round has 1 other sites, the policy needs at least 2"


def test_a_request_must_declare_the_terms_the_site_accepted_with_at_most_its_sites() -> None:
    def reason(terms: Terms, accepted: Terms | None, secure_clients: int | None = None) -> str:
        with pytest.raises(RequestFailed) as raised:
            check_accepted(terms, accepted, secure_clients=secure_clients)
        return raised.value.reason

    check_accepted(JOB, JOB)
    check_accepted(dataclasses.replace(JOB, sites=2), JOB, secure_clients=2)  # a round of fewer sites
    assert reason(JOB, None) == "terms: job j1 was not proposed on this connection"
    assert reason(dataclasses.replace(JOB, rounds=30), JOB) == (
        "terms: the request's terms of job j1 differ from those the site accepted"
    )
    # More sites would lower the noise a site must add: refused, and inside a secure round bounded by its clients.
    assert reason(dataclasses.replace(JOB, sites=10**6), JOB) == (
        "terms: the request declares 1000000 sites, the job was accepted for 3"
    )
    assert reason(JOB, JOB, secure_clients=2) == "terms: the request declares 3 sites, its secure round has 2 clients"


def test_a_budget_the_accountant_cannot_solve_is_a_refusal_not_a_crash() -> None:
    impossible = Terms(job="j", sites=3, model="m", rounds=10**9, dp="distributed", dp_epsilon=0.001, dp_delta=1e-5)
    with pytest.raises(RequestFailed) as raised:
        required_noise_std(impossible, 1.0)
    assert raised.value.code == "policy" and raised.value.reason.startswith(
        "terms: the site cannot check the job's noise"
    )
