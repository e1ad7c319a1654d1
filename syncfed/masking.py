"""Masking in the ring: who masks with whom, how a seed becomes a mask, and how values become ring elements.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") hides each client's vector under masks
that cancel in the sum, in the ring Z_{2^bits}. This module holds the pure
parts of that, with no keys and no messages:

- the sparse neighbour graph of SecAgg+ (Bell et al. 2020, "Secure
  Single-Server Aggregation with (Poly)Logarithmic Overhead"): each client
  masks with, and shares secrets with, its ``k`` neighbours only;
- the pseudo-random generator that expands a 32-byte seed into a mask and
  adds or subtracts it in place, a block at a time;
- the fixed-point :class:`Quantizer` that turns example-weighted float
  vectors into ring elements whose sum cannot wrap around, and
  :func:`flatten` / :func:`unflatten`, the flat layout of a model's tensors.

The quantizer and the layout are used outside the protocol too (the
analytics' secure sums, the round's fold). The protocol itself, which agrees
the seeds and runs the steps, is :mod:`syncfed.secagg`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .aggregation import from_float64
from .exceptions import AggregationError, ConfigError, SecAggError
from .tensors import Weights

__all__ = [
    "MAX_CLIENTS",
    "check_graph",
    "neighbour_graph",
    "neighbours_of",
    "apply_mask",
    "unsigned_dtype",
    "Quantizer",
    "flatten",
    "unflatten",
]

#: Client ids are below this; a client's id plus one is its Shamir point.
MAX_CLIENTS: Final = 1 << 16
#: Quantized values stay within 2^48 in magnitude so float64 products remain exact to well under one unit.
_MAX_LIMIT: Final = 2**48


# The neighbour graph of SecAgg+


def check_graph(num_clients: int, neighbours: int, seed: int) -> None:
    """Refuse a graph that cannot exist, without building anything."""
    if not 2 <= num_clients <= MAX_CLIENTS:
        raise ConfigError(f"number of clients {num_clients} must be between 2 and {MAX_CLIENTS}")
    if not 1 <= neighbours < num_clients:
        raise ConfigError(f"neighbour count {neighbours} must be between 1 and {num_clients - 1}")
    if seed < 0:
        raise ConfigError(f"graph seed {seed} must not be negative")
    if neighbours % 2 and num_clients % 2:
        raise ConfigError(f"neighbour count {neighbours} must be even with an odd number of clients {num_clients}")


def _ring(num_clients: int, neighbours: int, seed: int) -> tuple[list[int], list[int]]:
    """The seeded ring of clients and the offsets each one links to (see :func:`neighbour_graph`)."""
    check_graph(num_clients, neighbours, seed)
    ring = np.random.default_rng(seed).permutation(num_clients).tolist()
    offsets = list(range(1, neighbours // 2 + 1)) + ([num_clients // 2] if neighbours % 2 else [])
    return ring, offsets


def neighbour_graph(num_clients: int, neighbours: int, seed: int) -> tuple[frozenset[int], ...]:
    """Each client's neighbours in a ``neighbours``-regular graph, the same for every party that knows the seed.

    A Harary graph (each client linked to the ``k // 2`` next ones around a
    ring, and to the opposite one when ``k`` is odd) on a seeded random
    permutation of the clients: exactly ``k``-regular, connected when
    ``k >= 2``, and the complete graph when ``k = n - 1``. The seed is public; it only has to be
    the same everywhere. It costs ``n * k``: a client needs only its own row, :func:`neighbours_of`.

    Raises:
        ConfigError: if ``k`` is not between 1 and ``n - 1``, or both are odd (no such graph exists).
    """
    ring, offsets = _ring(num_clients, neighbours, seed)
    links: list[set[int]] = [set() for _ in range(num_clients)]
    for position, client in enumerate(ring):
        for offset in offsets:
            other = ring[(position + offset) % num_clients]
            links[client].add(other)
            links[other].add(client)
    return tuple(frozenset(link) for link in links)


def neighbours_of(client: int, num_clients: int, neighbours: int, seed: int) -> frozenset[int]:
    """One client's row of :func:`neighbour_graph`, in ``O(n + k)``: what a worker builds, whatever the round's size.

    Raises:
        ConfigError: as :func:`neighbour_graph`, or if ``client`` is not below ``num_clients``.
    """
    ring, offsets = _ring(num_clients, neighbours, seed)
    if not 0 <= client < num_clients:
        raise ConfigError(f"client id {client} must be below the {num_clients} clients")
    position = ring.index(client)
    # Links are symmetric: the client links forward by each offset, and is linked from as far back.
    return frozenset(ring[(position + sign * offset) % num_clients] for offset in offsets for sign in (1, -1))


# The pseudo-random generator and the ring


def apply_mask(ring: np.ndarray, seed: bytes, *, block: int, subtract: bool = False) -> None:
    """Add (or subtract) the mask that a 32-byte seed expands to, in place, ``block`` ring elements at a time.

    The PRG is the AES-256-CTR keystream: a cryptographic generator, unlike
    numpy's PCG64 or Philox whose state follows from a few outputs; it is the
    core of NIST SP 800-90A's CTR_DRBG and runs at memory speed with AES-NI.
    Every seed is fresh per round (see :class:`~syncfed.secagg.SecAggConfig` ``session``), so
    the zero nonce never repeats under one key. ``ring`` is unsigned, so
    numpy's arithmetic wraps modulo 2^bits.
    """
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(min(ring.size, block) * ring.itemsize)
    for start in range(0, ring.size, block):
        part = ring[start : start + block]
        mask = np.frombuffer(encryptor.update(zeros[: part.nbytes]), dtype=ring.dtype)
        if subtract:
            part -= mask
        else:
            part += mask


def unsigned_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The ring arithmetic dtype: numpy's unsigned integers wrap modulo 2^bits."""
    return np.dtype(f"<u{dtype.itemsize}")


