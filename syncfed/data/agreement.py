"""Agreement before round 1: the workers' data schemas united into one data plan, or one line naming the worker
that differs, how, and the flag that fixes it.

Pure: the coordinator calls :func:`agree` on the schemas of its workers'
``info`` before round 1, then adds the statistics (:mod:`syncfed.data.normalization`).

Rules (``docs/protocol.md``, "A user's own data", states them for a coordinator in another language):

- Every worker holds the same kind of data: images, a table or arrays.
- Images: the same channels, then the same height and width.
- Arrays: the same input shape; feature names at every site or at none.
- Tables (and named arrays): the same set of feature names, in any order,
  since each site matches them by name; the same type (numeric or
  categorical) for each. A plan cannot pass the limit of features, since each
  site's schema is within it and every site must list the same ones.
- The label is continuous at every site or has classes at every site.
- Class names that differ only in case or surrounding spaces are refused when
  one site holds one without the other and another site the other without the
  first, even if a third holds both: a typo would otherwise silently make two
  classes. A site that holds both spellings, with the others holding one, is fine.
- With the evaluator named, a class that only it holds is refused: no trainer
  has an example of it, so the model could never learn it.

Where one worker differs from all the others (three workers or more) the line
names it against "the others"; otherwise it names both workers. The worker it
asks to change is the one that differs from the most common value (the first
worker's, on a tie).

The plan:

- ``classes``: the union of every worker's class names, the evaluator's
  included, in :func:`~syncfed.data.labels.class_order`; ``None`` for a continuous label;
- ``features``: in :func:`~syncfed.data.labels.class_order` too, not any file's
  order, so the plan (and the input layout of a checkpoint) does not depend
  on the order the workers are listed in;
- ``categories``: per categorical feature, the union of the categories the
  sites reveal (each only those held by at least its ``--min-group-size``
  examples), in :func:`~syncfed.data.labels.class_order`;
- ``input_shape``: a table's encoded width, otherwise the schemas' shape;
- no statistics.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..exceptions import ConfigError, IncompatibleWorkers
from ..protocol.base import MAX_CLASSES
from ..protocol.data_messages import MAX_CATEGORIES, MAX_VOCABULARY, DataPlan, DataSchema, encoded_width
from .labels import class_order

__all__ = ["agree"]

#: A kind of data as a line names it: "bob holds a table, the others images".
_HOLDS: Final = {"images": "images", "table": "a table", "arrays": "arrays"}


@dataclass(frozen=True)
class _Odd:
    """The first worker whose value differs from the most common one, and whom a line compares it with."""

    name: str
    value: Any  # hashable: a kind, a shape, a set of names...
    common: Any
    other: str | None  # None: every other worker holds the common value ("the others")

    @property
    def them(self) -> str:
        """'the others', or the other worker's name."""
        return "the others" if self.other is None else self.other

    @property
    def theirs(self) -> str:
        """'the others'', or the other worker's name with 's."""
        return "the others'" if self.other is None else f"{self.other}'s"


def _odd_one(values: Mapping[str, Any]) -> _Odd | None:
    """Who differs from the most common value (ties: the first worker's), or ``None`` when all agree."""
    counts = Counter(values.values())
    if len(counts) == 1:
        return None
    common = max(counts, key=counts.__getitem__)  # insertion order breaks ties: the first worker's value
    name = next(name for name, value in values.items() if value != common)
    if len(values) >= 3 and counts[common] == len(values) - 1:
        return _Odd(name, values[name], common, None)
    return _Odd(name, values[name], common, next(n for n, value in values.items() if value == common))


def _check_same(
    schemas: Mapping[str, DataSchema], value: Callable[[DataSchema], Any], line: Callable[[_Odd], str]
) -> None:
    odd = _odd_one({name: value(schema) for name, schema in schemas.items()})
    if odd is not None:
        raise IncompatibleWorkers(line(odd))


