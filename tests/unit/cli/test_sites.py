"""``--site NAME=DATA [FLAGS]``: a local federation over the user's files, each site with flags of its own."""

from __future__ import annotations

import pytest

from syncfed.cli.coordinator import parse_sites
from syncfed.exceptions import ConfigError


def test_sites_keep_their_order_and_their_own_flags() -> None:
    sites = parse_sites(
        ["alice=csv:a.csv", "bob = csv:'my data/b.csv' --categorical-columns dose", "testing=npz:t.npz"]
    )
    assert sites == {
        "alice": ("csv:a.csv", []),
        "bob": ("csv:my data/b.csv", ["--categorical-columns", "dose"]),
        "testing": ("npz:t.npz", []),
    }


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        (["alice"], "--site 'alice' must look like alice=csv:alice.csv (NAME=DATA, then its own flags)"),
        (["=csv:a.csv"], "--site '=csv:a.csv' must look like alice=csv:alice.csv (NAME=DATA, then its own flags)"),
        (
            ["alice=--missing mean"],
            "--site 'alice=--missing mean' must look like alice=csv:alice.csv (NAME=DATA, then its own flags)",
        ),
        (["alice=csv:a.csv", "alice=csv:b.csv"], "--site 'alice' appears twice"),
        (["alice=csv:a.csv --port 9"], "--site alice cannot set --port: --spawn-workers sets it for each worker"),
    ],
)
def test_bad_sites_are_refused_in_one_line(entries: list[str], reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_sites(entries)
    assert str(error.value) == reason
