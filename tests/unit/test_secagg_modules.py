"""secagg.py is the protocol; Shamir sharing and the masking arithmetic live in pure modules of their own.

Old imports from ``syncfed.secagg`` must keep giving the same objects, and
none of the three modules may start the networking layer.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from syncfed import masking, secagg, secret_sharing


def test_secagg_re_exports_the_moved_names_as_the_same_objects() -> None:
    for module in (masking, secret_sharing):
        for name in module.__all__:
            if name in secagg.__all__:
                assert getattr(secagg, name) is getattr(module, name), name
    moved = {"PRIME", "SECRET_SIZE", "SHARE_SIZE", "split_secret", "combine_shares", "MAX_CLIENTS"}
    moved |= {"neighbour_graph", "neighbours_of", "Quantizer", "flatten", "unflatten"}
    assert moved <= set(secagg.__all__)
    assert all(hasattr(secagg, name) for name in secagg.__all__)


def test_the_secure_aggregation_modules_do_not_start_the_networking_layer() -> None:
    code = (
        "import sys, syncfed.secret_sharing, syncfed.masking, syncfed.secagg; "
        "print(sorted(m for m in ('asyncio', 'websockets') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "[]"


def test_the_protocol_masks_block_by_block_at_its_own_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_secagg.py sets ``secagg._BLOCK``: the protocol must pass it to :func:`masking.apply_mask` at call time."""
    seen: list[int] = []
    real = masking.apply_mask

    def spy(ring: np.ndarray, seed: bytes, *, block: int, subtract: bool = False) -> None:
        seen.append(block)
        real(ring, seed, block=block, subtract=subtract)

    monkeypatch.setattr(secagg, "apply_mask", spy)
    monkeypatch.setattr(secagg, "_BLOCK", 7)
    inputs = [{"w": np.array([0.5, -0.25])}, {"w": np.array([0.125, 1.0])}, {"w": np.zeros(2)}]
    average = secagg.simulate(inputs, [1, 2, 3], threshold=2, seed=0)
    np.testing.assert_allclose(average["w"], [0.75 / 6, 1.75 / 6], atol=1e-6)
    assert seen and set(seen) == {7}
