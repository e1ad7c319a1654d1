"""Private rounds: secure aggregation and differential privacy over real workers.

The coordinator's side of both defences, an I/O layer over two pure modules:
:mod:`syncfed.secagg` (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning") and :mod:`syncfed.privacy`
(DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"). The coordinator calls :meth:`PrivateRounds.collect`
instead of sending plain fit requests, and gets back what its own fold
gives: the losses, the example counts and the next global model.

A secure round over the ``n`` workers a round selected, each request under
the round timeout (:class:`SecureRound`):

1. ``secagg_start``: the round's settings and each worker's client id; the
   workers answer with their public keys.
2. ``secagg_share``: each worker gets its neighbours' keys and answers with
   Shamir shares of its secrets, encrypted for each neighbour; the
   coordinator relays ciphertexts it cannot read.
3. ``secagg_mask``: each worker gets the shares addressed to it and a fit
   request; it trains and answers with its update (relative to the global
   model) and its example count, quantized and masked. (``python -m syncfed
   analytics --secure-agg`` sends a query instead, whose answer is masked.)
4. ``secagg_unmask``: the survivors (those who sent a masked input) reveal
   the shares that remove the masks; the coordinator keeps only the sum.

A worker lost after step 3 is still in the sum: the survivors' shares
rebuild its self mask. With fewer than ``t`` survivors the round stops with
:class:`~syncfed.exceptions.SecAggError` having learnt nothing, and the
coordinator retries it like any round below its quorum.

Differential privacy asks each worker to clip its update to L2 norm ``C``
and, in distributed mode, to add noise of standard deviation ``z C / sqrt(n)``;
in central mode the coordinator adds noise of standard deviation ``z C`` to
the sum. The choices, explained for users in ``docs/privacy.md``:

- Under DP every worker counts once (McMahan et al.'s estimator with equal
  weights): weighting by example counts would let one worker's influence,
  and so the noise needed, grow with the largest count.
- The noised sum is divided by the number ``m`` of workers in it, not by a
  fixed expected number as in McMahan et al.: who took part is known to the
  coordinator and written in the metrics anyway.
- In distributed mode, when only ``m`` of the ``n`` noised updates reach the
  sum, the coordinator adds the missing ``(n - m) / n`` of the noise variance,
  so the released model always carries noise ``z C`` and the accountant's
  figure holds.
- Private rounds carry float tensors only; integer tensors (batch norm's
  counters) keep the global model's value.
- Noise comes from a generator seeded by the operating system, never from the
  run's public seed, whose noise anyone could subtract: runs with DP are not
  reproducible bit for bit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from .aggregation import check_tensors, from_float64
from .client import WorkerClient
from .config import CoordinatorConfig
from .exceptions import AggregationError, ConfigError, ProtocolError, SecAggError
from .finite import nonfinite
from .privacy import PrivacyAccountant, gaussian_noise, noise_for_epsilon, noise_std, update_norm
from .protocol import (
    Fit,
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
from .secagg import (
    ForwardedShares,
    NeighbourKeys,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    UnmaskRequest,
    flatten,
    unflatten,
)
from .strategies import MeanStrategy, Strategy
from .tensors import Weights

__all__ = ["Failure", "secagg_threshold", "SecureRound", "PrivateFold", "PrivateRounds"]

logger = logging.getLogger("syncfed.secure_round")

#: Turns a failed request into the reason a worker left the round, closing or
#: backing off the worker as the coordinator does; re-raises the unexpected.
Failure = Callable[[WorkerClient, BaseException], Awaitable[str]]

#: Random bytes binding one round's keys, masks and ciphertexts together.
SESSION_SIZE = 32
#: Standard deviations of a worker's own noise that the secure aggregation
#: range leaves room for in distributed DP: a value beyond it is clipped with
#: probability about 1e-15.
NOISE_ROOM = 8.0
#: Slack on the clip when checking a central-mode update's norm: the worker's
#: cast back to float32 may leave it a relative 1e-7 above.
NORM_SLACK = 1e-5

_Reply = TypeVar("_Reply", SecAggKeys, SecAggShares, SecAggMasked, SecAggUnmasked)


def secagg_threshold(num_clients: int, configured: int | None = None) -> int:
    """``t`` for a round of ``n`` workers: the configured one, else ``ceil(2n / 3)``.

    Two thirds tolerates a third of the workers dropping out and stays above
    the half that the protocol needs (see :class:`~syncfed.secagg.SecAggConfig`).
    """
    return configured if configured is not None else -(-2 * num_clients // 3)


def _floating(weights: Mapping[str, np.ndarray]) -> Weights:
    return {name: array for name, array in weights.items() if np.issubdtype(array.dtype, np.floating)}


class SecureRound:
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
        self, clients: Sequence[WorkerClient], config: SecAggConfig, *, timeout: float, failure: Failure
    ) -> None:
        if len(clients) != config.num_clients:
            raise ConfigError(f"{len(clients)} workers do not match a round of {config.num_clients} clients")
        self.config = config
        self.timeout = timeout
        self._failure = failure
        self._server = SecAggServer(config)
        self._active: dict[int, WorkerClient] = dict(enumerate(clients))
        self._keys: dict[int, NeighbourKeys] = {}
        self._forwarded: dict[int, ForwardedShares] = {}
        self._request: UnmaskRequest | None = None
        #: Why each worker that left the round did.
        self.failures: dict[str, str] = {}
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

    async def _leave(self, u: int, reason: str) -> None:
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


class PrivateFold:
    """A private round's outcome, read like the coordinator's own fold: ``losses``, ``examples``, :meth:`aggregate`.

    ``kept`` is always empty: individual updates stay private, so the
    evaluator scores the federated model only.
    """

    def __init__(
        self,
        strategy: MeanStrategy,
        reference: Weights,
        mean: np.ndarray | None,
        losses: Mapping[str, float],
        examples: Mapping[str, int],
        total_examples: int | None = None,
    ) -> None:
        """``mean``: the round's mean update of the float tensors, flat (see :func:`~syncfed.secagg.flatten`);
        ``total_examples``: the example count the secure sum revealed, when it summed counts."""
        self.strategy = strategy
        self.reference = reference
        self.mean = mean
        self.losses = dict(losses)
        self.examples = dict(examples)
        self.total_examples = total_examples
        # Empty: private rounds refuse --compress, which would garble a masked update or unclip a clipped one.
        self.compression_errors: dict[str, float] = {}
        self.kept: dict[str, Weights] = {}

    def aggregate(self, num_workers: int) -> Weights:
        """The next global model: the strategy's step from the global model and the mean update.

        Raises:
            AggregationError: if no worker contributed.
        """
        if self.mean is None:
            raise AggregationError("no updates to aggregate")
        # Zero-stride float64 templates: the update is added to the weights in float64, as RunningMean does.
        like = {name: np.broadcast_to(np.zeros(()), array.shape) for name, array in _floating(self.reference).items()}
        delta = unflatten(self.mean, like)
        mean = {
            name: from_float64(array + delta[name], array.dtype) if name in delta else array
            for name, array in self.reference.items()
        }
        return self.strategy.step(self.reference, mean, participants=len(self.losses), num_workers=num_workers)


class PrivateRounds:
    """A run's private rounds: the settings, the privacy accountant, the figures of the latest round.

    Usage (what the coordinator does)::

        private = PrivateRounds(config, strategy, report=print)
        for round_number in ...:
            if private.exhausted(round_number):
                break
            fold, failures = await private.collect(selected, make_fit, weights, examples, why)
            weights = fold.aggregate(len(workers))
            event.update(private.metrics(round_number))

    Raises:
        ConfigError: if the strategy needs more than the mean of the updates,
            or differential privacy is on and dp-accounting is not installed.
    """

    def __init__(self, config: CoordinatorConfig, strategy: Strategy, *, report: Callable[[str], None] = print) -> None:
        if not isinstance(strategy, MeanStrategy) or strategy.uses_control:
            raise ConfigError(f"strategy {strategy.name} needs more than the mean of the updates")
        self.config = config
        self.strategy = strategy
        self.report = report
        self.noise_multiplier = 0.0
        self.accountant: PrivacyAccountant | None = None
        if config.dp is not None:
            rate, delta, target = config.dp_sampling_rate, config.dp_delta, config.dp_target_epsilon
            if config.dp_noise_multiplier is not None:
                self.noise_multiplier = config.dp_noise_multiplier
            else:
                assert target is not None, "the config asks for a noise multiplier or a target"
                self.noise_multiplier = noise_for_epsilon(target, config.training_rounds, rate, delta)
                report(
                    f"Noise multiplier {self.noise_multiplier:.4g}: {config.training_rounds} rounds at sampling rate"
                    f" {rate:g} spend epsilon {target:g} at delta {delta:g}"
                )
            self.accountant = PrivacyAccountant(self.noise_multiplier, rate, delta)
        self._rng = np.random.default_rng()  # seeded by the operating system: see the module docstring
        self._last: dict[str, Any] = {}

    def exhausted(self, round_number: int) -> bool:
        """Whether round ``round_number`` would spend more than ``--dp-target-epsilon``; reports the stop.

        Every round of the run so far counts, resumed ones included: each was
        a private round with the same noise.
        """
        target = self.config.dp_target_epsilon
        if self.accountant is None or target is None:
            return False
        after = self.accountant.epsilon_after(round_number)
        if after <= target:
            return False
        spent = self.accountant.epsilon_after(round_number - 1)
        self.report(
            f"Privacy budget reached: round {round_number} would spend epsilon {after:.3f}, above the target"
            f" {target:g} at delta {self.accountant.delta:g}; stopping after round {round_number - 1}"
            f" (epsilon {spent:.3f})"
        )
        return True

    async def collect(
        self,
        selected: Sequence[WorkerClient],
        fit: Callable[[WorkerClient], Fit],
        reference: Weights,
        examples: Mapping[str, int],
        failure: Failure,
    ) -> tuple[PrivateFold, dict[str, str]]:
        """One private round over ``selected``: its fold, and why each selected worker not in it failed.

        ``fit`` makes a worker's plain fit request; its plan is changed here to
        ask for the update, clipped and noised as configured. ``examples``
        holds each worker's example count (from its ``info``), which bounds the
        counts a secure round can sum.
        """
        n = len(selected)
        fits = {client.name: self._private_fit(fit(client), n) for client in selected}
        floats = _floating(reference)
        if self.config.secure_agg:
            total, count, losses, failures = await self._secure(selected, fits, floats, examples, failure)
        else:
            total, count, losses, failures = await self._plain(selected, fits, floats, failure)
        mean = None if total is None else self._noised(total, n, len(losses)) / count
        if mean is not None and not np.isfinite(mean).all():
            # A masked sum cannot be taken apart: the whole round fails, and is retried like one below its quorum.
            reason = "the round's summed update is not finite"
            mean, losses, failures = None, {}, failures | {name: reason for name in losses}
        counts = {name: examples.get(name, 0) for name in losses}
        summed = count if self.config.secure_agg and self.strategy.weighted and self.config.dp is None else None
        return PrivateFold(self.strategy, reference, mean, losses, counts, summed), failures

    def metrics(self, round_number: int) -> dict[str, Any]:
        """The privacy fields of round ``round_number``'s metrics event; reports the epsilon spent so far."""
        event = dict(self._last)
        if self.accountant is not None:
            epsilon = self.accountant.epsilon_after(round_number)
            event |= {
                "dp": self.config.dp,
                "epsilon": epsilon,
                "delta": self.accountant.delta,
                "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.accountant.sampling_rate,
                "clip": self.config.dp_clip,
            }
            self.report(f"Round {round_number}: privacy spent epsilon {epsilon:.3f} at delta {self.accountant.delta:g}")
        return {"privacy": event}

    def _private_fit(self, fit: Fit, parties: int) -> Fit:
        """``fit`` asking for the update, clipped (and, in distributed mode, noised) when DP is on."""
        config = self.config
        changes: dict[str, Any] = {"delta": True}
        if config.dp is not None:
            changes["clip"] = config.dp_clip
            if config.dp == "distributed":
                changes["noise_std"] = noise_std(self.noise_multiplier, config.dp_clip, parties)
        return dataclasses.replace(fit, plan=dataclasses.replace(fit.plan, **changes))

    def _range(self, parties: int) -> float:
        """The values a secure round's quantizer keeps: the clip of every value of an update."""
        config = self.config
        if config.dp is None:
            return config.secagg_clip
        if config.dp == "central":
            return config.dp_clip  # no value of a vector exceeds its L2 norm
        return config.dp_clip + NOISE_ROOM * noise_std(self.noise_multiplier, config.dp_clip, parties)

    def _noised(self, total: np.ndarray, selected: int, contributed: int) -> np.ndarray:
        """The sum with the coordinator's noise: all of it (central), or what dropped workers' shares lacked."""
        config = self.config
        if config.dp == "central":
            std = noise_std(self.noise_multiplier, config.dp_clip)
        elif config.dp == "distributed" and contributed < selected:
            std = noise_std(self.noise_multiplier, config.dp_clip, selected) * (selected - contributed) ** 0.5
        else:
            return total
        return total + gaussian_noise({"sum": total}, std, self._rng)["sum"]

    async def _secure(
        self,
        selected: Sequence[WorkerClient],
        fits: Mapping[str, Fit],
        floats: Weights,
        examples: Mapping[str, int],
        failure: Failure,
    ) -> tuple[np.ndarray | None, int, dict[str, float], dict[str, str]]:
        n = len(selected)
        t = secagg_threshold(n, self.config.secagg_threshold)
        if n < 2 or t > n:
            reason = f"secure aggregation needs {max(t, 2)} workers, {n} selected"
            return None, 0, {}, {client.name: reason for client in selected}
        weighted = self.strategy.weighted and self.config.dp is None
        max_count = max(examples[client.name] for client in selected) if weighted else 1
        config = SecAggConfig(
            num_clients=n,
            threshold=t,
            length=sum(array.size for array in floats.values()),
            clip=self._range(n),
            session=os.urandom(SESSION_SIZE),
            bits=32 if max_count <= (2**31 - 1) // n else 64,
            max_count=max_count,
        )
        secure = SecureRound(selected, config, timeout=self.config.round_timeout, failure=failure)
        try:
            result = await secure.run(fits, weighted=weighted)
        except (SecAggError, ProtocolError) as exc:
            logger.info("secure aggregation aborted: %s", exc)
            aborted = f"secure aggregation aborted: {exc}"
            return None, 0, {}, secure.failures | {name: aborted for name in secure.active}
        self._last = {
            "secure_agg": {"workers": n, "threshold": t, "summed": len(result.clients), "recovered": secure.recovered}
        }
        logger.info(
            "secure round: %d of %d workers summed (threshold %d), %d recovered from shares",
            len(result.clients),
            n,
            t,
            len(secure.recovered),
        )
        return result.weighted_sum, result.count, secure.losses, secure.failures

    async def _plain(
        self, selected: Sequence[WorkerClient], fits: Mapping[str, Fit], floats: Weights, failure: Failure
    ) -> tuple[np.ndarray | None, int, dict[str, float], dict[str, str]]:
        """A DP round without secure aggregation: the workers' clipped updates, summed here."""
        outcomes = await asyncio.gather(
            *(client.request(fits[client.name], timeout=self.config.round_timeout) for client in selected),
            return_exceptions=True,
        )
        total = np.zeros(sum(array.size for array in floats.values()))
        losses: dict[str, float] = {}
        failures: dict[str, str] = {}
        for client, outcome in zip(selected, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures[client.name] = await failure(client, outcome)
                continue
            assert isinstance(outcome, FitResult)
            reason = self._invalid(outcome.weights, floats)
            if reason is not None:
                failures[client.name] = f"invalid update: {reason}"
                continue
            total += flatten(outcome.weights)
            losses[client.name] = outcome.loss
        self._last = {}
        return (total if losses else None), len(losses), losses, failures

    def _invalid(self, update: Weights, floats: Weights) -> str | None:
        """Why a DP update cannot be summed, if it cannot: other tensors than the model's, or (central) not clipped."""
        try:
            check_tensors(update, floats, what="the update", against="the model's float tensors")
        except AggregationError as exc:
            return str(exc)
        reason = nonfinite(update)  # a NaN would pass the norm check below, and spread to every value of the sum
        if reason is not None:
            return reason
        clip = self.config.dp_clip
        if self.config.dp == "central" and update_norm(update) > clip * (1 + NORM_SLACK):
            return f"its L2 norm {update_norm(update):.6g} exceeds the clip {clip:g}"
        return None
