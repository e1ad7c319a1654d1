"""Secure aggregation: the coordinator learns the sum of the updates and nothing about any one of them.

The honest-but-curious protocol of Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning" (CCS, Figure 4), with the
sparse neighbour graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"): each client shares masks and
secrets with its ``k`` neighbours only, and ``k = n - 1`` is the original.

The rules, one round per method of :class:`SecAggClient` and
:class:`SecAggServer` (sans-I/O, like h11: methods take and return frozen
messages, the caller carries them over the wire and decides the deadlines):

0. AdvertiseKeys. Each client makes two X25519 pairs, ``c`` to encrypt shares
   and ``s`` to agree on masks, and sends both public keys.
1. ShareKeys. Each client draws a self-mask seed ``b_u`` and splits ``b_u``
   and its secret key ``s_u`` into t-of-(k+1) Shamir shares, one for each
   neighbour and one it keeps. It encrypts each neighbour's pair of shares
   with AES-GCM under a key agreed from ``c`` (HKDF-SHA256), so the server,
   which relays them, cannot read them.
2. MaskedInputCollection. Each client sends, in the ring Z_{2^bits},
   ``y_u = x_u + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv)`` over
   its neighbours ``v`` that reached step 1. Both ends derive the same seed
   ``s_uv`` from ``s``, so pairwise masks cancel in the sum.
3. Unmasking. The server names the survivors (sent ``y``) and the dropped
   (shared keys, sent no ``y``). For each neighbour ``v`` a client reveals
   its share of ``b_v`` if ``v`` survived, or of ``s_v`` if ``v`` dropped,
   never both: a request naming a client in both lists can be neither built
   nor decoded, and a client answers one request only. The server rebuilds
   the survivors' ``b_u`` and the dropped clients' ``s_v``, strips every mask
   and keeps the sum.

Privacy rests on the threshold ``t``. A round stops with :class:`SecAggError`
as soon as fewer than ``t`` clients take part in a step, or fewer than ``t``
of a client's neighbourhood (the client and its neighbours) survive, or a
needed secret has fewer than ``t`` shares; fewer than ``t`` shares of a
secret reveal nothing about it. ``t`` must exceed half of ``k + 1`` so a
server that tells some clients that ``v`` survived and others that it
dropped cannot collect ``t`` shares of both of ``v``'s secrets.

Not covered (see ``docs/privacy.md``): an actively malicious server (the
paper's consistency-check round and signatures are not implemented), and a
server that picks the neighbour graph to surround a client with colluders.

Client ids are 0 to ``num_clients - 1``; the coordinator maps its workers to
them. Messages hold only ints, bytes, maps keyed by client id and int32 or
int64 arrays (the ring element in two's complement), so they fit msgpack and
the tensor whitelist of :mod:`syncfed.tensors`.

This module is the protocol: the round's settings (:class:`SecAggConfig`),
the messages of its steps, the client, the server and :func:`simulate`, with
the key agreement and share encryption they share. The arithmetic it rests on
lives in pure modules of its own, so each can be read and tested alone:
Shamir sharing in :mod:`syncfed.secret_sharing`; the neighbour graph, the
masks' generator, the :class:`~syncfed.masking.Quantizer` and the flat layout
of a model in :mod:`syncfed.masking`. Their public names are re-exported here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .aggregation import validate_updates
from .exceptions import ConfigError, ProtocolError, RemoteProtocolError, SecAggError, describe
from .masking import (
    MAX_CLIENTS,
    Quantizer,
    apply_mask,
    check_graph,
    flatten,
    neighbour_graph,
    neighbours_of,
    unflatten,
    unsigned_dtype,
)
from .secret_sharing import PRIME, SECRET_SIZE, SHARE_SIZE, RandomBytes, combine_shares, split_secret
from .tensors import Weights

__all__ = [
    "SecAggError",
    "PRIME",
    "KEY_SIZE",
    "SECRET_SIZE",
    "SHARE_SIZE",
    "CIPHERTEXT_SIZE",
    "MAX_CLIENTS",
    "split_secret",
    "combine_shares",
    "neighbour_graph",
    "neighbours_of",
    "Quantizer",
    "flatten",
    "unflatten",
    "SecAggConfig",
    "AdvertiseKeys",
    "NeighbourKeys",
    "ShareKeys",
    "ForwardedShares",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskShares",
    "SecAggResult",
    "SecAggClient",
    "SecAggServer",
    "simulate",
]

#: Bytes of an X25519 public or private key (as many as a shared secret, :data:`SECRET_SIZE`).
KEY_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
#: Bytes of one encrypted pair of shares: nonce, both shares, AES-GCM tag.
CIPHERTEXT_SIZE: Final = _NONCE_SIZE + 2 * SHARE_SIZE + _TAG_SIZE
_SESSION_SIZES: Final = range(16, 65)
#: Ring elements masked at a time, so no mask is ever held whole (a 100M-value model needs 400 MB per mask).
_BLOCK: Final = 1 << 20


# The round's settings and its messages


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise ProtocolError(reason)


def _check_id(value: Any, what: str) -> None:
    _check(type(value) is int and 0 <= value < MAX_CLIENTS, f"{what} must be a client id below {MAX_CLIENTS}")


def _check_bytes(value: Any, size: int, what: str) -> None:
    _check(isinstance(value, bytes) and len(value) == size, f"{what} must be {size} bytes, not {describe(value)}")


def _by_client(value: Any, size: int, what: str) -> dict[int, bytes]:
    """Validate a map from client ids to byte strings of one size, and copy it so it cannot change."""
    _check(isinstance(value, Mapping) and len(value) <= MAX_CLIENTS, f"{what} must be a map keyed by client id")
    for client, data in value.items():
        _check_id(client, f"{what} key")
        _check_bytes(data, size, f"{what} of client {client}")
    return dict(value)


def _client_ids(value: Any, what: str) -> tuple[int, ...]:
    _check(isinstance(value, (list, tuple)) and len(value) <= MAX_CLIENTS, f"{what} must be a list of client ids")
    for client in value:
        _check_id(client, f"{what} entry")
    _check(len(set(value)) == len(value), f"{what} lists a client twice")
    return tuple(sorted(value))


@dataclass(frozen=True)
class SecAggConfig:
    """The settings every party of one round shares; the coordinator picks them and sends them with the round.

    ``length`` is the number of values each client contributes (see
    :func:`flatten`). ``session`` is a fresh random string per round (16 to
    64 bytes) that binds keys, masks and ciphertexts to it, so nothing from
    one round can be replayed in another. ``neighbours`` is ``k``, each
    client's number of neighbours (None: every other client, the original
    protocol); Bell et al. take ``k`` of order ``log n``. ``graph_seed``
    picks the graph. ``threshold`` must satisfy ``(k + 1) / 2 < t <= k + 1``;
    up to ``k + 1 - t`` of a client's neighbourhood may drop out. ``clip``,
    ``bits`` and ``max_count`` are the :class:`Quantizer`'s.

    Raises:
        ConfigError: if a setting is out of range.
    """

    num_clients: int
    threshold: int
    length: int
    clip: float
    session: bytes
    neighbours: int | None = None
    graph_seed: int = 0
    bits: int = 32
    max_count: int = 1000

    def __post_init__(self) -> None:
        degree = self.degree
        check_graph(self.num_clients, degree, self.graph_seed)  # validates without building: a peer picks n and k
        if not (degree + 1) / 2 < self.threshold <= degree + 1:
            raise ConfigError(
                f"threshold {self.threshold} must be more than half of, and at most, the {degree + 1} holders of shares"
            )
        if not 1 <= self.length < 2**40:
            raise ConfigError(f"vector length {self.length} must be between 1 and {2**40 - 1}")
        if not isinstance(self.session, bytes) or len(self.session) not in _SESSION_SIZES:
            raise ConfigError(f"session must be {_SESSION_SIZES.start} to {_SESSION_SIZES.stop - 1} random bytes")
        _ = self.quantizer  # validates clip, bits and max_count

    @property
    def degree(self) -> int:
        """``k``: each client's number of neighbours."""
        return self.num_clients - 1 if self.neighbours is None else self.neighbours

    @property
    def quantizer(self) -> Quantizer:
        """The fixed-point encoding every client of the round uses."""
        return Quantizer(self.num_clients, self.clip, self.bits, self.max_count)

    def graph(self) -> tuple[frozenset[int], ...]:
        """Each client's neighbours: ``n * k`` work, for the server, which picked ``n`` and ``k`` itself."""
        return neighbour_graph(self.num_clients, self.degree, self.graph_seed)

    def neighbours_of(self, client: int) -> frozenset[int]:
        """One client's neighbours, in ``O(n + k)``."""
        return neighbours_of(client, self.num_clients, self.degree, self.graph_seed)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Step 0, client to server: the client's two public keys."""

    client: int
    c_public: bytes
    s_public: bytes

    def __post_init__(self) -> None:
        _check_id(self.client, "client")
        _check_bytes(self.c_public, KEY_SIZE, "encryption public key")
        _check_bytes(self.s_public, KEY_SIZE, "masking public key")


