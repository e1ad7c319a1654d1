"""A site's record of the fits it served per job: each round at most K times, the job rounds * K, in bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncfed.exceptions import RequestFailed
from syncfed.fit_ledger import MAX_FITS_PER_ROUND, FitLedger
from syncfed.protocol import Terms

JOB = Terms(job="j1", sites=3, model="digits-cnn", rounds=3)


def refusal(ledger: FitLedger, round_number: int, *, terms: Terms = JOB, coordinator: str | None = "c") -> str:
    with pytest.raises(RequestFailed) as raised:
        ledger.admit(coordinator, terms, round_number)
    assert raised.value.code == "policy"
    return raised.value.reason


def test_a_round_is_served_k_times_then_refused() -> None:
    ledger = FitLedger()
    for _ in range(MAX_FITS_PER_ROUND):
        ledger.admit("c", JOB, 1)
    assert refusal(ledger, 1) == f"terms: round 1 of job j1 was served {MAX_FITS_PER_ROUND} times, the limit is 8"
    ledger.admit("c", JOB, 2)  # another round has its own count
    ledger.admit("other", JOB, 1)  # another coordinator's job of the same name too


def test_the_honest_repeats_fit_within_the_limit() -> None:
    # Every round retried 3 times (4 attempts), then the whole run again after a restart: 8 fits a round.
    ledger = FitLedger()
    for _ in range(2):
        for round_number in range(1, JOB.rounds + 1):
            for _ in range(4):
                ledger.admit("c", JOB, round_number)


@given(st.lists(st.integers(min_value=1, max_value=5), max_size=60), st.integers(min_value=1, max_value=4))
def test_admitted_fits_never_exceed_k_a_round_nor_rounds_times_k(rounds: list[int], k: int) -> None:
    ledger = FitLedger(max_fits_per_round=k, max_rounds_kept=2)  # few kept rounds: the total must still hold
    admitted: dict[int, int] = {}
    for round_number in rounds:
        try:
            ledger.admit("c", JOB, round_number)
        except RequestFailed:
            continue
        admitted[round_number] = admitted.get(round_number, 0) + 1
    assert sum(admitted.values()) <= JOB.rounds * k
    # Within the kept rounds the per-round limit holds exactly; with every round kept, always.
    unbounded = FitLedger(max_fits_per_round=k)
    counts: dict[int, int] = {}
    for round_number in rounds:
        expected = counts.get(round_number, 0) < k and sum(counts.values()) < JOB.rounds * k
        try:
            unbounded.admit("c", JOB, round_number)
            assert expected
            counts[round_number] = counts.get(round_number, 0) + 1
        except RequestFailed:
            assert not expected


def test_later_terms_cannot_raise_the_jobs_total() -> None:
    ledger = FitLedger(max_fits_per_round=1)
    short = Terms(job="j1", sites=3, model="digits-cnn", rounds=2)
    ledger.admit("c", short, 1)
    ledger.admit("c", short, 2)
    longer = Terms(job="j1", sites=3, model="digits-cnn", rounds=1000)
    assert (
        refusal(ledger, 3, terms=longer) == "terms: job j1 was served 2 fits, the limit is 2 (1 for each of its rounds)"
    )


def test_memory_is_bounded_whatever_job_ids_a_coordinator_mints() -> None:
    ledger = FitLedger(max_jobs=4)
    for number in range(100):
        ledger.admit("c", Terms(job=f"j{number}", sites=3, model="m", rounds=1), 1)
    assert len(ledger) == 4
    kept = FitLedger(max_fits_per_round=1, max_jobs=2)
    kept.admit("c", JOB, 1)
    kept.admit("c", Terms(job="j2", sites=3, model="m", rounds=1), 1)
    kept.admit("c", JOB, 2)  # j1 served last: j2 is the one forgotten next
    kept.admit("c", Terms(job="j3", sites=3, model="m", rounds=1), 1)
    assert refusal(kept, 1) == "terms: round 1 of job j1 was served 1 times, the limit is 1"
