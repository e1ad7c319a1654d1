"""Pure, index-based sharding by class."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.exceptions import ConfigError
from syncfed.partition import (
    DEFAULT_CLASSES,
    class_indices,
    default_classes,
    group_label,
    iid_shard,
    parse_classes,
    parse_shard,
    stratified_split,
)

FAST = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,5,9", (0, 5, 9)),
        ("0-3,7", (0, 1, 2, 3, 7)),
        ("9,0", (0, 9)),
        ("3,3,1-3", (1, 2, 3)),
        ("4", (4,)),
        ("0-9", tuple(range(10))),
        (" 1 , 2 ", (1, 2)),
        ("5-5", (5,)),
    ],
)
def test_parse_classes(text: str, expected: tuple[int, ...]) -> None:
    assert parse_classes(text) == expected


def test_parse_classes_with_more_classes() -> None:
    assert parse_classes("10-12,99", num_classes=100) == (10, 11, 12, 99)
    with pytest.raises(ConfigError):
        parse_classes("10", num_classes=10)


@pytest.mark.parametrize("text", ["a", "", "1,,2", "1;2", "1-2-3", "-1", "0.5", "x-3"])
def test_parse_classes_rejects_non_numbers_and_names_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_classes(text)
    assert str(info.value) == f"digits {text!r} must be a comma-separated list such as 0,5,9 or 0-3"


@pytest.mark.parametrize(("text", "entry"), [("10", "10"), ("0,5,12", "12"), ("3-1", "3-1"), ("8-10", "8-10")])
def test_parse_classes_rejects_out_of_range_and_names_the_entry(text: str, entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_classes(text)
    assert str(info.value) == f"digits entry {entry!r} is not within 0..9"


@pytest.mark.parametrize(
    ("worker", "classes"),
    [("alice", (0, 1, 2, 3)), ("bob", (4, 5, 6)), ("charlie", (7, 8, 9))],
)
def test_default_classes(worker: str, classes: tuple[int, ...]) -> None:
    assert default_classes(worker) == classes


def test_default_shards_cover_every_digit_once() -> None:
    everything = sorted(c for classes in DEFAULT_CLASSES.values() for c in classes)
    assert everything == list(range(10))


@pytest.mark.parametrize("worker", ["dave", "Alice", "", "evaluator"])
def test_default_classes_for_other_ids(worker: str) -> None:
    with pytest.raises(ConfigError) as info:
        default_classes(worker)
    assert str(info.value) == (
        f"worker id {worker!r} has no default digits (only alice, bob, charlie do); pass --digits, e.g. --digits 0,5,9"
    )


@FAST
@given(
    labels=st.lists(st.integers(0, 9), max_size=200),
    classes=st.sets(st.integers(0, 9)) | st.lists(st.integers(0, 9)),
)
def test_class_indices_agree_with_a_comprehension(labels: list[int], classes: set[int] | list[int]) -> None:
    result = class_indices(np.array(labels, dtype=np.int64), classes)
    expected = [i for i, label in enumerate(labels) if label in set(classes)]
    assert result.tolist() == expected
    assert np.issubdtype(result.dtype, np.integer)


def test_class_indices_accepts_a_generator_and_selects_a_view_of_the_data() -> None:
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    indices = class_indices(labels, (c for c in (1, 9)))
    assert indices.tolist() == [1, 3, 5]
    assert labels[indices].tolist() == [1, 1, 9]


@pytest.mark.parametrize(
    ("classes", "label"),
    [
        ((0, 1, 2, 3), "0-3"),
        ((0, 5, 6), "0,5-6"),
        ((7,), "7"),
        ((9, 7, 8), "7-9"),
        ((1, 3, 5), "1,3,5"),
        ((2, 2, 3), "2-3"),
        ((), ""),
    ],
)
def test_group_label(classes: tuple[int, ...], label: str) -> None:
    assert group_label(classes) == label


@FAST
@given(st.sets(st.integers(0, 99), min_size=1))
def test_group_label_round_trips_through_parse_classes(classes: set[int]) -> None:
    label = group_label(sorted(classes))
    assert parse_classes(label, num_classes=100) == tuple(sorted(classes))


@FAST
@given(st.integers(0, 500), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_iid_shards_are_disjoint_cover_everything_and_are_balanced(size: int, count: int, seed: int) -> None:
    shards = [iid_shard(size, k, count, np.random.default_rng(seed)) for k in range(count)]
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(size))  # disjoint and covering
    lengths = [len(shard) for shard in shards]
    assert max(lengths) - min(lengths) <= 1
    assert all(np.all(np.diff(shard) > 0) for shard in shards)  # sorted, as views of the data set expect


def test_iid_shards_depend_on_the_seed_only() -> None:
    first = iid_shard(100, 1, 4, np.random.default_rng(7))
    assert np.array_equal(first, iid_shard(100, 1, 4, np.random.default_rng(7)))
    assert not np.array_equal(first, iid_shard(100, 1, 4, np.random.default_rng(8)))


@pytest.mark.parametrize(("text", "expected"), [("1/4", (0, 4)), ("4/4", (3, 4)), ("1/1", (0, 1))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "2/"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="shard"):
        parse_shard(text)


@FAST
@given(
    counts=st.lists(st.integers(2, 40), min_size=2, max_size=8),
    test_fraction=st.floats(0.1, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_is_scikit_learns(counts: list[int], test_fraction: float, seed: int) -> None:
    from sklearn.model_selection import train_test_split

    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)) * 3 + 1, counts))
    tested = int(np.ceil(test_fraction * len(labels)))
    if min(tested, len(labels) - tested) < len(counts):
        with pytest.raises(ConfigError, match="each class on both sides"):
            stratified_split(labels, test_fraction, seed)
        return
    expected = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)
    train, test = stratified_split(labels, test_fraction, seed)
    np.testing.assert_array_equal(train, expected[0])
    np.testing.assert_array_equal(test, expected[1])
    assert sorted([*train, *test]) == list(range(len(labels)))


def test_stratified_split_refuses_a_class_of_one_example() -> None:
    with pytest.raises(ConfigError, match=r"the smallest has 1\)"):
        stratified_split(np.array([0, 0, 0, 1, 2, 2]), 0.5, 0)
