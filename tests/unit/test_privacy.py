"""Differential privacy: clipping, Gaussian noise and the accountant against published values."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import gammaln, logsumexp

from syncfed.exceptions import ConfigError
from syncfed.privacy import (
    PrivacyAccountant,
    clip_update,
    gaussian_noise,
    noise_for_epsilon,
    noise_std,
    update_norm,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def updates(draw: st.DrawFn, dtype: type = np.float64) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3, unique=True))
    elements = st.floats(-1e3, 1e3, width=32)
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)
    return {name: draw(hnp.arrays(dtype, draw(shapes), elements=elements)) for name in names}


def plain_norm(update: dict[str, np.ndarray]) -> float:
    return float(np.linalg.norm(np.concatenate([np.ravel(a).astype(np.float64) for a in update.values()])))


# Clipping


@FAST
@given(update=updates(), clip=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_whole_update_and_keeps_its_direction(update: dict[str, np.ndarray], clip: float) -> None:
    clipped, norm = clip_update(update, clip)
    assert norm == pytest.approx(plain_norm(update), rel=1e-12, abs=1e-300)
    assert list(clipped) == list(update)
    if norm <= clip:
        assert all(clipped[name] is update[name] for name in update)
    else:
        assert plain_norm(clipped) == pytest.approx(clip, rel=1e-9)
        for name in update:
            np.testing.assert_allclose(clipped[name], update[name] * (clip / norm), rtol=1e-12)


@FAST
@given(update=updates(np.float32), clip=st.floats(1e-3, 1e3))
def test_clipping_float32_stays_float32_and_within_a_rounding_of_the_bound(
    update: dict[str, np.ndarray], clip: float
) -> None:
    clipped, _ = clip_update(update, clip)
    assert all(clipped[name].dtype == np.float32 for name in update)
    assert plain_norm(clipped) <= clip * (1 + 1e-6)


def test_clipping_refuses_bad_settings_and_values() -> None:
    with pytest.raises(ConfigError, match="^clip 0.0 must be a positive finite number$"):
        clip_update({"w": np.ones(2)}, 0.0)
    with pytest.raises(ConfigError, match="^tensor n has dtype int64: differential privacy needs float tensors$"):
        clip_update({"w": np.ones(2), "n": np.ones(2, np.int64)}, 1.0)
    with pytest.raises(ConfigError, match="^update has non-finite values and cannot be clipped$"):
        clip_update({"w": np.array([1.0, np.nan])}, 1.0)
    assert update_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0


# Noise


def test_noise_has_the_asked_standard_deviation_shapes_and_dtypes() -> None:
    like = {"w": np.zeros((400, 500), np.float32), "b": np.zeros(3)}
    noise = gaussian_noise(like, 0.5, np.random.default_rng(0))
    assert noise["w"].shape == (400, 500) and noise["w"].dtype == np.float32 and noise["b"].dtype == np.float64
    values = noise["w"].astype(np.float64).ravel()
    # With 200k draws the sample std is within 0.2% of sigma one time in three; 1% is five of those.
    assert np.std(values) == pytest.approx(0.5, rel=0.01)
    assert abs(np.mean(values)) < 5 * 0.5 / np.sqrt(values.size)


def test_distributed_noise_adds_up_to_the_central_noise() -> None:
    z, clip, n = 1.3, 0.7, 5
    assert noise_std(z, clip) == pytest.approx(z * clip)
    rng = np.random.default_rng(1)
    like = {"w": np.zeros(100_000)}
    total = sum(gaussian_noise(like, noise_std(z, clip, n), rng)["w"] for _ in range(n))
    assert np.std(total) == pytest.approx(z * clip, rel=0.01)


def test_noise_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="^noise standard deviation -1.0 must be a non-negative finite number$"):
        gaussian_noise({"w": np.zeros(2)}, -1.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="^number of noise sources 0 must be a positive integer$"):
        noise_std(1.0, 1.0, 0)


# The accountant


def sampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP of one sampled Gaussian step at an integer order, by the binomial expansion of
    Mironov, Talwar and Zhang 2019 (section 3.3), computed here independently of dp-accounting."""
    k = np.arange(alpha + 1)
    log_binomial = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binomial + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(terms)) / (alpha - 1)


