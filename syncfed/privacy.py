"""Differential privacy for federated averaging: clipping, Gaussian noise and a privacy accountant.

User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): each client clips its update to L2 norm ``C``,
so one client changes the sum of the clipped updates by at most ``C``, and
Gaussian noise of standard deviation ``z * C`` is added to that sum, ``z``
being the noise multiplier.

- central: the coordinator adds the noise to the sum; it sees the clipped
  updates (or, with secure aggregation, only their sum) before noise.
- distributed: each of ``n`` clients adds noise of standard deviation
  ``z * C / sqrt(n)`` before secure aggregation; the ``n`` shares add up to
  ``z * C``, so no party sees an un-noised sum. If only ``m < n`` clients'
  noise reaches the sum, its multiplier is ``z * sqrt(m / n)``: account for
  that round with the smaller multiplier.

:class:`PrivacyAccountant` composes the sampled Gaussian mechanism over
rounds in Rényi DP (Mironov 2017, "Rényi Differential Privacy"; Mironov,
Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism") and converts to ``(epsilon, delta)``. It wraps Google's
``dp-accounting`` package rather than hand-written math; install it with
``pip install 'syncfed[privacy]'``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from .exceptions import ConfigError
from .tensors import Weights

__all__ = [
    "update_norm",
    "clip_update",
    "gaussian_noise",
    "noise_std",
    "PrivacyAccountant",
    "noise_for_epsilon",
]


def _check_float_tensors(weights: Mapping[str, np.ndarray]) -> None:
    for name, array in weights.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ConfigError(f"tensor {name} has dtype {array.dtype}: differential privacy needs float tensors")


def _check_positive(value: float, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ConfigError(f"{what} {value!r} must be a positive finite number")


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a whole update, all tensors together, computed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(array, dtype=np.float64))) for array in delta.values()))


def clip_update(delta: Mapping[str, np.ndarray], clip: float) -> tuple[Weights, float]:
    """Scale an update down to L2 norm at most ``clip``; return it and its norm before clipping.

    Over the whole update rather than per tensor, as in DP-FedAvg, so the
    bound on one client's influence is ``clip``. An update within the bound is
    returned unchanged; the cast back to float32 may leave a clipped norm a
    relative 1e-7 above ``clip``.

    Raises:
        ConfigError: if ``clip`` is not positive, a tensor is not float, or a value is not finite.
    """
    _check_positive(clip, "clip")
    _check_float_tensors(delta)
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ConfigError("update has non-finite values and cannot be clipped")
    if norm <= clip:
        return dict(delta), norm
    factor = clip / norm
    return {name: (array.astype(np.float64) * factor).astype(array.dtype) for name, array in delta.items()}, norm


def gaussian_noise(shape_like: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Weights:
    """Independent Gaussian noise of standard deviation ``std`` for every value, in the tensors' shapes and dtypes.

    Raises:
        ConfigError: if ``std`` is negative or not finite, or a tensor is not float.
    """
    if not (isinstance(std, (int, float)) and 0 <= std < math.inf):
        raise ConfigError(f"noise standard deviation {std!r} must be a non-negative finite number")
    _check_float_tensors(shape_like)
    return {name: rng.normal(0.0, std, array.shape).astype(array.dtype) for name, array in shape_like.items()}


def noise_std(noise_multiplier: float, clip: float, parties: int = 1) -> float:
    """The standard deviation each of ``parties`` independent noise sources adds so their sum has ``z * C``.

    1 for central DP (the coordinator), the number of clients for distributed DP.

    Raises:
        ConfigError: if a setting is out of range.
    """
    _check_positive(noise_multiplier, "noise multiplier")
    _check_positive(clip, "clip")
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ConfigError(f"number of noise sources {parties!r} must be a positive integer")
    return noise_multiplier * clip / math.sqrt(parties)


def _dp_accounting() -> ModuleType:
    """Import ``dp-accounting`` on first use, so the rest of syncfed runs without it."""
    try:
        importlib.import_module("dp_accounting.rdp")
        return importlib.import_module("dp_accounting")
    except ImportError:
        raise ConfigError(
            "privacy accounting needs the dp-accounting package: pip install 'syncfed[privacy]'"
        ) from None


def _check_accounting(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    _check_positive(noise_multiplier, "noise multiplier")
    if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
        raise ConfigError(f"sampling rate {sampling_rate!r} must be in (0, 1]")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta {delta!r} must be in (0, 1)")


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"number of rounds {rounds!r} must be a non-negative integer")


def _rounds_event(dp: ModuleType, noise_multiplier: float, sampling_rate: float, rounds: int) -> Any:
    """``rounds`` compositions of the Gaussian mechanism on a Poisson sample of the clients."""
    sampled = dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier))
    return dp.SelfComposedDpEvent(sampled, rounds)


class PrivacyAccountant:
    """The ``(epsilon, delta)`` that DP-FedAvg rounds spend, by Rényi DP of the sampled Gaussian mechanism.

    ``sampling_rate`` is the chance each client takes part in a round (clients
    per round over all clients; 1.0 when every client takes part in every
    round, which gives no amplification). The analysis assumes each client is
    sampled independently (Poisson sampling), as McMahan et al. 2018 do.

    Usage::

        accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5)
        while accountant.epsilon_after(accountant.rounds + 1) <= target_epsilon:
            run_round()
            accountant.step()
            log(accountant.epsilon())

    Raises:
        ConfigError: if a setting is out of range, or dp-accounting is not installed.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        _check_accounting(noise_multiplier, sampling_rate, delta)
        self._dp = _dp_accounting()
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self._rounds = 0

    @property
    def rounds(self) -> int:
        """Rounds accounted for so far."""
        return self._rounds

    def step(self, rounds: int = 1) -> None:
        """Account for ``rounds`` more rounds."""
        _check_rounds(rounds)
        self._rounds += rounds

    def epsilon(self) -> float:
        """Epsilon spent so far, at this accountant's delta."""
        return self.epsilon_after(self._rounds)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon once ``rounds`` rounds in all have run (not ``rounds`` more): ask before a round to stop in time."""
        _check_rounds(rounds)
        if rounds == 0:
            return 0.0
        accountant = self._dp.rdp.RdpAccountant()
        accountant.compose(_rounds_event(self._dp, self.noise_multiplier, self.sampling_rate, rounds))
        return float(accountant.get_epsilon(self.delta))


def noise_for_epsilon(
    target_epsilon: float, rounds: int, sampling_rate: float, delta: float, *, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier, to within ``tolerance``, whose ``rounds`` rounds spend at most ``target_epsilon``.

    Uses dp-accounting's calibration (Brent's method, then a check that the
    answer does not exceed the target), with the same accountant as
    :class:`PrivacyAccountant`.

    Raises:
        ConfigError: if a setting is out of range, or dp-accounting is not installed.
    """
    _check_positive(target_epsilon, "target epsilon")
    _check_positive(tolerance, "tolerance")
    _check_accounting(1.0, sampling_rate, delta)
    _check_rounds(rounds)
    if rounds == 0:
        raise ConfigError("number of rounds must be positive to calibrate noise")
    dp = _dp_accounting()
    multiplier = dp.mechanism_calibration.calibrate_dp_mechanism(
        dp.rdp.RdpAccountant,
        lambda z: _rounds_event(dp, z, sampling_rate, rounds),
        target_epsilon,
        delta,
        tol=tolerance,
    )
    return float(multiplier)
