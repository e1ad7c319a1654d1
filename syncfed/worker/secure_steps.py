"""The worker's four steps of a secure aggregation round (``syncfed.secagg``, Bonawitz et al. 2017).

The round's cryptography is pure (``syncfed.secagg``) and which round is open
on a connection is a session rule (``syncfed.protocol.session_rules``); what is here
is what each step asks of the worker: advertise keys, share them, train or
answer a query and mask the result, and unmask.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from .. import analytics
from ..config import WorkerConfig
from ..exceptions import ConfigError, ProtocolError, RequestFailed, SecAggError
from ..protocol import (
    FitResult,
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
from ..protocol.session_rules import SessionRules
from ..secagg import SecAggClient, flatten
from .compute import Compute

__all__ = ["SecureStep", "SecureSteps"]

logger = logging.getLogger("syncfed.worker")

SecureStep = SecAggStart | SecAggShare | SecAggMask | SecAggUnmask


class SecureSteps:
    """One connection's side of its secure aggregation rounds, over the worker's compute."""

    def __init__(self, config: WorkerConfig, compute: Compute, rules: SessionRules) -> None:
        self.config = config
        self.compute = compute
        self.rules = rules

    async def run(self, message: SecureStep) -> Message:
        """The reply to one step; whatever stops it is an error reply.

        A refusal below the threshold (or under ``--min-group-size``) is
        ``refused``; a round this worker cannot join is ``incompatible``.
        """
        try:
            if isinstance(message, SecAggStart):
                return self.start(message)
            secure_round = self.rules.round_for(message.session)
            if isinstance(message, SecAggShare):
                # k key agreements and encryptions: a thread, so pings flow whatever k the round has.
                return SecAggShares(await asyncio.to_thread(secure_round.client.share_keys, message.keys))
            if isinstance(message, SecAggMask):
                return await self.mask(message, secure_round.client, secure_round.config.clip)
            self.rules.close_round()
            return SecAggUnmasked(secure_round.client.unmask(message.request))
        except SecAggError as exc:
            raise RequestFailed("refused", str(exc)) from None
        except ProtocolError as exc:
            raise RequestFailed(exc.code, str(exc)) from None
        except ConfigError as exc:
            raise RequestFailed("incompatible", str(exc)) from None

    def start(self, message: SecAggStart) -> SecAggKeys:
        """Open the round on this connection and advertise this client's keys."""
        limit = self.config.max_secagg_clients
        if message.config.num_clients > limit:
            raise RequestFailed(
                "refused", f"round of {message.config.num_clients} clients exceeds limit of {limit} clients"
            )
        # O(n + k) for this client's neighbours alone: never the whole graph.
        client = SecAggClient(message.config, message.client)
        self.rules.open_round(message.config, client)
        return SecAggKeys(client.advertise_keys())

    async def mask(self, message: SecAggMask, client: SecAggClient, clip: float) -> SecAggMasked:
        """Train as the step's fit asks and mask the float tensors' update, or answer its query and mask the sums."""
        if isinstance(message.task, Query):
            started = time.perf_counter()
            vector = await self.summed_answer(message.task, clip)
            masked = await asyncio.to_thread(client.mask_input, message.shares, vector, 1)
            return SecAggMasked(masked, 0.0, time.perf_counter() - started)
        reply = await self.compute.run(message.task)
        assert isinstance(reply, FitResult)
        vector = flatten({n: a for n, a in reply.weights.items() if np.issubdtype(a.dtype, np.floating)})
        clipped = int(np.count_nonzero(np.abs(vector) > clip))
        if clipped:
            logger.warning("%d update values beyond +-%g clipped before masking", clipped, clip)
        count = reply.num_examples if message.weighted else 1
        masked = await asyncio.to_thread(client.mask_input, message.shares, vector, count)
        return SecAggMasked(masked, reply.loss, reply.seconds)

    async def summed_answer(self, query: Query, clip: float) -> np.ndarray:
        """The answer to ``query`` as the sums secure aggregation adds up, all within the round's ``clip``.

        Beyond the clip the quantizer would change the answer without a word,
        so this refuses instead: the coordinator sized the round for fewer examples.
        """
        vector = analytics.sums(query, await self.compute.query(query))
        if float(np.abs(vector).max()) > clip:  # the value itself stays private
            raise RequestFailed("incompatible", f"the answer exceeds the secure round's limit of {clip:.6g}")
        return vector
