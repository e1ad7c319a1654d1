"""Local misuse against a peer's garbage: the same bad message is LocalProtocolError built here, Remote decoded."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from syncfed.cli.common import exit_code, fail
from syncfed.config import CoordinatorConfig
from syncfed.exceptions import (
    ConfigError,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    SyncfedError,
    TensorError,
)
from syncfed.protocol import (
    MAX_PLAN_SIZE,
    Fit,
    Info,
    MessageDecoder,
    Opened,
    Query,
    SecAggStart,
    TrainingPlan,
    decode,
    encode,
)
from syncfed.secagg import SecAggConfig

BAD_BATCH = "batch_size must be an integer from 1 to 1000000, not 0"
WEIGHTS = {"w": np.arange(4, dtype=np.float32)}


def plan_body(**changes: object) -> dict[str, object]:
    return {**TrainingPlan(round=1, batch_size=8, num_batches=2, lr=0.1, seed=3).to_body(), **changes}


def fit_frame(request_id: int, **plan_changes: object) -> bytes:
    """A fit request as a peer could send it: a valid envelope whose plan carries ``plan_changes``."""
    envelope = msgpack.unpackb(encode(request_id, Fit("m", WEIGHTS, TrainingPlan(1, 8, 2, 0.1, 3))), raw=False)
    envelope["body"]["plan"] = plan_body(**plan_changes)
    return msgpack.packb(envelope, use_bin_type=True)  # type: ignore[no-any-return]


def test_the_two_sides_are_protocol_errors_and_neither_is_the_other() -> None:
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    # What a peer sent: too much, or a tensor that does not add up.
    assert issubclass(MessageTooLarge, RemoteProtocolError) and issubclass(TensorError, RemoteProtocolError)


def test_a_bad_plan_built_here_is_local() -> None:
    with pytest.raises(LocalProtocolError, match=f"^{BAD_BATCH}$") as info:
        TrainingPlan(round=1, batch_size=0, num_batches=2, lr=0.1, seed=3)
    assert not isinstance(info.value, RemoteProtocolError)
    assert info.value.code == "malformed" and info.value.request_id is None


def test_the_same_plan_decoded_is_remote_with_the_request_id() -> None:
    with pytest.raises(RemoteProtocolError, match=f"^{BAD_BATCH}$") as info:
        decode(fit_frame(42, batch_size=0))
    assert not isinstance(info.value, LocalProtocolError)
    assert (info.value.code, info.value.request_id, info.value.reason) == ("malformed", 42, BAD_BATCH)


def test_a_body_built_after_the_session_rules_is_remote_too() -> None:
    """The worker opens the envelope, applies its rules, then builds: the build is the peer's message."""
    body = msgpack.unpackb(fit_frame(7, batch_size=0), raw=False)["body"]
    with pytest.raises(RemoteProtocolError, match=f"^{BAD_BATCH}$") as info:
        Opened(7, "fit", body).build()
    assert info.value.request_id == 7


def test_a_field_of_the_wrong_type_decoded_is_remote() -> None:
    """A type no check foresaw (an unhashable dtype) still reaches the caller as the peer's error."""
    envelope = msgpack.unpackb(encode(5, Info("a", "trainer", "d", (1,), 1, (1,), ())), raw=False)
    entry = {"key": "k", "dataset": "d", "split": "train", "version": "v", "input_shape": [1], "num_classes": 1}
    envelope["body"]["datasets"] = [{**entry, "dtype": [1], "histogram": [1]}]
    with pytest.raises(RemoteProtocolError, match="^info has an invalid field: unhashable type: 'list'$") as info:
        decode(msgpack.packb(envelope, use_bin_type=True))
    assert info.value.request_id == 5 and not isinstance(info.value, LocalProtocolError)


def test_envelope_errors_are_remote_with_their_codes() -> None:
    unknown = msgpack.packb({"v": 1, "id": 9, "kind": "teleport", "body": {}})
    with pytest.raises(RemoteProtocolError, match="^message kind 'teleport' is unknown$") as info:
        decode(unknown)
    assert (info.value.code, info.value.request_id) == ("unknown_kind", 9)
    with pytest.raises(RemoteProtocolError, match="^invalid msgpack: ") as garbage:
        decode(b"\xc1")
    assert garbage.value.request_id is None


def test_a_secure_round_config_out_of_range_is_remote_when_decoded() -> None:
    config = SecAggConfig(num_clients=4, threshold=3, length=8, clip=1.0, session=b"k" * 32)
    envelope = msgpack.unpackb(encode(3, SecAggStart(config, 0)), raw=False)
    envelope["body"]["config"]["threshold"] = 2
    with pytest.raises(RemoteProtocolError, match="^invalid secure aggregation config: threshold 2") as info:
        decode(msgpack.packb(envelope, use_bin_type=True))
    assert info.value.request_id == 3


def test_a_bad_tensor_and_an_oversized_message_are_remote() -> None:
    frame = msgpack.unpackb(encode(4, Fit("m", WEIGHTS, TrainingPlan(1, 8, 2, 0.1, 3))), raw=False)
    frame["body"]["weights"]["w"]["data"] = b"\x00" * 3
    with pytest.raises(TensorError) as info:
        decode(msgpack.packb(frame, use_bin_type=True))
    assert isinstance(info.value, RemoteProtocolError) and info.value.request_id == 4
    decoder = MessageDecoder(max_size=10)
    decoder.feed(encode(6, Fit("m", WEIGHTS, TrainingPlan(1, 8, 2, 0.1, 3))))
    with pytest.raises(MessageTooLarge) as too_large:
        decoder.finish()
    assert isinstance(too_large.value, RemoteProtocolError)


def test_a_bad_query_built_here_is_local() -> None:
    with pytest.raises(LocalProtocolError, match="^bins must be an integer from 1 to 4096, not 0$"):
        Query("quantiles", (), 0, (0.0, 1.0))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LocalProtocolError(BAD_BATCH), 2),  # the user's settings built a bad plan: a configuration error
        (RemoteProtocolError(BAD_BATCH, request_id=42), 7),  # a peer sent it
        (ProtocolError("answered fit with pong, expected fit_result"), 7),
        (MessageTooLarge(12, 8), 7),
        (TensorError("tensor w has 3 bytes but float32[4] need 16"), 7),
        (ConfigError("lr must be a positive number, not 0"), 2),
    ],
)
def test_exit_codes_tell_local_from_remote(error: SyncfedError, code: int) -> None:
    assert exit_code(error) == code


def test_a_local_protocol_error_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("syncfed-client", LocalProtocolError(BAD_BATCH)) == 2
    assert capsys.readouterr().err == f"syncfed-client: error: {BAD_BATCH}\n"


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 0},
        {"batch_size": MAX_PLAN_SIZE + 1},
        {"federate_after_n_batches": -1},
        {"federate_after_n_batches": MAX_PLAN_SIZE + 1},
        {"lr": 0.0},
        {"lr": float("nan")},
    ],
)
def test_the_coordinator_config_refuses_a_bad_plan_before_anything_is_sent(settings: dict[str, object]) -> None:
    """It checks the plan's fields itself, so a bad plan is a ConfigError (exit 2) before any worker is reached."""
    with pytest.raises(ConfigError):
        CoordinatorConfig(workers={"alice": "ws://127.0.0.1:1"}, **settings)  # type: ignore[arg-type]
