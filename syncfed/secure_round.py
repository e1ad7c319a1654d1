"""Kept for one release: the old home of the secure round and the private rounds.

Import from their new homes instead: :mod:`syncfed.net.secure_round`
(``SecureRound``, ``secagg_threshold``, ``SESSION_SIZE``), :mod:`syncfed.fold`
(``PrivateFold``) and :mod:`syncfed.coordinator.private_rounds` (``PrivateRounds``).
"""

from __future__ import annotations

from .coordinator.private_rounds import NOISE_ROOM, NORM_SLACK, PrivateRounds
from .fold import PrivateFold
from .net.secure_round import SESSION_SIZE, SecureRound, secagg_threshold

__all__ = [
    "NOISE_ROOM",
    "NORM_SLACK",
    "SESSION_SIZE",
    "PrivateFold",
    "PrivateRounds",
    "SecureRound",
    "secagg_threshold",
]
