"""A site's record of the fits it served per job, so that a job trains here no more than its rounds allow.

A job's terms declare its rounds, and each fit names its round; without a
record a coordinator could send round 1 of a 3-round job a thousand times.
The rule: each round of a job is served at most :data:`MAX_FITS_PER_ROUND`
times, so a job trains here at most ``rounds * MAX_FITS_PER_ROUND`` times.
The repeats an honest coordinator makes fit within it: a round retried below
its quorum (``max_round_retries``, 3 by default: 4 fits), the round in
progress redone once more after the coordinator restarts (``--resume``), and
in ``--mode async`` the few updates a fast site sends towards one version
(``buffer_size``, 2 by default).

Memory is bounded whatever a coordinator sends: :data:`MAX_JOBS` jobs are
remembered (the least recently served is forgotten first) and, for each,
the counts of its :data:`MAX_ROUNDS_KEPT` latest rounds; its total is kept
for as long as the job is, so forgetting a round's count never lifts the
job's overall bound, which its first fit's terms set (later terms of the
same job declaring more rounds do not raise it). Pure: no I/O. Usage::

    ledger = FitLedger()
    ledger.admit(coordinator, terms, fit.plan.round)  # RequestFailed("policy", ...) past the bound
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from .exceptions import RequestFailed
from .protocol import Terms

__all__ = ["MAX_FITS_PER_ROUND", "MAX_JOBS", "MAX_ROUNDS_KEPT", "FitLedger"]

#: Fits of one round of one job a site serves: 4 attempts of a retried round, and as many again after a restart.
MAX_FITS_PER_ROUND: Final = 8
#: Jobs remembered; a coordinator minting job ids only evicts records, never grows the ledger.
MAX_JOBS: Final = 64
#: Rounds of one job whose counts are kept; beyond them only the job's total bounds its fits.
MAX_ROUNDS_KEPT: Final = 1024


@dataclass
class _Job:
    allowed: int  # fits in all: its first terms' rounds times the limit per round, never raised by later terms
    fits: int = 0
    rounds: dict[int, int] = field(default_factory=dict)  # in the order first served: the oldest is dropped first


class FitLedger:
    """How many fits of each job, and of each of its rounds, this site has served; see the module docstring."""

    def __init__(
        self,
        *,
        max_fits_per_round: int = MAX_FITS_PER_ROUND,
        max_jobs: int = MAX_JOBS,
        max_rounds_kept: int = MAX_ROUNDS_KEPT,
    ) -> None:
        self.max_fits_per_round = max_fits_per_round
        self.max_jobs = max_jobs
        self.max_rounds_kept = max_rounds_kept
        # Keyed by the coordinator's proven name too: two federations may both call a job "1".
        self._jobs: OrderedDict[tuple[str | None, str], _Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def admit(self, coordinator: str | None, terms: Terms, round_number: int) -> None:
        """Count a fit of round ``round_number`` of the job ``terms`` declare, or refuse it past the bound.

        Raises:
            RequestFailed: code ``policy``, when the round, or the job, has had its fits.
        """
        key = (coordinator, terms.job)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(terms.rounds * self.max_fits_per_round)
            if len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        self._jobs.move_to_end(key)
        served = job.rounds.get(round_number, 0)
        if served >= self.max_fits_per_round:
            raise RequestFailed(
                "policy",
                f"terms: round {round_number} of job {terms.job} was served {served} times,"
                f" the limit is {self.max_fits_per_round}",
            )
        if job.fits >= job.allowed:
            raise RequestFailed(
                "policy",
                f"terms: job {terms.job} was served {job.fits} fits, the limit is {job.allowed}"
                f" ({self.max_fits_per_round} for each of its rounds)",
            )
        job.fits += 1
        job.rounds[round_number] = served + 1
        if len(job.rounds) > self.max_rounds_kept:
            del job.rounds[next(iter(job.rounds))]