def agree(schemas: Mapping[str, DataSchema], *, evaluator: str | None = None) -> DataPlan:
    """The data plan every worker of ``schemas`` (worker name to its ``info`` schema) can prepare, without statistics.

    ``evaluator`` names the evaluator among them, if one is; its classes join
    the plan, and one no trainer holds is refused.

    Raises:
        IncompatibleWorkers: one line naming the worker and the difference (see the module's rules).
        ConfigError: if there are no schemas, or ``evaluator`` is not among them.
    """
    if not schemas:
        raise ConfigError("no workers' data schemas to agree on")
    if evaluator is not None and evaluator not in schemas:
        raise ConfigError(f"evaluator {evaluator} is not among the workers whose schemas are to agree")
    _check_same(schemas, lambda s: s.kind, lambda o: f"{o.name} holds {_HOLDS[o.value]}, {o.them} {_HOLDS[o.common]}")
    kind = next(iter(schemas.values())).kind
    _check_same(schemas, lambda s: s.classes is None, _label_line)
    if kind == "images":
        _check_same(
            schemas,
            lambda s: s.input_shape[0],
            lambda o: (
                f"{o.name}'s images are {o.value}-channel, {o.them} {o.common}: start it with --channels {o.common}"
            ),
        )
        _check_same(schemas, lambda s: s.input_shape[1:], _size_line)
    elif kind == "arrays":
        _check_same(schemas, lambda s: s.input_shape, _shape_line)
        _check_same(schemas, lambda s: bool(s.features), _naming_line)
    features, categories = _features(schemas, kind)
    classes = _classes(schemas, evaluator)
    shape = (encoded_width(features, categories),) if kind == "table" else next(iter(schemas.values())).input_shape
    labels = {schema.label for schema in schemas.values()}
    label = labels.pop() if len(labels) == 1 else None  # named only where every site names it the same
    return DataPlan(kind, shape, classes, features, categories, label=label)


def _label_line(odd: _Odd) -> str:
    if odd.value:  # its label is non-integral numbers: read as classes, each value would be a class of its own
        return (
            f"{odd.name} has a continuous label (non-integral numbers), {odd.them} class names: check its label"
            " column, or start every site with --label-type continuous"
        )
    return f"{odd.name} has class names, {odd.them} a continuous label: start it with --label-type continuous"


def _size_line(odd: _Odd) -> str:
    (height, width), (common_height, common_width) = odd.value, odd.common
    return (
        f"{odd.name}'s images are {height}x{width} pixels, {odd.them} {common_height}x{common_width}:"
        f" start it with --image-size {common_height},{common_width}"
    )


def _shape_line(odd: _Odd) -> str:
    def shape(value: tuple[int, ...]) -> str:
        return "x".join(str(size) for size in value)

    return f"{odd.name}'s examples have shape {shape(odd.value)}, {odd.them} {shape(odd.common)}"


def _naming_line(odd: _Odd) -> str:
    if odd.value:
        return f"{odd.name}'s arrays name their features, {odd.theirs} do not: name them at every site or at none"
    return f"{odd.name}'s arrays do not name their features, {odd.theirs} do: name them at every site or at none"


