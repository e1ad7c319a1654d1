"""Shamir secret sharing (Shamir 1979, "How to Share a Secret") over GF(2^521 - 1).

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") lets a round survive clients that drop
out: each client splits its self-mask seed and its masking key into
t-of-(k+1) shares held by its neighbours, so the server can rebuild exactly
the secrets it needs from any ``t`` survivors, and fewer than ``t`` shares
reveal nothing. This module is that arithmetic alone: 32-byte secrets, one
share per holder id, no keys, no messages. The protocol that encrypts and
routes the shares is :mod:`syncfed.secagg`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from .exceptions import ConfigError, RemoteProtocolError, SecAggError

__all__ = ["PRIME", "SECRET_SIZE", "SHARE_SIZE", "RandomBytes", "split_secret", "combine_shares"]

#: Shamir shares live in GF(p) for the Mersenne prime 2^521 - 1 (Robinson 1952),
#: the first Mersenne prime above 2^256, so a 32-byte secret is one field element.
PRIME: Final = 2**521 - 1
#: Bytes of a secret: a self-mask seed or an X25519 private key.
SECRET_SIZE: Final = 32
#: Bytes of one share: a field element, big-endian.
SHARE_SIZE: Final = (PRIME.bit_length() + 7) // 8

RandomBytes = Callable[[int], bytes]


def _random_element(random_bytes: RandomBytes) -> int:
    # Rejection sampling keeps the coefficient uniform: 521 random bits, redrawn if they equal p.
    while True:
        value = int.from_bytes(random_bytes(SHARE_SIZE), "big") & PRIME
        if value != PRIME:
            return value


def split_secret(
    secret: bytes, threshold: int, holders: Iterable[int], random_bytes: RandomBytes = os.urandom
) -> dict[int, bytes]:
    """Split a 32-byte secret into one share per holder id; any ``threshold`` of them rebuild it.

    Holder ``i`` gets the value at ``x = i + 1`` of a random polynomial of
    degree ``threshold - 1`` whose constant term is the secret.

    Raises:
        ConfigError: if the secret is not 32 bytes or there are fewer holders than the threshold.
    """
    points = sorted(set(holders))
    if len(secret) != SECRET_SIZE:
        raise ConfigError(f"secret has {len(secret)} bytes, expected {SECRET_SIZE}")
    if not 1 <= threshold <= len(points):
        raise ConfigError(f"threshold {threshold} must be between 1 and the {len(points)} holders")
    coefficients = [int.from_bytes(secret, "big")] + [_random_element(random_bytes) for _ in range(threshold - 1)]
    shares = {}
    for holder in points:
        x, y = holder + 1, 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[holder] = y.to_bytes(SHARE_SIZE, "big")
    return shares


def combine_shares(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Rebuild a secret from at least ``threshold`` shares (by holder id), by Lagrange interpolation at 0.

    Raises:
        SecAggError: if there are fewer shares than the threshold.
        RemoteProtocolError: if a share is not a field element or the shares do not rebuild a 32-byte secret.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares are fewer than the threshold of {threshold}")
    points = {}
    for holder in sorted(shares)[:threshold]:
        y = int.from_bytes(shares[holder], "big")
        if len(shares[holder]) != SHARE_SIZE or y >= PRIME:
            raise RemoteProtocolError(f"share from client {holder} is not an element of the field")
        points[holder + 1] = y
    secret = 0
    for x, y in points.items():
        numerator, denominator = 1, 1
        for other in points:
            if other != x:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - x) % PRIME
        secret = (secret + y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_SIZE):
        raise RemoteProtocolError(f"shares from clients {sorted(points)} do not rebuild a {SECRET_SIZE}-byte secret")
    return secret.to_bytes(SECRET_SIZE, "big")