def test_independent_rdp_matches_dp_accountings_published_values() -> None:
    # google/differential-privacy, python/dp_accounting/dp_accounting/rdp/rdp_privacy_accountant_test.py,
    # test_compute_rdp_poisson_sampled_gaussian: noise 2.5, q 0.01, 50 steps, orders 5 and 50.
    assert 50 * sampled_gaussian_rdp(0.01, 2.5, 5) == pytest.approx(2.18075656e-03, rel=1e-6)
    assert 50 * sampled_gaussian_rdp(0.01, 2.5, 50) == pytest.approx(2.38460375e-02, rel=1e-6)


def test_accountant_agrees_with_the_published_mnist_figure() -> None:
    # tensorflow/privacy tutorials/README.md, "Select Parameters": noise 1.12, batches of 256 out of
    # 60,000, 60 epochs, delta 1e-5: epsilon 2.92, with the conversion of Mironov 2017 (Proposition 3).
    q, sigma, delta = 256 / 60_000, 1.12, 1e-5
    steps = 60 * 60_000 // 256
    orders = np.arange(2, 257)
    rdp = np.array([steps * sampled_gaussian_rdp(q, sigma, int(a)) for a in orders])
    classic = np.min(rdp + np.log(1 / delta) / (orders - 1))
    assert classic == pytest.approx(2.92, abs=0.005)
    # dp-accounting converts with the tighter bound of Canonne, Kamath and Steinke 2020 (Proposition 12).
    tighter = np.min(rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1))
    accountant = PrivacyAccountant(sigma, q, delta)
    accountant.step(steps)
    assert accountant.epsilon() == pytest.approx(tighter, rel=0.005)
    assert accountant.epsilon() < 2.92


def test_full_participation_matches_the_gaussian_mechanisms_published_calibration() -> None:
    # rdp_privacy_accountant_test.py, test_compute_epsilon_delta_gaussian: noise 4.530877117 is (1, 1e-6)-DP.
    accountant = PrivacyAccountant(4.530877117, 1.0, 1e-6)
    accountant.step()
    assert accountant.epsilon() == pytest.approx(1.0, abs=1e-3)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    accountant = PrivacyAccountant(3.0, 0.1, 1e-5)
    by_rounds = [accountant.epsilon_after(rounds) for rounds in (0, 1, 10, 100)]
    assert by_rounds[0] == 0.0 and by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [PrivacyAccountant(z, 0.1, 1e-5).epsilon_after(40) for z in (2.0, 3.0, 5.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 3


def test_accountant_counts_rounds() -> None:
    accountant = PrivacyAccountant(2.0, 1.0, 1e-5)
    assert accountant.epsilon() == 0.0
    accountant.step(3)
    accountant.step()
    assert accountant.rounds == 4
    assert accountant.epsilon() == accountant.epsilon_after(4) > accountant.epsilon_after(3)


@pytest.mark.parametrize(("sampling_rate", "tolerance"), [(1.0, 1e-4), (0.01, 1e-2)])
def test_noise_for_epsilon_is_the_inverse_of_the_accountant(sampling_rate: float, tolerance: float) -> None:
    z = noise_for_epsilon(3.0, 100, sampling_rate, 1e-5, tolerance=tolerance)
    assert PrivacyAccountant(z, sampling_rate, 1e-5).epsilon_after(100) <= 3.0
    assert PrivacyAccountant(z - 2 * tolerance, sampling_rate, 1e-5).epsilon_after(100) > 3.0


def test_accountant_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"^sampling rate 0 must be in \(0, 1\]$"):
        PrivacyAccountant(1.0, 0, 1e-5)
    with pytest.raises(ConfigError, match=r"^delta 1.0 must be in \(0, 1\)$"):
        PrivacyAccountant(1.0, 0.1, 1.0)
    with pytest.raises(ConfigError, match="^noise multiplier 0.0 must be a positive finite number$"):
        PrivacyAccountant(0.0, 0.1, 1e-5)
    with pytest.raises(ConfigError, match="^number of rounds -1 must be a non-negative integer$"):
        PrivacyAccountant(1.0, 0.1, 1e-5).step(-1)


def test_a_missing_dp_accounting_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [name for name in sys.modules if name.startswith("dp_accounting")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ConfigError, match=r"^privacy accounting needs the dp-accounting package: pip install"):
        PrivacyAccountant(1.0, 0.1, 1e-5)