def _features(schemas: Mapping[str, DataSchema], kind: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The plan's features and categorical vocabularies: every site has the same names, each of one type."""
    if kind == "images" or not next(iter(schemas.values())).features:
        return (), {}
    holds, column = ("table has", "column") if kind == "table" else ("arrays have", "feature")
    odd = _odd_one({name: frozenset(f.name for f in schema.features) for name, schema in schemas.items()})
    if odd is not None:
        own, common = set(odd.value), set(odd.common)
        missing = class_order(common - own)
        if missing:
            similar = [name for name in own if _folded(name) == _folded(missing[0])]
            hint = f" (it has {similar[0]!r})" if similar else ""
            raise IncompatibleWorkers(f"{odd.name}'s {holds} no {column} {missing[0]!r}{hint}")
        extra = class_order(own - common)[0]
        lack = "the others lack" if odd.other is None else f"{odd.other}'s lacks"
        fix = f": start it with --feature-columns {','.join(class_order(common))}" if kind == "table" else ""
        raise IncompatibleWorkers(f"{odd.name}'s {holds} a {column} {extra!r} that {lack}{fix}")
    features = class_order(f.name for f in next(iter(schemas.values())).features)
    types = {name: {f.name: f for f in schema.features} for name, schema in schemas.items()}
    for feature in features:
        odd = _odd_one({name: held[feature].type for name, held in types.items()})
        if odd is not None:
            fix = "with" if odd.value == "numeric" else "without"
            raise IncompatibleWorkers(
                f"{odd.name}'s column {feature!r} is {odd.value}, {odd.theirs} {odd.common}:"
                f" start it {fix} {feature!r} in --categorical-columns"
            )
    categories = {
        feature: class_order(c for held in types.values() for c in held[feature].categories)
        for feature in features
        if types[next(iter(types))][feature].type == "categorical"
    }
    for feature, vocabulary in categories.items():
        if len(vocabulary) > MAX_CATEGORIES:
            raise IncompatibleWorkers(
                f"column {feature!r} has {len(vocabulary)} categories over all sites, exceeding limit of"
                f" {MAX_CATEGORIES}: start the workers with a larger --min-group-size"
            )
    total = sum(len(vocabulary) for vocabulary in categories.values())
    if total > MAX_VOCABULARY:
        raise IncompatibleWorkers(
            f"the categorical columns have {total} categories over all sites, exceeding limit of {MAX_VOCABULARY}:"
            " start the workers with a larger --min-group-size"
        )
    return features, categories


def _folded(name: str) -> str:
    """A name as a typo would not change it: without case or surrounding spaces."""
    return name.strip().casefold()


def _check_spellings(held: Mapping[str, set[str]], classes: tuple[str, ...]) -> None:
    """Refuse two spellings of one class (:func:`_folded`) that one site holds without the other and another
    site the other way round: the two sites may mean one class.

    The sites holding the spellings of one class must nest, each set within the next larger one (a site that
    holds both spellings tells them apart; one that holds a spelling alone is then one of them). Linear in the
    names the sites hold: one pass over each site's names, then per class one comparison of each distinct
    set of sites with the next larger one, never of every pair of spellings (one hello may list thousands).
    """
    spellings: dict[str, list[str]] = {}
    for name in classes:
        spellings.setdefault(_folded(name), []).append(name)
    groups = [variants for variants in spellings.values() if len(variants) > 1]
    wanted = {name for variants in groups for name in variants}
    holders: dict[str, list[str]] = {}
    for worker, names in held.items():
        for name in names & wanted:
            holders.setdefault(name, []).append(worker)
    for variants in groups:
        spelt: dict[frozenset[str], str] = {}  # each distinct set of sites, and its first spelling in class order
        for name in variants:
            spelt.setdefault(frozenset(holders[name]), name)
        nested = sorted(spelt.items(), key=lambda entry: len(entry[0]))
        for (fewer, one), (more, other) in itertools.pairwise(nested):
            if not fewer <= more:  # neither set holds the other: each has a site the other lacks
                a = next(worker for worker in held if worker in fewer and worker not in more)
                b = next(worker for worker in held if worker in more and worker not in fewer)
                (a, one), (b, other) = sorted([(a, one), (b, other)], key=lambda pair: pair[1])
                raise IncompatibleWorkers(
                    f"{a}'s class {one!r} and {b}'s class {other!r} differ only in case or surrounding spaces:"
                    " name the class the same way at every site"
                )


def _classes(schemas: Mapping[str, DataSchema], evaluator: str | None) -> tuple[str, ...] | None:
    """The union of the class names, after the checks on names that only a typo or only the evaluator explains."""
    if next(iter(schemas.values())).classes is None:
        return None
    held = {name: set(schema.classes or ()) for name, schema in schemas.items()}
    classes = class_order(c for names in held.values() for c in names)
    _check_spellings(held, classes)
    trainers = [names for name, names in held.items() if name != evaluator]
    if evaluator is not None and trainers:
        taught = set().union(*trainers)
        unknown = [name for name in classes if name not in taught]
        if unknown:
            raise IncompatibleWorkers(
                f"only the evaluator {evaluator} holds class {unknown[0]!r}: no trainer has an example of it,"
                " so the model could never learn it"
            )
    if len(classes) > MAX_CLASSES:
        raise IncompatibleWorkers(f"the sites hold {len(classes)} classes together, exceeding limit of {MAX_CLASSES}")
    return classes