@dataclass(frozen=True)
class NeighbourKeys:
    """Step 0, server to one client: the public keys of its neighbours that advertised theirs, by client id."""

    c_public: Mapping[int, bytes]
    s_public: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "c_public", _by_client(self.c_public, KEY_SIZE, "encryption public key"))
        object.__setattr__(self, "s_public", _by_client(self.s_public, KEY_SIZE, "masking public key"))
        _check(self.c_public.keys() == self.s_public.keys(), "neighbour keys must list the same clients twice")


@dataclass(frozen=True)
class ShareKeys:
    """Step 1, client to server: the encrypted shares for each neighbour, by recipient."""

    client: int
    ciphertexts: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_id(self.client, "client")
        object.__setattr__(self, "ciphertexts", _by_client(self.ciphertexts, CIPHERTEXT_SIZE, "ciphertext"))


@dataclass(frozen=True)
class ForwardedShares:
    """Step 1, server to one client: the shares its neighbours encrypted for it, by sender."""

    ciphertexts: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ciphertexts", _by_client(self.ciphertexts, CIPHERTEXT_SIZE, "ciphertext"))


@dataclass(frozen=True)
class MaskedInput:
    """Step 2, client to server: the masked ring vector (values, then the count), int32 or int64."""

    client: int
    vector: np.ndarray

    def __post_init__(self) -> None:
        _check_id(self.client, "client")
        _check(
            isinstance(self.vector, np.ndarray)
            and self.vector.ndim == 1
            and self.vector.dtype in (np.dtype("<i4"), np.dtype("<i8")),
            "masked input must be a one-dimensional int32 or int64 array",
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Step 2, server to every survivor: who sent a masked input and who dropped after sharing keys."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", _client_ids(self.survivors, "survivors"))
        object.__setattr__(self, "dropped", _client_ids(self.dropped, "dropped clients"))
        both = sorted(set(self.survivors) & set(self.dropped))
        # The privacy invariant: revealing both shares of a client would unmask its input.
        _check(not both, f"unmask request lists clients {both} both as survivors and as dropped")


