"""Peer bodies: a message's fields packed by hand, as a peer in another language would send them."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest

from syncfed.exceptions import LocalProtocolError, RemoteProtocolError
from syncfed.protocol import decode


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def envelope(kind: str, body: object, request_id: int = 9) -> bytes:
    return pack({"v": 1, "id": request_id, "kind": kind, "body": body})


def built_and_decoded(build: Callable[[], object], kind: str, body: dict[str, object], reason: str) -> None:
    """The same invalid message is the caller's mistake when built here and the peer's when decoded."""
    with pytest.raises(LocalProtocolError) as local:
        build()
    assert str(local.value) == reason
    with pytest.raises(RemoteProtocolError) as remote:
        decode(envelope(kind, body, 42))
    assert (str(remote.value), remote.value.code, remote.value.request_id) == (reason, "malformed", 42)
