"""``--worker-args [NAME=]ARGS``: flags for every spawned training worker, or for one worker by name."""

from __future__ import annotations

import pytest

from syncfed.cli.coordinator import parse_worker_args
from syncfed.exceptions import ConfigError

SPAWNED = ["alice", "bob", "dave", "testing"]


def test_flags_go_to_everyone_and_named_ones_to_their_worker_alone() -> None:
    every, own = parse_worker_args(
        [
            "--val-fraction 0.2",
            "dave=--digits 0,5,9",
            "--slowdown=0.1",
            " bob = '--val-fraction' 0",
            "dave=--shard-seed 3",
            "testing=--max-message-size 1GiB",
        ],
        SPAWNED,
    )
    assert every == ["--val-fraction", "0.2", "--slowdown=0.1"]
    assert own == {
        "dave": ["--digits", "0,5,9", "--shard-seed", "3"],
        "bob": ["--val-fraction", "0"],
        "testing": ["--max-message-size", "1GiB"],
    }


def test_nothing_given_is_nothing_added() -> None:
    assert parse_worker_args([], SPAWNED) == ([], {})
    assert parse_worker_args([""], SPAWNED) == ([], {})


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (
            "erin=--digits 1",
            "--worker-args 'erin=--digits 1' names 'erin', not a spawned worker (alice, bob, dave, testing)",
        ),
        ("dave=--port 9", "--worker-args dave cannot set --port: --spawn-workers sets it for each worker"),
        ("--id=x", "--worker-args cannot set --id: --spawn-workers sets it for each worker"),
        ("dave='--digits", '--worker-args dave "\'--digits": No closing quotation'),
    ],
)
def test_bad_entries_are_refused_in_one_line(entry: str, reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_worker_args([entry], SPAWNED)
    assert str(error.value) == reason