@dataclass(frozen=True)
class UnmaskShares:
    """Step 3, client to server: shares of the survivors' self-mask seeds and of the dropped clients' keys, by owner."""

    client: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_id(self.client, "client")
        object.__setattr__(self, "seed_shares", _by_client(self.seed_shares, SHARE_SIZE, "self-mask seed share"))
        object.__setattr__(self, "key_shares", _by_client(self.key_shares, SHARE_SIZE, "mask key share"))
        both = sorted(self.seed_shares.keys() & self.key_shares.keys())
        _check(not both, f"client {self.client} revealed both shares of clients {both}")


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum: ``total`` in the ring, ``weighted_sum`` = sum of count_u * x_u, over ``clients``."""

    total: np.ndarray
    weighted_sum: np.ndarray
    count: int
    clients: tuple[int, ...]

    @property
    def average(self) -> np.ndarray:
        """The example-weighted average (FedAvg) of the clients' vectors."""
        return self.weighted_sum / self.count


# Cryptographic helpers shared by both sides


def _derive(shared: bytes, session: bytes, label: bytes, u: int, v: int) -> bytes:
    """A 32-byte key for the pair {u, v}, bound to the round and to its purpose (HKDF, RFC 5869)."""
    pair = struct.pack(">II", min(u, v), max(u, v))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=label + pair).derive(shared)


