"""A secure aggregation round over real workers: the I/O of its four steps.

An I/O layer over the pure :mod:`syncfed.secagg` (Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning"),
used by the coordinator's private rounds
(:mod:`syncfed.coordinator.private_rounds`) and by ``python -m syncfed
analytics --secure-agg``. Each request goes under the round timeout:

1. ``secagg_start``: the round's settings and each worker's client id; the
   workers answer with their public keys.
2. ``secagg_share``: each worker gets its neighbours' keys and answers with
   Shamir shares of its secrets, encrypted for each neighbour; the
   coordinator relays ciphertexts it cannot read.
3. ``secagg_mask``: each worker gets the shares addressed to it and a fit
   request; it trains and answers with its update (relative to the global
   model) and its example count, quantized and masked. (Analytics send a
   query instead, whose answer is masked.)
4. ``secagg_unmask``: the survivors (those who sent a masked input) reveal
   the shares that remove the masks; the coordinator keeps only the sum.

A worker lost after step 3 is still in the sum: the survivors' shares
rebuild its self mask. With fewer than ``t`` survivors the round stops with
:class:`~syncfed.exceptions.SecAggError` having learnt nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

from ..exceptions import ConfigError, ProtocolError
from ..protocol import (
    Fit,
    Message,
    Query,
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
)
from ..secagg import ForwardedShares, NeighbourKeys, SecAggConfig, SecAggResult, SecAggServer, UnmaskRequest
from .link import WorkerLink

__all__ = ["SESSION_SIZE", "FailureHandler", "SecureRound", "secagg_threshold"]

logger = logging.getLogger("syncfed.secure_round")

#: Why a worker left the round: the caller's own record of a failure (the coordinator's
#: :class:`~syncfed.failure.Failure`, the analytics command's text).
Reason = TypeVar("Reason")

#: Turns a failed request into the reason a worker left the round, closing or
#: backing off the worker as the caller does; re-raises the unexpected.
FailureHandler = Callable[[WorkerLink, BaseException], Awaitable[Reason]]

#: Random bytes binding one round's keys, masks and ciphertexts together.
SESSION_SIZE = 32

_Reply = TypeVar("_Reply", SecAggKeys, SecAggShares, SecAggMasked, SecAggUnmasked)


def secagg_threshold(num_clients: int, configured: int | None = None) -> int:
    """``t`` for a round of ``n`` workers: the configured one, else ``ceil(2n / 3)``.

    Two thirds tolerates a third of the workers dropping out and stays above
    the half that the protocol needs (see :class:`~syncfed.secagg.SecAggConfig`).
    """
    return configured if configured is not None else -(-2 * num_clients // 3)


class SecureRound(Generic[Reason]):
    """One secure aggregation round over ``clients`` (client id: position), one method per protocol step.

    A worker whose request fails leaves the round from that step on;
    ``failures`` says why. The steps are apart so that a caller can act
    between them (the tests kill workers there); :meth:`run` chains them.

    Usage::

        secure = SecureRound(clients, config, timeout=60.0, failure=why)
        result = await secure.run(fits, weighted=True)   # SecAggResult: the sum only

    Analytics run a round of their own with one query for every worker
    (``weighted=False``): the sum is that of the answers' sums.

    Raises:
        ConfigError: if the config is not for ``len(clients)`` clients.
    """

    def __init__(
        self,
        clients: Sequence[WorkerLink],
        config: SecAggConfig,
        *,
        timeout: float,
        failure: FailureHandler[Reason],
    ) -> None:
        if len(clients) != config.num_clients:
            raise ConfigError(f"{len(clients)} workers do not match a round of {config.num_clients} clients")
        self.config = config
        self.timeout = timeout
        self._failure = failure
        self._server = SecAggServer(config)
        self._active: dict[int, WorkerLink] = dict(enumerate(clients))
        self._keys: dict[int, NeighbourKeys] = {}
        self._forwarded: dict[int, ForwardedShares] = {}
        self._request: UnmaskRequest | None = None
        #: Why each worker that left the round did.
        self.failures: dict[str, Reason] = {}
        #: The training loss of each worker whose masked input is in the sum.
        self.losses: dict[str, float] = {}
        #: Workers whose input is in the sum but who did not answer the unmasking step.
        self.recovered: list[str] = []

    @property
    def active(self) -> list[str]:
        """The workers still in the round."""
        return [client.name for client in self._active.values()]

    async def run(self, tasks: Mapping[str, Fit | Query], *, weighted: bool) -> SecAggResult:
        """All four steps; ``tasks``: each worker's fit request, or the query whose answer is summed.

        Raises:
            SecAggError: if too few workers remain at a step for the threshold.
            ProtocolError: if the workers' messages do not fit together (a key or share is forged).
        """
        await self.advertise()
        await self.share()
        await self.mask(tasks, weighted=weighted)
        return await self.unmask()

    async def advertise(self) -> None:
        """Step 0: open the round on every worker and collect their public keys."""
        replies = await self._ask({u: SecAggStart(self.config, u) for u in self._active}, SecAggKeys)
        self._keys = self._server.receive_keys(reply.keys for reply in replies.values())

    async def share(self) -> None:
        """Step 1: hand each worker its neighbours' keys; collect the encrypted shares."""
        session = self.config.session
        replies = await self._ask({u: SecAggShare(session, self._keys[u]) for u in self._active}, SecAggShares)
        self._forwarded = self._server.receive_shares(reply.shares for reply in replies.values())

    async def mask(self, tasks: Mapping[str, Fit | Query], *, weighted: bool) -> None:
        """Step 2: relay the shares with each worker's task; sum the masked inputs that come back.

        ``weighted``: each worker masks its example count (FedAvg), else 1
        (an equal-weight mean, or a plain sum of query answers).
        """
        session = self.config.session
        requests = {
            u: SecAggMask(session, self._forwarded[u], tasks[client.name], weighted)
            for u, client in self._active.items()
        }
        replies = await self._ask(requests, SecAggMasked)
        size, dtype = self.config.length + 1, self.config.quantizer.dtype
        for u, reply in list(replies.items()):
            vector = reply.masked.vector
            if vector.size != size or vector.dtype != dtype:
                error = ProtocolError(f"masked input of {vector.size} {vector.dtype} values, expected {size} {dtype}")
                await self._leave(u, await self._failure(self._active[u], error))
                del replies[u]
        self._request = self._server.receive_masked_inputs(reply.masked for reply in replies.values())
        self.losses = {self._active[u].name: reply.loss for u, reply in replies.items()}

    async def unmask(self) -> SecAggResult:
        """Step 3: ask the survivors for the shares that strip the masks; the sum."""
        assert self._request is not None, "unmask comes after mask"
        request = SecAggUnmask(self.config.session, self._request)
        replies = await self._ask({u: request for u in self._active}, SecAggUnmasked)
        self.recovered = [name for name in self.losses if name not in self.active]
        return self._server.receive_unmask_shares(reply.shares for reply in replies.values())

    async def _ask(self, requests: Mapping[int, Message], expected: type[_Reply]) -> dict[int, _Reply]:
        """Send one step's requests at once; the replies that came in time, from the client they were sent to."""
        clients = [self._active[u] for u in requests]
        outcomes = await asyncio.gather(
            *(client.request(requests[u], timeout=self.timeout) for u, client in zip(requests, clients, strict=True)),
            return_exceptions=True,
        )
        replies: dict[int, _Reply] = {}
        for u, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, expected) and _sender(outcome) == u:
                replies[u] = outcome
                continue
            error = (
                outcome
                if isinstance(outcome, BaseException)
                else ProtocolError(f"answered as client {_sender(outcome)}, expected client {u}")
            )
            await self._leave(u, await self._failure(self._active[u], error))
        return replies

    async def _leave(self, u: int, reason: Reason) -> None:
        client = self._active.pop(u)
        self.failures[client.name] = reason
        logger.info("%s left the secure round: %s", client.name, reason)


def _sender(reply: Message) -> int:
    """The client id a secure aggregation reply says it comes from."""
    if isinstance(reply, SecAggKeys):
        return reply.keys.client
    if isinstance(reply, SecAggMasked):
        return reply.masked.client
    if isinstance(reply, (SecAggShares, SecAggUnmasked)):
        return reply.shares.client
    return -1
