"""Shared-secret authentication: a challenge-response that never sends the secret.

Used when TLS is not, before any application message is decoded. Three
msgpack frames, each at most :data:`MAX_AUTH_FRAME` bytes:

1. worker → coordinator: ``{"auth": "challenge", "nonce": <32 random bytes>}``
2. coordinator → worker: ``{"auth": "response", "nonce": <32 random bytes>,
   "mac": HMAC-SHA256(token, "syncfed-auth-v1 client" + worker nonce + coordinator nonce)}``
3. worker → coordinator: ``{"auth": "ok", "mac": HMAC-SHA256(token, "syncfed-auth-v1 worker" +
   coordinator nonce + worker nonce)}``, or a close with code 1008.

MACs are compared in constant time. The worker's nonce is fresh for every
connection, so a recorded response cannot be replayed; the third frame
proves the worker knows the token too. No I/O here.

A worker that dials out (``--connect``) runs the same three frames the other
way round: the coordinator challenges, the worker responds, the coordinator
confirms. Both MACs then also cover ``context`` (:func:`dial_in_context`:
the direction and the worker id the connection claims), so a response made
for one direction or one worker proves nothing in another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any, Final

import msgpack

from .exceptions import AuthenticationFailed, ConfigError

__all__ = [
    "MAX_AUTH_FRAME",
    "WORKER_HEADER",
    "NONCE_SIZE",
    "read_token",
    "read_worker_tokens",
    "dial_in_context",
    "challenge",
    "is_challenge",
    "respond",
    "verify_response",
    "confirm",
    "verify_confirmation",
]

#: The HTTP header in which a worker that dials out names the id it will prove.
WORKER_HEADER: Final = "Syncfed-Worker"
NONCE_SIZE: Final = 32
MAX_AUTH_FRAME: Final = 256
_CLIENT: Final = b"syncfed-auth-v1 client"
_WORKER: Final = b"syncfed-auth-v1 worker"


def read_token(path: Path) -> bytes:
    """Read a shared token (surrounding whitespace ignored).

    Raises:
        ConfigError: if the file cannot be read or holds fewer than 16 bytes.
    """
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read auth token file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise ConfigError(f"auth token in {path} has {len(token)} bytes, below the minimum of 16 bytes")
    return token


def read_worker_tokens(path: Path) -> dict[str, bytes]:
    """Read a coordinator's dial-in token list: ``ID TOKEN-FILE`` per line, ``#`` comments, paths relative to it.

    Raises:
        ConfigError: if a line is malformed, an id repeats, two ids share a token (either could prove the
            other's id), or a token file cannot be read.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read worker tokens file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    tokens: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ConfigError(f"{path} line {number} must be 'ID TOKEN-FILE', not {line.strip()!r}")
        name, file = words
        if name in tokens:
            raise ConfigError(f"{path} line {number}: worker id {name!r} appears twice")
        token = read_token(path.parent / file)
        shared = [other for other, known in tokens.items() if hmac.compare_digest(known, token)]
        if shared:
            raise ConfigError(f"{path} line {number}: worker {name!r} has the same token as {shared[0]!r}")
        tokens[name] = token
    return tokens


def dial_in_context(worker_id: str) -> bytes:
    """What a dial-in handshake's MACs cover besides the nonces: the direction and the claimed worker id."""
    return b" dial-in " + worker_id.encode()


def _mac(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + first + second, hashlib.sha256).digest()


def _pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes, kind: str, fields: set[str]) -> dict[str, Any]:
    if len(data) > MAX_AUTH_FRAME:
        raise AuthenticationFailed(f"{kind} frame with {len(data)} bytes exceeds limit of {MAX_AUTH_FRAME} bytes")
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack's errors share no base; any of them means garbage
        raise AuthenticationFailed(f"expected an authentication {kind}, got something else") from None
    if not isinstance(frame, dict) or frame.get("auth") != kind or set(frame) != {"auth", *fields}:
        raise AuthenticationFailed(f"expected an authentication {kind}, got something else")
    for name in fields:
        if not isinstance(frame[name], bytes) or len(frame[name]) != NONCE_SIZE:
            raise AuthenticationFailed(f"authentication {kind} has an invalid {name}")
    return frame


def challenge() -> tuple[bytes, bytes]:
    """The worker's first frame and its nonce."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    return _pack({"auth": "challenge", "nonce": nonce}), nonce


def is_challenge(data: bytes) -> bool:
    """Whether ``data`` is a worker's challenge (to explain why a coordinator without a token fails)."""
    try:
        _unpack(data, "challenge", {"nonce"})
    except AuthenticationFailed:
        return False
    return True


def respond(token: bytes, challenge_frame: bytes, *, context: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """The coordinator's answer to a challenge: the frame, the worker's nonce and its own.

    Raises:
        AuthenticationFailed: if the challenge is malformed (the peer does not speak this).
    """
    worker_nonce = _unpack(challenge_frame, "challenge", {"nonce"})["nonce"]
    own = secrets.token_bytes(NONCE_SIZE)
    frame = _pack({"auth": "response", "nonce": own, "mac": _mac(token, _CLIENT + context, worker_nonce, own)})
    return frame, worker_nonce, own


def verify_response(token: bytes, worker_nonce: bytes, response_frame: bytes, *, context: bytes = b"") -> bytes:
    """Check the coordinator's response on the worker; return the coordinator's nonce.

    Raises:
        AuthenticationFailed: if the MAC is wrong (wrong token, or a replayed response).
    """
    frame = _unpack(response_frame, "response", {"nonce", "mac"})
    if not hmac.compare_digest(frame["mac"], _mac(token, _CLIENT + context, worker_nonce, frame["nonce"])):
        raise AuthenticationFailed("wrong token")
    return frame["nonce"]  # type: ignore[no-any-return]


def confirm(token: bytes, worker_nonce: bytes, client_nonce: bytes, *, context: bytes = b"") -> bytes:
    """The worker's proof that it knows the token too."""
    return _pack({"auth": "ok", "mac": _mac(token, _WORKER + context, client_nonce, worker_nonce)})


def verify_confirmation(
    token: bytes, worker_nonce: bytes, client_nonce: bytes, frame: bytes, *, context: bytes = b""
) -> None:
    """Check the worker's proof on the coordinator.

    Raises:
        AuthenticationFailed: if the worker does not know the token.
    """
    mac = _unpack(frame, "ok", {"mac"})["mac"]
    if not hmac.compare_digest(mac, _mac(token, _WORKER + context, client_nonce, worker_nonce)):
        raise AuthenticationFailed("the worker does not know the token")
