"""The workers a run talks to: their connections, joining and rejoining, selection, and what a failure does.

A lost worker is never waited for: it is retried with a backoff
(:class:`Backoff`) at the start of later rounds, checked like at the start
(:mod:`syncfed.compatibility`), and joins the round after it greets back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..auth import read_token, read_worker_tokens
from ..compatibility import check_compatible, check_rejoining, chosen_data
from ..config import DEFAULT_PING_TIMEOUT, DIAL_IN, CoordinatorConfig, parse_listen
from ..disclosure import holdings
from ..exceptions import (
    AuthenticationFailed,
    ConfigError,
    IncompatibleWorkers,
    ProtocolError,
    QuorumNotMet,
    RemoteError,
    WorkerTimeout,
    WorkerUnavailable,
)
from ..failure import Failure
from ..net.dial_in import DialInLink, DialInListener
from ..net.link import LinkSettings, WorkerLink
from ..net.transport import client_tls, server_tls
from ..protocol import DataPlan, Hello, Info, Recipe
from .proposal import propose, refusal_line

__all__ = ["Backoff", "Pool", "dial_in_listener", "greet", "traffic", "worker_links"]

logger = logging.getLogger("syncfed.coordinator")

#: Keeps client sampling's random stream apart from the training seeds derived from the same seed.
_SAMPLING_STREAM = 0x53414D50


def worker_links(config: CoordinatorConfig) -> dict[str, WorkerLink]:
    """A connection (not yet open) to each worker and the evaluator, with the run's limits, TLS and token;
    a :class:`DialInLink` for each worker that dials in."""
    tls = (
        client_tls(config.tls_ca, config.tls_cert, config.tls_key)
        if config.tls_ca is not None or config.tls_cert is not None
        else None
    )
    token = read_token(config.auth_token_file) if config.auth_token_file is not None else None
    settings = LinkSettings(
        max_message_size=config.max_message_size,
        chunk_size=config.chunk_size,
        connect_timeout=config.connect_timeout,
        request_timeout=config.request_timeout,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        tls=tls,
        auth_token=token,
    )
    return {
        name: (DialInLink if uri == DIAL_IN else WorkerLink).from_settings(name, uri, settings)
        for name, uri in {**config.workers, **config.evaluator}.items()
    }


def dial_in_listener(
    config: CoordinatorConfig, links: dict[str, WorkerLink], *, report: Callable[[str], None]
) -> DialInListener | None:
    """The listener of the run's dial-in workers (``--listen``), not yet open; ``None`` without one.

    Raises:
        ConfigError: if a token or TLS file cannot be read, or a dial-in worker has no token.
    """
    if config.listen is None:
        return None
    dialing = {name: link for name, link in links.items() if isinstance(link, DialInLink)}
    tokens = read_worker_tokens(config.worker_tokens) if config.worker_tokens is not None else None
    missing = sorted(set(dialing) - set(tokens)) if tokens is not None else []
    if missing:
        raise ConfigError(f"dial-in worker {missing[0]} has no token in {config.worker_tokens}")
    host, port = parse_listen(config.listen)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_ca)
    return DialInListener(
        dialing,
        host=host,
        port=port,
        report=report,
        tokens=tokens,
        tls=tls,
        max_message_size=config.max_message_size,
        max_pending=config.max_pending_connections,
        handshake_timeout=config.handshake_timeout,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
    )


async def greet(
    link: WorkerLink, *, timeout: float, report: Callable[[str], None], wait_for_start: bool = True
) -> Info:
    """Connect ``link`` unless it is connected (a service's links stay so), and ask what the worker holds;
    propose its job's terms again when it has some (a worker back mid-job).

    Raises:
        WorkerUnavailable: it cannot be reached, or a dial-in worker's hello names another id than its credential
            proved (it is refused, with one line to ``report``).
        RemoteError, ProtocolError: it answered hello with an error or an invalid info, or its policy refused
            the job's terms (code ``policy``).
    """
    if not link.connected:
        await link.connect(wait_for_start=wait_for_start)
    try:
        info = await link.request(Hello(), timeout=timeout)
    except BaseException:
        await link.close()
        raise
    assert isinstance(info, Info)
    if isinstance(link, DialInLink) and info.worker_id != link.name:  # its credential proved link.name
        reason = f"hello names worker {info.worker_id!r}, but the credential proves {link.name!r}"
        report(f"Refused dial-in worker {link.name}: {reason}")
        await link.refuse(reason)
        raise WorkerUnavailable(link.name, reason)
    if link.terms is not None:  # a worker back mid-job: a site with a policy serves only what it accepted anew
        refused = await propose([link], link.terms, timeout=timeout)
        if refused:
            raise RemoteError(link.name, "policy", refused[link.name])
    return info


def traffic(links: Sequence[WorkerLink]) -> tuple[int, int]:
    """Message bytes sent to and received from ``links`` so far."""
    return sum(link.bytes_sent for link in links), sum(link.bytes_received for link in links)


@dataclass
class Backoff:
    """When to try a lost worker again: at once, then after 0.5, 1, 2, 4, ... s, capped.

    Trying is cheap when the worker is down (the connection is refused at
    once) and never holds a round up (see :meth:`Pool.rejoin`), so the
    backoff only spares a struggling host a stream of handshakes.
    """

    failures: int = 0
    retry_at: float = 0.0

    def failed(self, now: float, cap: float) -> None:
        self.failures += 1
        self.retry_at = now + (0.0 if self.failures == 1 else min(0.5 * 2.0 ** (self.failures - 2), cap))

    def due(self, now: float) -> bool:
        return now >= self.retry_at


class Pool:
    """The run's worker connections and what is known of each: its backoff, its example count, the checked model.

    With ``owned`` false the links (and their listener) belong to someone else, the job service
    (:mod:`.service`): the pool opens no listener, greets a link that is connected already, and closes nothing.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        links: dict[str, WorkerLink],
        *,
        report: Callable[[str], None],
        owned: bool = True,
    ) -> None:
        self.config = config
        self.report = report
        self.links = links
        self.owned = owned
        self.listener = dial_in_listener(config, links, report=report) if owned else None
        self.trainers = [links[name] for name in config.workers]
        self.evaluator = links[next(iter(config.evaluator))] if config.evaluator else None
        self.backoff = {name: Backoff() for name in links}
        self.joining: dict[str, asyncio.Task[None]] = {}
        #: Why each worker that came back was last refused (its data or model no longer fit the run).
        self.refused: dict[str, str] = {}
        #: Each worker's example count as its hello said: the most its updates may weigh.
        self.num_examples: dict[str, int] = {}
        #: The model every worker can build and the data they share, once :meth:`start` checked them.
        self.model_name = ""
        self.reference: Info | None = None
        #: Over a user's own data, what the workers agreed on (``syncfed.data``); its statistics once agreed.
        self.plan: DataPlan | None = None
        #: What the run trains (``None``: the classic task); its class weights and target statistics once agreed.
        self.recipe: Recipe | None = None
        # How long a round start waits for reconnecting workers: a live one
        # answers at once, a frozen one must not stall the round.
        self._join_grace = min(config.connect_timeout, config.ping_timeout or DEFAULT_PING_TIMEOUT)

    @property
    def num_classes(self) -> int:
        """The classes the run's model scores: the agreed ones over own data, else the workers' data set's."""
        if self.plan is not None:
            return self.plan.num_classes
        assert self.reference is not None, "known once start() checked the workers"
        return self.reference.num_classes

    def ready(self, link: WorkerLink) -> bool:
        """Connected and checked: a worker still being greeted joins the next round."""
        return link.connected and link.name not in self.joining

    async def start(self) -> dict[str, Info]:
        """Greet every worker at once; go on with a quorum of trainers and the evaluator.

        Raises:
            WorkerUnavailable: fewer trainers than the quorum answered, or the evaluator did not.
            IncompatibleWorkers: workers disagree with each other or with the model.
        """
        if self.listener is not None:
            self.report(f"Listening for dial-in workers on {await self.listener.open()}")
        evaluator, trainers = self.evaluator, self.trainers
        links = [*trainers, *([evaluator] if evaluator else [])]
        outcomes = await asyncio.gather(*(self._greet(link) for link in links), return_exceptions=True)
        infos: dict[str, Info] = {}
        unreachable: list[WorkerUnavailable] = []
        refused: list[RemoteError | ProtocolError] = []  # answered hello with an error, or with an invalid info
        for link, outcome in zip(links, outcomes, strict=True):
            if isinstance(outcome, Info):
                infos[link.name] = outcome
            elif isinstance(outcome, (WorkerUnavailable, RemoteError, ProtocolError)) and link is not evaluator:
                # One faulty peer is one unavailable worker: the quorum decides whether the run can go on.
                if isinstance(outcome, WorkerUnavailable):
                    unreachable.append(outcome)
                else:
                    refused.append(outcome)
                    unreachable.append(WorkerUnavailable(link.name, f"bad reply to hello: {outcome}"))
                self.back_off(link)
            elif isinstance(outcome, BaseException):
                raise outcome
        reachable = len(trainers) - len(unreachable)
        if reachable < self.config.quorum and refused:
            raise refused[0]  # as before: a worker's own answer says more than "unavailable"
        if reachable < self.config.quorum:
            raise (
                unreachable[0]
                if len(unreachable) == 1
                else WorkerUnavailable(
                    ", ".join(error.worker for error in unreachable),
                    f"{reachable} of {len(trainers)} training workers reachable, quorum is {self.config.quorum} ("
                    + "; ".join(f"{error.worker}: {error.reason}" for error in unreachable)
                    + ")",
                )
            )
        for error in unreachable:
            self.report(f"Worker {error.worker} is unreachable ({error.reason}); it will be retried each round")
        self.model_name, self.reference, self.plan, self.recipe = check_compatible(self.config, infos)
        return infos

    async def exclude(self, refusals: Mapping[str, str]) -> None:
        """Take the sites that refused the job out of the run, closing their connections if the run owns
        them (the job service's stay open for its other jobs).

        Raises:
            WorkerUnavailable: if the evaluator refused.
            QuorumNotMet: if fewer trainers than the quorum accepted; the message names each refusal.
        """
        if not refusals:
            return
        why = "; ".join(refusal_line(name, reason) for name, reason in refusals.items())
        if self.owned:
            await asyncio.gather(*(self.links[name].close("refused the job") for name in refusals))
        if self.evaluator is not None and self.evaluator.name in refusals:
            raise WorkerUnavailable(self.evaluator.name, f"the run needs its evaluator ({why})")
        self.trainers = [link for link in self.trainers if link.name not in refusals]
        if len(self.trainers) < self.config.quorum:
            raise QuorumNotMet(
                f"{len(self.trainers)} of {len(self.config.workers)} training workers accepted the job,"
                f" quorum is {self.config.quorum} ({why})"
            )

    async def rejoin(self, links: Sequence[WorkerLink]) -> None:
        """Start reconnecting the lost workers whose backoff has elapsed, and give them a moment.

        A live worker greets back within milliseconds and takes part in the
        coming round; a frozen one cannot hold the round up for longer than
        the grace period, and joins a later round if it ever answers.
        """
        now = time.monotonic()
        for link in links:
            if not link.connected and link.name not in self.joining and self.backoff[link.name].due(now):
                self.joining[link.name] = asyncio.create_task(self._try_rejoin(link))
        pending = [self.joining[link.name] for link in links if link.name in self.joining]
        if pending:
            await asyncio.wait(pending, timeout=self._join_grace)

    def select(self, round_number: int, trainers: Sequence[WorkerLink]) -> list[WorkerLink]:
        """The round's workers: every ready one, or a sample seeded by ``(seed, round)`` (client sampling)."""
        ready = [link for link in trainers if self.ready(link)]
        size = self.config.sample_size(len(ready))
        if size == len(ready):
            return ready
        rng = np.random.default_rng([self.config.seed, round_number, _SAMPLING_STREAM])
        return [ready[index] for index in sorted(rng.choice(len(ready), size=size, replace=False))]

    async def failure(self, link: WorkerLink, exc: BaseException) -> Failure:
        """Why a request failed, closing or backing off the worker as needed; re-raises the unexpected."""
        if isinstance(exc, WorkerTimeout):
            # Closing makes the worker abandon the late work; it rejoins next round.
            await link.close(f"dropped after {exc.reason}")
            return Failure("timeout", exc.reason)
        if isinstance(exc, WorkerUnavailable):
            self.back_off(link)
            return Failure("unavailable", exc.reason)
        if isinstance(exc, RemoteError):
            return Failure("error reply", f"{exc.code}: {exc.reason}")
        if isinstance(exc, ProtocolError):
            await link.close(f"sent an invalid reply: {exc}")
            return Failure("invalid reply", str(exc))
        raise exc

    def succeeded(self, link: WorkerLink) -> None:
        self.backoff[link.name].failures = 0

    async def wait_for_backoff(self, link: WorkerLink) -> None:
        """Sleep until ``link`` is due to be tried again (at least a moment, never a tight loop)."""
        await asyncio.sleep(max(self.backoff[link.name].retry_at - time.monotonic(), 0.05))

    async def wait_for_retry(self, trainers: Sequence[WorkerLink]) -> None:
        """Before retrying a round, wait until the next lost worker is due to be tried (bounded by the cap).

        With every worker connected (the round failed on error replies) there is nothing to wait for.
        """
        now = time.monotonic()
        waits = [self.backoff[link.name].retry_at - now for link in trainers if not link.connected]
        delay = min([self.config.reconnect_max_delay, *waits]) if waits else 0.0
        if delay > 0:
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop the rejoining in progress and close every connection the pool owns."""
        for task in list(self.joining.values()):
            task.cancel()
        await asyncio.gather(*self.joining.values(), return_exceptions=True)
        if not self.owned:
            return
        await asyncio.gather(*(link.close() for link in self.links.values()))
        if self.listener is not None:
            await self.listener.close()

    async def _greet(self, link: WorkerLink, *, wait_for_start: bool = True) -> Info:
        info = await greet(link, timeout=self.config.connect_timeout, report=self.report, wait_for_start=wait_for_start)
        info = chosen_data(self.config, link.name, info)
        self.num_examples[link.name] = info.num_examples
        logger.info("%s holds %s", link.name, holdings(info, secure=self.config.secure_agg))
        return info

    async def _try_rejoin(self, link: WorkerLink) -> None:
        """Reconnect and greet ``link``, checking it like at the start; back off on failure."""
        assert self.reference is not None
        try:
            info = await self._greet(link, wait_for_start=False)  # its backoff paces the tries
            check_rejoining(self.config, link.name, info, self.reference, self.model_name, self.plan)
        except (WorkerUnavailable, IncompatibleWorkers, RemoteError, ProtocolError, AuthenticationFailed) as exc:
            await link.close()
            self.back_off(link)
            logger.info("%s: still unavailable (%s)", link.name, exc)
            if isinstance(exc, IncompatibleWorkers) and self.refused.get(link.name) != str(exc):
                # Not down but changed: the operator must hear it, once, not at each retry.
                self.refused[link.name] = str(exc)
                self.report(f"Worker {link.name} refused: {exc}")
            return
        finally:
            self.joining.pop(link.name, None)
        self.refused.pop(link.name, None)
        self.succeeded(link)
        self.report(f"Worker {link.name} rejoined")

    def back_off(self, link: WorkerLink) -> None:
        """Count a failure of ``link``: it is tried again after its backoff."""
        self.backoff[link.name].failed(time.monotonic(), self.config.reconnect_max_delay)
