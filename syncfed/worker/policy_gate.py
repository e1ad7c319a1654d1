"""A connection's gate for a site with a policy: the jobs it accepted on it, and each request checked against them.

The coordinator proposes a job's terms before any work (``propose``); the
site accepts them or refuses in one line. From then on every fit, evaluate
and query of the job must declare exactly the terms accepted on this
connection (:func:`syncfed.policy.check_accepted`), so a coordinator can
neither skip the proposal, which the worker logs, nor change the terms
afterwards; inside a secure round, a fit may not claim more sites than the
round's clients. A coordinator that reconnects proposes again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from ..exceptions import RequestFailed
from ..policy import check_accepted
from ..protocol import Evaluate, Fit, Message, Propose, Query, SecAggMask, SecAggStart, Terms

if TYPE_CHECKING:
    from .server import Worker

__all__ = ["MAX_ACCEPTED", "PolicyGate"]

logger = logging.getLogger("syncfed.worker")

#: Jobs accepted on one connection that are remembered; a coordinator minting jobs evicts the oldest.
MAX_ACCEPTED: Final = 64


class PolicyGate:
    """What :meth:`judge` needs across one connection's requests: the jobs accepted, the secure round's size."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.accepted: OrderedDict[str, Terms] = OrderedDict()
        #: The number of clients of the secure round in progress on this connection.
        self.secure_clients: int | None = None

    def judge(self, message: Message, *, coordinator: str | None, peer: str) -> None:
        """Refuse, before any work, a job the site's policy does not allow, or a request that strays from its job.

        Raises:
            RequestFailed: code ``policy``, logged in one line.
        """
        worker, policy = self.worker, self.worker.policy
        assert policy is not None
        task = message.task if isinstance(message, SecAggMask) else message
        secure = task is not message
        try:
            if isinstance(task, Propose):
                terms = task.terms
                policy.check_terms(terms, coordinator=coordinator, data_key=worker.data_key(terms.dataset_key))
                self._accept(terms)
            elif isinstance(task, Fit | Evaluate | Query):
                # A query is over the default data set, which it cannot change.
                key = worker.data_key(None if isinstance(task, Query) else task.dataset_key)
                terms = policy.check_request(task, coordinator=coordinator, data_key=key, secure=secure)
                check_accepted(
                    terms, self.accepted.get(terms.job), secure_clients=self.secure_clients if secure else None
                )
                if isinstance(task, Fit):  # last: a refused fit counts for nothing
                    worker.ledger.admit(coordinator, terms, task.plan.round)
            elif isinstance(task, SecAggStart):  # the masks need every client, so their number is no claim
                policy.check_sites(task.config.num_clients, "the secure round")
                self.secure_clients = task.config.num_clients
        except RequestFailed as exc:
            declared = getattr(task, "terms", None)
            job = f"job {declared.job}" if declared is not None else "a request without terms"
            who = "an unverified coordinator" if coordinator is None else f"coordinator {coordinator!r}"
            logger.warning("policy: refused %s (%s) of %s at %s: %s", job, message.kind, who, peer, exc)
            raise

    def _accept(self, terms: Terms) -> None:
        self.accepted[terms.job] = terms
        self.accepted.move_to_end(terms.job)
        while len(self.accepted) > MAX_ACCEPTED:
            self.accepted.popitem(last=False)
