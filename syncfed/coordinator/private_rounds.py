"""Private rounds: secure aggregation and differential privacy, the coordinator's side.

An I/O layer over two pure modules: :mod:`syncfed.secagg` (through
:class:`~syncfed.net.secure_round.SecureRound`) and :mod:`syncfed.privacy`
(DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"). A synchronous round calls :meth:`PrivateRounds.collect`
instead of sending plain fit requests, and gets back a
:class:`~syncfed.fold.PrivateFold`, read like any fold: the losses, the
example counts and the next global model. With fewer than ``t`` survivors a
secure round fails as a whole, and is retried like any round below its quorum.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..aggregation import check_tensors
from ..config import CoordinatorConfig
from ..exceptions import AggregationError, ConfigError, ProtocolError, SecAggError
from ..failure import Failure
from ..finite import nonfinite
from ..fold import PrivateFold, floating
from ..net.link import WorkerLink
from ..net.secure_round import SESSION_SIZE, FailureHandler, SecureRound, secagg_threshold
from ..privacy import PrivacyAccountant, gaussian_noise, noise_for_epsilon, noise_std, update_norm
from ..protocol import Fit, FitResult
from ..secagg import SecAggConfig, flatten
from ..strategies import Strategy
from ..tensors import Weights

__all__ = ["PrivateRounds", "secure_agg_line"]

logger = logging.getLogger("syncfed.secure_round")

#: Standard deviations of a worker's own noise that the secure aggregation
#: range leaves room for in distributed DP: a value beyond it is clipped with
#: probability about 1e-15.
NOISE_ROOM = 8.0
#: Slack on the clip when checking a central-mode update's norm: the worker's
#: cast back to float32 may leave it a relative 1e-7 above.
NORM_SLACK = 1e-5


def secure_agg_line(config: CoordinatorConfig) -> str:
    """The start line of a run under ``--secure-agg``: what stays hidden, from how many workers, and how many
    of them may drop out of a round."""
    n = config.sample_size(len(config.workers))
    t = secagg_threshold(n, config.secagg_threshold)
    among = f"{n} workers" if n == len(config.workers) else f"{n} of the {len(config.workers)} workers"
    tolerance = "no dropout" if t >= n else f"{n - t} dropout{'s' if n - t > 1 else ''}"
    return (
        f"Secure aggregation: the coordinator learns only the sum of each round's updates from {among}, never one"
        f" worker's update (losses and example counts are not hidden); a round needs {t} of them to unmask its sum"
        f" (tolerates {tolerance})"
    )


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
        streamed = strategy.streamed()
        if streamed is None or strategy.uses_control:
            raise ConfigError(f"strategy {strategy.name} needs more than the mean of the updates")
        self.config = config
        self.strategy = streamed
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
        if config.secure_agg:
            report(secure_agg_line(config))
        self._rng = np.random.default_rng()  # seeded by the operating system: see the module docstring
        self._last: dict[str, Any] = {}

    def exhausted(self, round_number: int) -> bool:
        """Whether round ``round_number`` would spend more than ``--dp-target-epsilon``; reports the stop.

        Every round of the run so far counts, resumed ones included: each was
        a private round with the same noise.
        """
        if not self.over_budget(round_number):
            return False
        assert self.accountant is not None and self.config.dp_target_epsilon is not None, "over_budget said so"
        after, spent = self.accountant.epsilon_after(round_number), self.accountant.epsilon_after(round_number - 1)
        self.report(
            f"Privacy budget reached: round {round_number} would spend epsilon {after:.3f}, above the target"
            f" {self.config.dp_target_epsilon:g} at delta {self.accountant.delta:g}; stopping after round"
            f" {round_number - 1} (epsilon {spent:.3f})"
        )
        return True

    def over_budget(self, round_number: int) -> bool:
        """Whether round ``round_number`` would spend more than ``--dp-target-epsilon``, silently: the round
        before it is the run's last, and is evaluated as the last round is."""
        target = self.config.dp_target_epsilon
        return (
            self.accountant is not None and target is not None and self.accountant.epsilon_after(round_number) > target
        )

    async def collect(
        self,
        selected: Sequence[WorkerLink],
        fit: Callable[[WorkerLink], Fit],
        reference: Weights,
        examples: Mapping[str, int],
        failure: FailureHandler[Failure],
    ) -> tuple[PrivateFold, dict[str, Failure]]:
        """One private round over ``selected``: its fold, and why each selected worker not in it failed.

        ``fit`` makes a worker's plain fit request; its plan is changed here to
        ask for the update, clipped and noised as configured. ``examples``
        holds each worker's example count (from its ``info``), which bounds the
        counts a secure round can sum.
        """
        n = len(selected)
        fits = {client.name: self._private_fit(fit(client), n) for client in selected}
        floats = floating(reference)
        if self.config.secure_agg:
            total, count, losses, failures = await self._secure(selected, fits, floats, examples, failure)
        else:
            total, count, losses, failures = await self._plain(selected, fits, floats, failure)
        mean = None if total is None else self._noised(total, n, len(losses)) / count
        if mean is not None and not np.isfinite(mean).all():
            # A masked sum cannot be taken apart: the whole round fails, and is retried like one below its quorum.
            reason = Failure("round", "the round's summed update is not finite")
            mean, losses, failures = None, {}, failures | dict.fromkeys(losses, reason)
        counts = {name: examples.get(name, 0) for name in losses}
        summed = count if self.config.secure_agg and self.strategy.weighted and self.config.dp is None else None
        return PrivateFold(self.strategy, reference, mean, losses, counts, summed), failures

    def metrics(self, round_number: int) -> dict[str, Any]:
        """The privacy fields of round ``round_number``'s metrics event; reports them in one line: how many
        updates the secure sum holds, the epsilon spent so far."""
        event = dict(self._last)
        said = []
        secure = self._last.get("secure_agg")
        if secure is not None:
            recovered = secure["recovered"]
            unmasked = f"; {', '.join(recovered)} dropped, unmasked with the others' shares" if recovered else ""
            said.append(
                f"secure aggregation summed {secure['summed']} of {secure['workers']} updates"
                f" (threshold {secure['threshold']}{unmasked})"
            )
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
            said.append(f"privacy spent epsilon {epsilon:.3f} at delta {self.accountant.delta:g}")
        if said:
            self.report(f"Round {round_number}: {'; '.join(said)}")
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
        selected: Sequence[WorkerLink],
        fits: Mapping[str, Fit],
        floats: Weights,
        examples: Mapping[str, int],
        failure: FailureHandler[Failure],
    ) -> tuple[np.ndarray | None, int, dict[str, float], dict[str, Failure]]:
        n = len(selected)
        t = secagg_threshold(n, self.config.secagg_threshold)
        if n < 2 or t > n:
            reason = Failure("round", f"secure aggregation needs {max(t, 2)} workers, {n} selected")
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
            aborted = Failure("round", f"secure aggregation aborted: {exc}")
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
        self,
        selected: Sequence[WorkerLink],
        fits: Mapping[str, Fit],
        floats: Weights,
        failure: FailureHandler[Failure],
    ) -> tuple[np.ndarray | None, int, dict[str, float], dict[str, Failure]]:
        """A DP round without secure aggregation: the workers' clipped updates, summed here."""
        outcomes = await asyncio.gather(
            *(client.request(fits[client.name], timeout=self.config.round_timeout) for client in selected),
            return_exceptions=True,
        )
        total = np.zeros(sum(array.size for array in floats.values()))
        losses: dict[str, float] = {}
        failures: dict[str, Failure] = {}
        for client, outcome in zip(selected, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures[client.name] = await failure(client, outcome)
                continue
            assert isinstance(outcome, FitResult)
            reason = self._invalid(outcome.weights, floats)
            if reason is not None:
                failures[client.name] = Failure("invalid update", reason)
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
