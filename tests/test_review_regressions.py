"""Regression tests for defects found in review: crafted tensors, unauthenticated frame sizes, mismatched updates."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from syncfed.coordinator import _mismatch
from syncfed.exceptions import ProtocolError, describe
from syncfed.protocol import decode

PLAN = {"round": 1, "batch_size": 1, "num_batches": 1, "lr": 0.1, "seed": 1}


def fit(tensor: dict[str, object]) -> bytes:
    body = {"model": "digits-cnn", "weights": {"w": tensor}, "plan": PLAN}
    return msgpack.packb({"v": 1, "id": 5, "kind": "fit", "body": body})  # type: ignore[no-any-return]


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**64 - 1], [2**40, 0]])
def test_empty_tensors_with_huge_sizes_are_bad_tensors(shape: list[int]) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(fit({"dtype": "float32", "shape": shape, "data": b""}))
    assert raised.value.code == "bad_tensor"
    assert raised.value.request_id == 5


def test_error_messages_stay_short_whatever_the_peer_sent() -> None:
    with pytest.raises(ProtocolError) as raised:
        decode(msgpack.packb({"v": 1, "id": 1, "kind": "x" * 5_000_000, "body": {}}))
    assert len(str(raised.value)) < 200
    assert len(describe(list(range(10**6)))) < 200


def test_updates_that_do_not_fit_the_model_are_named() -> None:
    model = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert _mismatch(dict(model), model) is None
    assert _mismatch({"a": model["a"]}, model) == "tensors ['b'] do not match the model's"
    wrong = {"a": np.zeros((3, 2), np.float32), "b": model["b"]}
    assert _mismatch(wrong, model) == "tensor a is float32[3, 2], the model's is float32[2, 3]"


def test_an_unauthenticated_peer_cannot_send_a_large_frame(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-of-enough-bytes")
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [
            sys.executable,
            str(root / "run_websocket_server.py"),
            "--id",
            "alice",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
            "--auth-token-file",
            str(token),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        uri = ""
        for _ in range(5):
            line = process.stdout.readline()
            if "listening on" in line:
                uri = line.split()[-1]
                break
        assert uri.startswith("ws://")

        async def probe() -> tuple[int | None, str]:
            async with connect(uri, compression=None, max_size=None) as connection:
                await asyncio.wait_for(connection.recv(), 10)  # the challenge
                await connection.send(b"\0" * 10_000)  # far over the 256-byte handshake limit
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(connection.recv(), 10)
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

        code, reason = asyncio.run(asyncio.wait_for(probe(), 30))
        assert code == 1009  # message too big, refused by websockets before buffering it
    finally:
        process.kill()
        process.wait(timeout=10)