def _agree(private: X25519PrivateKey, public: bytes, owner: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the agreed secret would be all zeros
        raise RemoteProtocolError(f"public key of client {owner} is not a usable X25519 key") from None


def _associated(session: bytes, sender: int, recipient: int) -> bytes:
    return session + struct.pack(">II", sender, recipient)


_SHARE_KEY: Final = b"syncfed secagg share key"
_MASK_SEED: Final = b"syncfed secagg mask seed"


class _Steps:
    """A one-way sequence of named steps; any failure inside a step leaves it failed for good."""

    def __init__(self, who: str, steps: Sequence[str]) -> None:
        self._who = who
        self._steps = list(steps)
        self._state = self._steps[0]

    def begin(self, step: str) -> None:
        if self._state != step:
            raise ConfigError(f"{self._who} cannot {step} while its state is {self._state}")
        self._state = "failed"

    def end(self, step: str) -> None:
        self._state = self._steps[self._steps.index(step) + 1]


def _need(count: int, threshold: int, what: str) -> None:
    if count < threshold:
        raise SecAggError(f"{count} {what}, threshold is {threshold}")


class SecAggClient:
    """One client's side of a secure aggregation round; call its four steps in order.

    ``random_bytes`` draws the private keys, the seed and the Shamir
    coefficients; keep the default (the operating system's CSPRNG) outside tests.

    Usage::

        client = SecAggClient(config, client_id)
        send(client.advertise_keys())
        send(client.share_keys(receive()))           # NeighbourKeys
        send(client.mask_input(receive(), vector, count))  # ForwardedShares
        send(client.unmask(receive()))               # UnmaskRequest
    """

    def __init__(self, config: SecAggConfig, client: int, *, random_bytes: RandomBytes = os.urandom) -> None:
        if not 0 <= client < config.num_clients:
            raise ConfigError(f"client id {client} must be below the {config.num_clients} clients")
        self._config = config
        self._id = client
        self._random = random_bytes
        self._neighbours = config.neighbours_of(client)
        self._steps = _Steps(f"client {client}", ["advertise_keys", "share_keys", "mask_input", "unmask", "done"])
        self._c_private = X25519PrivateKey.from_private_bytes(random_bytes(KEY_SIZE))
        self._s_private = X25519PrivateKey.from_private_bytes(random_bytes(KEY_SIZE))
        self._seed = b""
        self._share_keys: dict[int, bytes] = {}  # neighbour -> AES-GCM key
        self._s_public: dict[int, bytes] = {}  # neighbour -> masking public key
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (share of b_owner, share of s_owner)

    def advertise_keys(self) -> AdvertiseKeys:
        """Step 0: the two public keys."""
        self._steps.begin("advertise_keys")
        message = AdvertiseKeys(
            self._id,
            self._c_private.public_key().public_bytes_raw(),
            self._s_private.public_key().public_bytes_raw(),
        )
        self._steps.end("advertise_keys")
        return message

    def share_keys(self, keys: NeighbourKeys) -> ShareKeys:
        """Step 1: encrypt, for each neighbour that advertised keys, its shares of this client's two secrets.

        Raises:
            ProtocolError: if a key is not from a neighbour, or reuses another client's key.
            SecAggError: if fewer than ``threshold`` clients would hold the shares.
        """
        self._steps.begin("share_keys")
        config = self._config
        strangers = sorted(keys.c_public.keys() - self._neighbours)
        _check(not strangers, f"client {self._id} got keys of clients {strangers}, which are not its neighbours")
        seen = {self._c_private.public_key().public_bytes_raw(), self._s_private.public_key().public_bytes_raw()}
        for v in keys.c_public:
            for key in (keys.c_public[v], keys.s_public[v]):
                _check(key not in seen, f"public key of client {v} is already in use")
                seen.add(key)
        holders = set(keys.c_public) | {self._id}
        _need(len(holders), config.threshold, f"clients would hold shares of client {self._id}'s secrets")
        self._seed = self._random(SECRET_SIZE)
        seed_shares = split_secret(self._seed, config.threshold, holders, self._random)
        key_shares = split_secret(self._s_private.private_bytes_raw(), config.threshold, holders, self._random)
        self._held[self._id] = (seed_shares[self._id], key_shares[self._id])
        ciphertexts = {}
        for v in sorted(keys.c_public):
            shared = _agree(self._c_private, keys.c_public[v], v)
            self._share_keys[v] = _derive(shared, config.session, _SHARE_KEY, self._id, v)
            self._s_public[v] = keys.s_public[v]
            nonce = self._random(_NONCE_SIZE)
            plaintext = seed_shares[v] + key_shares[v]
            sealed = AESGCM(self._share_keys[v]).encrypt(nonce, plaintext, _associated(config.session, self._id, v))
            ciphertexts[v] = nonce + sealed
        self._steps.end("share_keys")
        return ShareKeys(self._id, ciphertexts)

    def mask_input(self, shares: ForwardedShares, vector: np.ndarray, count: int) -> MaskedInput:
        """Step 2: keep the neighbours' shares and mask this client's vector and example count.

        Raises:
            ConfigError: if the vector does not have the round's length, or it or the count is invalid.
            ProtocolError: if shares come from a client that got no shares from this one, or do not decrypt.
            SecAggError: if fewer than ``threshold`` clients of this client's neighbourhood shared keys.
        """
        self._steps.begin("mask_input")
        config = self._config
        if np.shape(vector) != (config.length,):
            raise ConfigError(f"vector of shape {np.shape(vector)} does not have the round's length {config.length}")
        strangers = sorted(shares.ciphertexts.keys() - self._share_keys.keys())
        _check(not strangers, f"client {self._id} got shares from clients {strangers} it shared no keys with")
        _need(
            len(shares.ciphertexts) + 1, config.threshold, f"clients of client {self._id}'s neighbourhood shared keys"
        )
        for v, ciphertext in shares.ciphertexts.items():
            nonce, sealed = ciphertext[:_NONCE_SIZE], ciphertext[_NONCE_SIZE:]
            try:
                plain = AESGCM(self._share_keys[v]).decrypt(nonce, sealed, _associated(config.session, v, self._id))
            except InvalidTag:
                raise RemoteProtocolError(f"shares from client {v} to client {self._id} do not decrypt") from None
            self._held[v] = (plain[:SHARE_SIZE], plain[SHARE_SIZE:])
        ring = config.quantizer.encode(vector, count)
        masked = ring.view(unsigned_dtype(ring.dtype))
        apply_mask(masked, self._seed, block=_BLOCK)
        for v in sorted(shares.ciphertexts):
            shared = _agree(self._s_private, self._s_public[v], v)
            apply_mask(
                masked, _derive(shared, config.session, _MASK_SEED, self._id, v), block=_BLOCK, subtract=v > self._id
            )
        self._steps.end("mask_input")
        return MaskedInput(self._id, ring)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Step 3: reveal, for each neighbour the request names, the one share its status calls for.

        Answers once: a second request is refused, so no two requests can
        between them draw both shares of one client.

        Raises:
            ProtocolError: if the request says this client sent no masked input.
            SecAggError: if fewer than ``threshold`` of this client's neighbourhood survived.
        """
        self._steps.begin("unmask")
        survivors = set(request.survivors)
        _check(self._id in survivors, f"unmask request does not list client {self._id} among the survivors")
        alive = survivors & (self._neighbours | {self._id})
        _need(len(alive), self._config.threshold, f"clients of client {self._id}'s neighbourhood survived")
        seed_shares = {v: self._held[v][0] for v in request.survivors if v in self._held}
        key_shares = {v: self._held[v][1] for v in request.dropped if v in self._held}
        self._steps.end("unmask")
        return UnmaskShares(self._id, seed_shares, key_shares)


_FromClient = TypeVar("_FromClient", AdvertiseKeys, ShareKeys, MaskedInput, UnmaskShares)


def _collect(messages: Iterable[_FromClient], allowed: Iterable[int], what: str) -> dict[int, _FromClient]:
    """Index one step's messages by client, refusing duplicates and clients that left earlier steps."""
    allowed = set(allowed)
    collected: dict[int, _FromClient] = {}
    for message in messages:
        client = message.client
        _check(client not in collected, f"client {client} sent {what} twice")
        _check(client in allowed, f"client {client} sent {what} but is not in this step of the round")
        collected[client] = message
    return collected


class SecAggServer:
    """The server's side of a secure aggregation round: feed it each step's messages that arrived in time.

    A client whose message is missing from a step has dropped out from then on.

    Usage::

        server = SecAggServer(config)
        keys = server.receive_keys(adverts)               # {client: NeighbourKeys}
        forwarded = server.receive_shares(share_messages)  # {client: ForwardedShares}
        request = server.receive_masked_inputs(masked)     # UnmaskRequest, to every survivor
        result = server.receive_unmask_shares(replies)     # SecAggResult
    """

    def __init__(self, config: SecAggConfig) -> None:
        self._config = config
        self._graph = config.graph()
        self._steps = _Steps(
            "server", ["receive_keys", "receive_shares", "receive_masked_inputs", "receive_unmask_shares", "done"]
        )
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shared: set[int] = set()
        self._survivors: set[int] = set()
        self._dropped: set[int] = set()
        self._total = np.zeros(0)

    def receive_keys(self, messages: Iterable[AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        """Step 0: the keys each client's neighbours advertised, to forward to it.

        Raises:
            ProtocolError: if a client id is out of range or repeated.
            SecAggError: if fewer than ``threshold`` clients advertised keys.
        """
        self._steps.begin("receive_keys")
        self._keys = _collect(messages, range(self._config.num_clients), "keys")
        _need(len(self._keys), self._config.threshold, "clients advertised keys")
        forwarded = {
            u: NeighbourKeys(
                {v: self._keys[v].c_public for v in sorted(self._graph[u] & self._keys.keys())},
                {v: self._keys[v].s_public for v in sorted(self._graph[u] & self._keys.keys())},
            )
            for u in sorted(self._keys)
        }
        self._steps.end("receive_keys")
        return forwarded

    def receive_shares(self, messages: Iterable[ShareKeys]) -> dict[int, ForwardedShares]:
        """Step 1: route every ciphertext to its recipient.

        Raises:
            ProtocolError: if a client did not encrypt shares for exactly its neighbours that advertised keys.
            SecAggError: if fewer than ``threshold`` clients shared keys.
        """
        self._steps.begin("receive_shares")
        shares = _collect(messages, self._keys, "shares")
        for u, message in shares.items():
            expected = self._graph[u] & self._keys.keys()
            _check(
                message.ciphertexts.keys() == expected,
                f"client {u} sent shares for clients {sorted(message.ciphertexts)}, expected {sorted(expected)}",
            )
        _need(len(shares), self._config.threshold, "clients shared keys")
        self._shared = set(shares)
        forwarded = {
            v: ForwardedShares({u: shares[u].ciphertexts[v] for u in sorted(self._graph[v] & self._shared)})
            for v in sorted(self._shared)
        }
        self._steps.end("receive_shares")
        return forwarded

    def receive_masked_inputs(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Step 2: add up the masked inputs and ask the survivors for the shares that remove the masks.

        Raises:
            ProtocolError: if a vector has the wrong dtype or length.
            SecAggError: if fewer than ``threshold`` clients, or of a survivor's neighbourhood, sent masked inputs.
        """
        self._steps.begin("receive_masked_inputs")
        config = self._config
        masked = _collect(messages, self._shared, "a masked input")
        dtype = config.quantizer.dtype
        for u, message in masked.items():
            _check(
                message.vector.dtype == dtype and message.vector.size == config.length + 1,
                f"masked input of client {u} must be {config.length + 1} values of dtype {dtype.name}",
            )
        _need(len(masked), config.threshold, "clients sent masked inputs")
        for u in masked:
            alive = (self._graph[u] | {u}) & masked.keys()
            _need(len(alive), config.threshold, f"clients of client {u}'s neighbourhood sent masked inputs")
        self._survivors = set(masked)
        self._dropped = self._shared - self._survivors
        self._total = np.zeros(config.length + 1, dtype=unsigned_dtype(dtype))
        for message in masked.values():
            self._total += message.vector.view(self._total.dtype)
        self._steps.end("receive_masked_inputs")
        return UnmaskRequest(tuple(sorted(self._survivors)), tuple(sorted(self._dropped)))

    def _rebuild(self, replies: Mapping[int, UnmaskShares], owner: int, *, seed: bool) -> bytes:
        shares = {
            v: (reply.seed_shares if seed else reply.key_shares)[owner]
            for v, reply in replies.items()
            if owner in (reply.seed_shares if seed else reply.key_shares)
        }
        secret = "self-mask seed" if seed else "mask key"
        try:
            return combine_shares(shares, self._config.threshold)
        except SecAggError as error:
            raise SecAggError(f"cannot rebuild the {secret} of client {owner}: {error}") from None

    def receive_unmask_shares(self, messages: Iterable[UnmaskShares]) -> SecAggResult:
        """Step 3: rebuild the secrets, strip the masks and decode the sum.

        Every secret is rebuilt before any mask is touched, so a round short of
        shares fails having learnt nothing.

        Raises:
            ProtocolError: if a client revealed other shares than asked, or a rebuilt key does not match.
            SecAggError: if a needed secret has fewer than ``threshold`` shares.
        """
        self._steps.begin("receive_unmask_shares")
        config = self._config
        replies = _collect(messages, self._survivors, "unmasking shares")
        for v, reply in replies.items():
            asked_seeds = (self._graph[v] | {v}) & self._survivors
            asked_keys = self._graph[v] & self._dropped
            _check(
                reply.seed_shares.keys() == asked_seeds and reply.key_shares.keys() == asked_keys,
                f"client {v} revealed shares for {sorted(reply.seed_shares)} and {sorted(reply.key_shares)}, "
                f"expected {sorted(asked_seeds)} and {sorted(asked_keys)}",
            )
        seeds = {u: self._rebuild(replies, u, seed=True) for u in sorted(self._survivors)}
        keys = {v: self._rebuild(replies, v, seed=False) for v in sorted(self._dropped)}
        total = self._total
        for seed in seeds.values():
            apply_mask(total, seed, block=_BLOCK, subtract=True)
        for v, key in keys.items():
            private = X25519PrivateKey.from_private_bytes(key)
            _check(
                private.public_key().public_bytes_raw() == self._keys[v].s_public,
                f"rebuilt mask key of client {v} does not match its public key",
            )
            for u in sorted(self._graph[v] & self._survivors):
                shared = _agree(private, self._keys[u].s_public, u)
                # Survivor u added this pairwise mask if v < u and subtracted it otherwise: undo that.
                apply_mask(total, _derive(shared, config.session, _MASK_SEED, u, v), block=_BLOCK, subtract=v < u)
        signed = total.view(config.quantizer.dtype)
        weighted_sum, count = config.quantizer.decode(signed)
        self._steps.end("receive_unmask_shares")
        return SecAggResult(signed, weighted_sum, count, tuple(sorted(self._survivors)))


def simulate(
    inputs: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[int],
    *,
    threshold: int,
    seed: int,
    neighbours: int | None = None,
    drop_after_round: Mapping[int, int] | None = None,
    clip: float | None = None,
    bits: int = 32,
    max_count: int | None = None,
) -> Weights:
    """Run a whole round in one process and return the example-weighted average of the survivors' inputs.

    ``drop_after_round`` maps a client index to the step (0 to 3) after which
    it vanishes: 0 and 1 drop it from the sum (after 1 its masks are removed
    through its key's shares), 2 and 3 keep it. ``clip`` defaults to the
    largest magnitude in the inputs and ``max_count`` to the largest count,
    so nothing is clipped. ``seed`` picks the neighbour graph; keys and masks
    come from the operating system's CSPRNG, as in a real round.

    Raises:
        AggregationError: if the inputs disagree in tensors or a count is not positive.
        SecAggError: if too many clients drop out for the threshold.
        ConfigError: if a setting is invalid.
    """
    validate_updates(list(zip(inputs, counts, strict=True)))
    drops = dict(drop_after_round or {})
    for client, step in drops.items():
        if not (0 <= client < len(inputs) and 0 <= step <= 3):
            raise ConfigError(f"drop of client {client} after step {step} needs a client index and a step 0 to 3")
    vectors = [flatten(weights) for weights in inputs]
    largest = max(float(np.abs(vector).max(initial=0.0)) for vector in vectors)
    config = SecAggConfig(
        num_clients=len(inputs),
        threshold=threshold,
        length=vectors[0].size,
        clip=clip if clip is not None else largest or 1.0,
        session=os.urandom(32),
        neighbours=neighbours,
        graph_seed=seed,
        bits=bits,
        max_count=max_count if max_count is not None else max(counts),
    )
    clients = [SecAggClient(config, u) for u in range(len(inputs))]
    server = SecAggServer(config)

    def alive(step: int) -> list[int]:
        return [u for u in range(len(inputs)) if drops.get(u, 4) >= step]

    keys = server.receive_keys([clients[u].advertise_keys() for u in alive(0)])
    forwarded = server.receive_shares([clients[u].share_keys(keys[u]) for u in alive(1)])
    request = server.receive_masked_inputs(
        [clients[u].mask_input(forwarded[u], vectors[u], counts[u]) for u in alive(2)]
    )
    result = server.receive_unmask_shares([clients[u].unmask(request) for u in alive(3)])
    return unflatten(result.average, inputs[0])
