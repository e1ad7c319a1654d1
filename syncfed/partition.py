"""Which examples each worker holds: pure, index-based sharding by class.

The classic demo gives alice digits 0-3, bob 4-6 and charlie 7-9; any worker
can be given any set of classes. Functions return index arrays and never
touch files, so a shard is a view of a data set loaded elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .exceptions import ConfigError

__all__ = [
    "DEFAULT_CLASSES",
    "default_classes",
    "parse_classes",
    "parse_shard",
    "class_indices",
    "iid_shard",
    "group_label",
    "stratified_split",
]

#: The classic demo's shards by worker id.
DEFAULT_CLASSES: dict[str, tuple[int, ...]] = {
    "alice": (0, 1, 2, 3),
    "bob": (4, 5, 6),
    "charlie": (7, 8, 9),
}


def default_classes(worker_id: str) -> tuple[int, ...]:
    """The classes a training worker holds when no ``--digits`` are given.

    Raises:
        ConfigError: if the id has no default shard.
    """
    try:
        return DEFAULT_CLASSES[worker_id]
    except KeyError:
        known = ", ".join(DEFAULT_CLASSES)
        raise ConfigError(
            f"worker id {worker_id!r} has no default digits (only {known} do); pass --digits, e.g. --digits 0,5,9"
        ) from None


def parse_classes(text: str, num_classes: int = 10) -> tuple[int, ...]:
    """Parse ``"0,5,9"`` or ``"0-3,7"`` into sorted, distinct class indices.

    Raises:
        ConfigError: if an entry is not a class in ``0..num_classes-1``.
    """
    classes: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ConfigError(f"digits {text!r} must be a comma-separated list such as 0,5,9 or 0-3") from None
        if not 0 <= first <= last < num_classes:
            raise ConfigError(f"digits entry {part!r} is not within 0..{num_classes - 1}")
        classes.update(range(first, last + 1))
    return tuple(sorted(classes))


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"2/4"`` (shard 2 of 4, counted from 1) into ``(1, 4)``, zero-based.

    Raises:
        ConfigError: if it is not ``K/N`` with ``1 <= K <= N``.
    """
    shard, slash, count = text.partition("/")
    try:
        index, total = int(shard), int(count)
    except ValueError:
        raise ConfigError(f"shard {text!r} must look like 2/4 (the second of four IID shards)") from None
    if not slash or not 1 <= index <= total:
        raise ConfigError(f"shard {text!r} must be K/N with 1 <= K <= N")
    return index - 1, total


def iid_shard(num_examples: int, shard: int, num_shards: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of IID shard ``shard`` of ``num_shards``: a seeded shuffle cut into near-equal parts.

    Every worker given the same seed draws the same shuffle, so the shards
    are disjoint and together cover the data set.
    """
    order = rng.permutation(num_examples)
    return np.sort(np.array_split(order, num_shards)[shard])


def class_indices(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Indices of the examples whose label is one of ``classes``, in order."""
    return np.flatnonzero(np.isin(labels, np.fromiter(classes, dtype=np.int64)))


def group_label(classes: Sequence[int]) -> str:
    """Name a set of classes compactly: ``(0, 1, 2, 3)`` is ``"0-3"``, ``(0, 5, 6)`` is ``"0,5-6"``."""
    parts: list[str] = []
    ordered = sorted(set(classes))
    start = 0
    for index in range(1, len(ordered) + 1):
        if index == len(ordered) or ordered[index] != ordered[index - 1] + 1:
            first, last = ordered[start], ordered[index - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = index
    return ",".join(parts)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and test indices of ``labels``, each class split in proportion: the split of scikit-learn's
    ``train_test_split(..., test_size=test_fraction, random_state=seed, stratify=labels)``, draw for draw.

    Our own so that a worker holding the bundled digits need not import scikit-learn's model selection (1.5 s,
    more than the data's load); the tests check it against scikit-learn's.

    Raises:
        ConfigError: if a class has fewer than two examples, or either side gets fewer examples than classes.
    """
    total = len(labels)
    tested = int(np.ceil(test_fraction * total))
    trained = total - tested
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(trained, tested) < len(classes):
        raise ConfigError(
            f"cannot split {total} examples of {len(classes)} classes (the smallest has {counts.min()})"
            f" into {trained} for training and {tested} for testing, each class on both sides"
        )
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _proportional_counts(counts, trained, rng)
    test_counts = _proportional_counts(counts - train_counts, tested, rng)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for members, n_train, n_test in zip(by_class, train_counts, test_counts, strict=True):
        shuffled = members[rng.permutation(len(members))]
        train.append(shuffled[:n_train])
        test.append(shuffled[n_train : n_train + n_test])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _proportional_counts(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``draws`` shared among classes of ``counts`` in proportion: floors first, then one more each to the
    largest remainders, ties among equal remainders drawn at random."""
    exact = counts / counts.sum() * draws
    shares: np.ndarray = np.floor(exact)
    missing = int(draws - shares.sum())
    remainders = exact - shares
    for remainder in np.unique(remainders)[::-1]:
        if missing <= 0:
            break
        (tied,) = np.nonzero(remainders == remainder)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(np.int64)