# Fixed-point quantization and the flat layout of a model's tensors


@dataclass(frozen=True)
class Quantizer:
    """Fixed point in Z_{2^bits} for example-weighted sums that cannot wrap around.

    A client with ``count`` examples (at most ``max_count``) sends each value
    ``x`` of its vector as ``round(clip(x, -clip, clip) * count / max_count *
    scale)``, then ``count`` itself as one more element. With
    ``scale = limit / clip`` and ``limit = floor((2^(bits-1) - 1) /
    num_clients)`` (at most 2^48), no code exceeds ``limit``, so the sum of
    ``num_clients`` vectors stays below 2^(bits-1) and reads back as a signed
    integer: the decoded sum is ``sum_u count_u * x_u`` to within
    :attr:`error_bound`. Capping the weight at ``max_count`` follows Flower's
    SecAgg+ ``max_weight``.

    Choose ``clip`` as a bound on the values: values beyond it are clipped, and
    the resolution is ``clip * max_count / limit``, so updates (differences
    from the global model) quantize better than weights. ``bits`` is 32 (the
    default: each client keeps about ``31 - log2(num_clients)`` bits) or 64
    (48 bits each, so float64 stays exact).

    Raises:
        ConfigError: if a setting is out of range or the counts could wrap around.
    """

    num_clients: int
    clip: float
    bits: int = 32
    max_count: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.num_clients <= MAX_CLIENTS:
            raise ConfigError(f"number of clients {self.num_clients} must be between 1 and {MAX_CLIENTS}")
        if not (isinstance(self.clip, (int, float)) and 0 < self.clip < float("inf")):
            raise ConfigError(f"clip {self.clip!r} must be a positive finite number")
        if self.bits not in (32, 64):
            raise ConfigError(f"ring of {self.bits} bits is not one of 32, 64")
        if not 1 <= self.max_count <= (2 ** (self.bits - 1) - 1) // self.num_clients:
            raise ConfigError(
                f"max count {self.max_count} times {self.num_clients} clients does not fit a {self.bits}-bit ring"
            )

    @property
    def dtype(self) -> np.dtype[Any]:
        """The ring's wire dtype: int32 or int64, two's complement."""
        return np.dtype(f"<i{self.bits // 8}")

    @property
    def limit(self) -> int:
        """The largest magnitude of one client's code."""
        return min(int(2 ** (self.bits - 1) - 1) // self.num_clients, _MAX_LIMIT)

    @property
    def scale(self) -> float:
        """Codes per unit of weighted value."""
        return self.limit / self.clip

    @property
    def error_bound(self) -> float:
        """Largest error of a decoded weighted sum, per element, for values within ``clip``.

        Half a code per client from rounding to nearest, plus the float64
        rounding of the products (under ``limit * 2^-49`` codes).
        """
        return self.num_clients * (0.5 + self.limit * 2.0**-49) * self.max_count / self.scale

    def encode(self, vector: np.ndarray, count: int) -> np.ndarray:
        """One client's ring vector: its weighted codes, then its count.

        Raises:
            ConfigError: if the vector is not one-dimensional and finite or the count is out of range.
        """
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1 or not np.isfinite(values).all():
            raise ConfigError("vector to quantize must be one-dimensional with finite values")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= self.max_count:
            raise ConfigError(f"example count {count!r} must be an integer between 1 and {self.max_count}")
        codes = np.clip(values, -self.clip, self.clip)  # a fresh array: the rest works in place
        codes *= int(count) / self.max_count
        codes *= self.scale
        ring = np.empty(values.size + 1, dtype=self.dtype)
        ring[:-1] = np.rint(codes, out=codes)
        ring[-1] = count
        return ring

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """The weighted sum ``sum_u count_u * x_u`` (float64) and the total count of a sum of ring vectors.

        Raises:
            SecAggError: if the total count is not between 1 and ``num_clients * max_count``.
        """
        total = np.asarray(total, dtype=self.dtype)
        count = int(total[-1])
        if not 1 <= count <= self.num_clients * self.max_count:
            raise SecAggError(f"example counts sum to {count}, outside 1 to {self.num_clients * self.max_count}")
        return total[:-1].astype(np.float64) * (self.max_count / self.scale), count


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every tensor of ``weights`` in one float64 vector, in sorted name order.

    Sorting makes the order the same at both ends whatever order their dicts
    list the tensors in; :func:`unflatten` follows the same rule.
    """
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[name], dtype=np.float64).ravel() for name in sorted(weights)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    """Cut a flat vector back into the tensors of ``like`` (names, shapes, dtypes), in ``like``'s order.

    Integer tensors (batch-norm counters) are rounded to nearest.

    Raises:
        AggregationError: if the vector's length is not the total size of the tensors.
    """
    size = sum(int(like[name].size) for name in like)
    if vector.shape != (size,):
        raise AggregationError(f"vector of shape {vector.shape} does not hold tensors of {size} values")
    pieces: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(like):
        reference = like[name]
        pieces[name] = from_float64(vector[offset : offset + reference.size].reshape(reference.shape), reference.dtype)
        offset += reference.size
    return {name: pieces[name] for name in like}
