"""Agreement before round 1: one plan from the workers' schemas, or one line naming who differs and how to fix it."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from syncfed.data.agreement import agree
from syncfed.exceptions import ConfigError, IncompatibleWorkers
from syncfed.protocol import MAX_CLASSES, DataPlan, DataSchema, Feature
from syncfed.protocol.data_messages import MAX_CATEGORIES, MAX_VOCABULARY

CLASSES = ("no", "yes")


def table(*columns: str | tuple[str, tuple[str, ...]], classes: tuple[str, ...] | None = CLASSES) -> DataSchema:
    """A table's schema: a name is a numeric column, (name, categories) a categorical one."""
    features = tuple(
        Feature(column) if isinstance(column, str) else Feature(column[0], "categorical", column[1])
        for column in columns
    )
    return DataSchema("table", (len(features),), classes, features)


def images(channels: int = 1, height: int = 28, width: int = 28, classes: tuple[str, ...] = CLASSES) -> DataSchema:
    return DataSchema("images", (channels, height, width), classes)


def arrays(*shape: int, names: tuple[str, ...] = (), classes: tuple[str, ...] | None = CLASSES) -> DataSchema:
    return DataSchema("arrays", shape, classes, tuple(Feature(name) for name in names))


def refused(schemas: dict[str, DataSchema], line: str, *, evaluator: str | None = None) -> None:
    with pytest.raises(IncompatibleWorkers) as info:
        agree(schemas, evaluator=evaluator)
    assert str(info.value) == line
    assert "\n" not in str(info.value)


# The plan ----------------------------------------------------------------------------------------


def test_a_table_plan_unites_classes_and_categories_and_orders_features_by_name() -> None:
    alice = table("bmi", ("city", ("Oslo", "Bern")), "age", classes=("yes",))
    bob = table("age", "bmi", ("city", ("Rome",)), classes=("no",))
    plan = agree({"alice": alice, "bob": bob})
    assert plan == DataPlan("table", (6,), ("no", "yes"), ("age", "bmi", "city"), {"city": ("Bern", "Oslo", "Rome")})
    assert (plan.mean, plan.std) == ((), ())


def test_the_plan_does_not_depend_on_the_order_of_the_workers() -> None:
    schemas = {
        "alice": table("b", "a", ("c", ("x",)), classes=("2",)),
        "bob": table("a", ("c", ("y", "x")), "b", classes=("10", "1")),
        "carol": table(("c", ()), "a", "b", classes=("3",)),
    }
    plans = [agree(dict(order)) for order in itertools.permutations(schemas.items())]
    assert len({plan.digest() for plan in plans}) == 1


def test_class_order_numbers_by_value_text_as_text() -> None:
    numbers = agree({"a": arrays(2, classes=("10", "2")), "b": arrays(2, classes=("1", "9"))})
    assert numbers.classes == ("1", "2", "9", "10")
    text = agree({"a": arrays(2, classes=("b", "10")), "b": arrays(2, classes=("C", "2"))})
    assert text.classes == ("10", "2", "C", "b")


def test_a_site_without_a_class_still_trains_the_whole_model() -> None:
    """A hospital with no pneumonia cases trains the same two-class model; the evaluator scores both."""
    plan = agree(
        {
            "st-marys": images(classes=("NORMAL",)),
            "north": images(classes=("NORMAL", "PNEUMONIA")),
            "testing": images(classes=("NORMAL", "PNEUMONIA")),
        },
        evaluator="testing",
    )
    assert plan == DataPlan("images", (1, 28, 28), ("NORMAL", "PNEUMONIA"))


def test_a_categorical_column_no_site_reveals_a_category_of_keeps_its_other_slot() -> None:
    plan = agree({"alice": table("age", ("rare", ())), "bob": table("age", ("rare", ()))})
    assert plan.categories == {"rare": ()} and plan.input_shape == (2,)


def test_continuous_labels_agree_on_no_classes() -> None:
    plan = agree({"alice": table("x", classes=None), "bob": table("x", classes=None)})
    assert plan.classes is None and plan.num_classes == 1


def test_the_plan_names_the_label_only_when_every_site_names_it_the_same() -> None:
    def named(label: str | None) -> DataSchema:
        return dataclasses.replace(table("x", classes=None), label=label)

    assert agree({"a": named("length_of_stay"), "b": named("length_of_stay")}).label == "length_of_stay"
    assert agree({"a": named("length_of_stay"), "b": named("los")}).label is None  # sites may name it as they like
    assert agree({"a": named("length_of_stay"), "b": named(None)}).label is None


def test_arrays_agree_on_shape_and_named_features() -> None:
    assert agree({"a": arrays(3, 8), "b": arrays(3, 8)}) == DataPlan("arrays", (3, 8), CLASSES)
    named = agree({"a": arrays(3, names=("x2", "x10", "x1")), "b": arrays(3, names=("x1", "x2", "x10"))})
    assert named.features == ("x1", "x10", "x2") and named.input_shape == (3,)


def test_a_class_only_the_evaluator_holds_is_fine_without_naming_the_evaluator() -> None:
    assert agree({"a": arrays(2, classes=("x",)), "t": arrays(2, classes=("x", "y"))}).classes == ("x", "y")


def test_a_site_holding_two_spellings_means_two_classes() -> None:
    plan = agree({"alice": arrays(2, classes=("Yes", "yes")), "bob": arrays(2, classes=("yes",))})
    assert plan.classes == ("Yes", "yes")


def test_misuse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^no workers' data schemas to agree on$"):
        agree({})
    with pytest.raises(ConfigError, match="^evaluator testing is not among the workers whose schemas are to agree$"):
        agree({"alice": images()}, evaluator="testing")


# One line per difference -------------------------------------------------------------------------


def test_the_kind_of_data() -> None:
    refused({"alice": images(), "bob": table("x"), "carol": images()}, "bob holds a table, the others images")
    refused({"alice": images(), "bob": arrays(2)}, "bob holds arrays, alice images")


def test_channels_against_the_others_and_against_one_worker() -> None:
    refused(
        {"alice": images(1), "bob": images(1), "charlie": images(3)},
        "charlie's images are 3-channel, the others 1: start it with --channels 1",
    )
    refused(
        {"alice": images(1), "charlie": images(3)},
        "charlie's images are 3-channel, alice 1: start it with --channels 1",
    )


def test_two_against_two_names_both_and_asks_the_second_kind_to_change() -> None:
    refused(
        {"a": images(3), "b": images(1), "c": images(1), "d": images(3)},
        "b's images are 1-channel, a 3: start it with --channels 3",
    )


def test_image_size() -> None:
    refused(
        {"alice": images(1, 224, 224), "bob": images(1, 224, 224), "charlie": images(1, 256, 200)},
        "charlie's images are 256x200 pixels, the others 224x224: start it with --image-size 224,224",
    )


def test_array_shape_and_naming() -> None:
    refused({"a": arrays(24), "b": arrays(3, 8), "c": arrays(24)}, "b's examples have shape 3x8, the others 24")
    refused(
        {"a": arrays(2, names=("x", "y")), "b": arrays(2)},
        "b's arrays do not name their features, a's do: name them at every site or at none",
    )
    refused(
        {"a": arrays(2), "b": arrays(2, names=("x", "y")), "c": arrays(2)},
        "b's arrays name their features, the others' do not: name them at every site or at none",
    )
    refused({"a": arrays(2, names=("x", "y")), "b": arrays(2, names=("x", "z"))}, "b's arrays have no feature 'y'")


def test_a_missing_column() -> None:
    refused({"alice": table("age", "bmi"), "bob": table("bmi", "zip")}, "bob's table has no column 'age'")
    refused(
        {"alice": table("age", "bmi"), "bob": table("Age ", "bmi"), "carol": table("bmi", "age")},
        "bob's table has no column 'age' (it has 'Age ')",
    )


def test_an_extra_column_suggests_the_shared_ones() -> None:
    refused(
        {"alice": table("age", "bmi"), "bob": table("zip", "bmi", "age"), "carol": table("bmi", "age")},
        "bob's table has a column 'zip' that the others lack: start it with --feature-columns age,bmi",
    )
    refused(
        {"alice": table("age", "bmi"), "bob": table("zip", "bmi", "age")},
        "bob's table has a column 'zip' that alice's lacks: start it with --feature-columns age,bmi",
    )


def test_the_type_of_a_column() -> None:
    city = ("city", ("Oslo",))
    refused(
        {"alice": table("age", city), "bob": table("age", "city"), "carol": table(city, "age")},
        "bob's column 'city' is numeric, the others' categorical: start it with 'city' in --categorical-columns",
    )
    refused(
        {"alice": table("age", "city"), "bob": table("age", city)},
        "bob's column 'city' is categorical, alice's numeric: start it without 'city' in --categorical-columns",
    )


def test_a_continuous_label_among_classes() -> None:
    refused(
        {"alice": table("x"), "bob": table("x", classes=None), "carol": table("x")},
        (
            "bob has a continuous label (non-integral numbers), the others class names: check its label column,"
            " or start every site with --label-type continuous"
        ),
    )
    refused(
        {"alice": table("x", classes=None), "bob": table("x")},
        "bob has class names, alice a continuous label: start it with --label-type continuous",
    )


@pytest.mark.parametrize("spelling", ["yes", " Yes", "Yes\t", "YES"])
def test_class_names_that_differ_only_in_case_or_spaces(spelling: str) -> None:
    first, second = sorted(["Yes", spelling])
    site = {"Yes": "alice", spelling: "bob"}
    refused(
        {"alice": arrays(2, classes=("No", "Yes")), "bob": arrays(2, classes=(spelling,))},
        f"{site[first]}'s class {first!r} and {site[second]}'s class {second!r} differ only in case or surrounding"
        " spaces: name the class the same way at every site",
    )


def test_two_sites_each_holding_one_spelling_are_refused_even_beside_a_site_holding_both() -> None:
    """bob and charlie may mean one class, typed two ways; alice's two spellings do not tell which."""
    refused(
        {
            "alice": images(classes=("NORMAL", "Normal")),
            "bob": images(classes=("Normal",)),
            "charlie": images(classes=("NORMAL",)),
        },
        "charlie's class 'NORMAL' and bob's class 'Normal' differ only in case or surrounding spaces: name the"
        " class the same way at every site",
    )


def test_spellings_whose_sites_nest_are_fine() -> None:
    schemas = {
        "alice": images(classes=("NORMAL", "Normal", "normal")),
        "bob": images(classes=("NORMAL", "Normal")),
        "charlie": images(classes=("NORMAL",)),
    }
    assert agree(schemas).classes == ("NORMAL", "Normal", "normal")


def case_variants(word: str, count: int) -> tuple[str, ...]:
    """``count`` spellings of ``word`` that differ only in case."""
    variants = (
        "".join(c.upper() if bit == "1" else c for c, bit in zip(word, format(i, f"0{len(word)}b"), strict=True))
        for i in range(2 ** len(word))
    )
    return tuple(itertools.islice(variants, count))


def test_thousands_of_spellings_of_one_class_are_checked_in_linear_time() -> None:
    """One hello may list 20,000 case variants of a name; comparing every pair (and every site per pair) took
    hours. Whether all are accepted (one site holds them all) or refused (two sites split them), it is quick."""
    variants = case_variants("abcdefghijklmno", 20_000)
    assert len(set(variants)) == 20_000
    started = time.perf_counter()
    plan = agree({"alice": arrays(2, classes=variants), "bob": arrays(2, classes=variants[:1])})
    assert plan.classes is not None and len(plan.classes) == 20_000
    refused(
        {"alice": arrays(2, classes=variants[:10_000]), "bob": arrays(2, classes=variants[10_000:])},
        f"bob's class {min(variants[10_000:])!r} and alice's class {min(variants[:10_000])!r} differ only in case"
        " or surrounding spaces: name the class the same way at every site",
    )
    assert time.perf_counter() - started < 5.0  # about 0.1 s; the pairwise check took 2.6 s for 2,000 variants


def test_a_class_only_the_evaluator_holds() -> None:
    refused(
        {
            "alice": images(classes=("cat",)),
            "bob": images(classes=("cat", "dog")),
            "testing": images(classes=("bird", "cat")),
        },
        "only the evaluator testing holds class 'bird': no trainer has an example of it, so the model could never"
        " learn it",
        evaluator="testing",
    )


# Limits over the union ----------------------------------------------------------------------------


def test_categories_of_one_column_over_all_sites() -> None:
    half = MAX_CATEGORIES // 2
    at = {
        "alice": table(("c", tuple(f"a{i}" for i in range(half)))),
        "bob": table(("c", tuple(f"b{i}" for i in range(half)))),
    }
    assert len(agree(at).categories["c"]) == MAX_CATEGORIES
    past = {**at, "carol": table(("c", ("one more",)))}
    refused(
        past,
        f"column 'c' has {MAX_CATEGORIES + 1} categories over all sites, exceeding limit of {MAX_CATEGORIES}:"
        " start the workers with a larger --min-group-size",
    )


def test_categories_of_all_columns_over_all_sites() -> None:
    columns = MAX_VOCABULARY // MAX_CATEGORIES
    half = MAX_CATEGORIES // 2

    def site(prefix: str, extra: tuple[str, ...] = ()) -> DataSchema:
        vocabulary = tuple(f"{prefix}{i}" for i in range(half))
        return table(*((f"c{j}", vocabulary) for j in range(columns)), ("last", extra))

    assert sum(map(len, agree({"a": site("a"), "b": site("b")}).categories.values())) == MAX_VOCABULARY
    refused(
        {"a": site("a"), "b": site("b", ("x",))},
        f"the categorical columns have {MAX_VOCABULARY + 1} categories over all sites, exceeding limit of"
        f" {MAX_VOCABULARY}: start the workers with a larger --min-group-size",
    )


def test_classes_over_all_sites() -> None:
    half = MAX_CLASSES // 2
    at = {
        "a": arrays(1, classes=tuple(f"a{i}" for i in range(half))),
        "b": arrays(1, classes=tuple(f"b{i}" for i in range(half))),
    }
    assert agree(at).num_classes == MAX_CLASSES
    refused(
        {**at, "c": arrays(1, classes=("one more",))},
        f"the sites hold {MAX_CLASSES + 1} classes together, exceeding limit of {MAX_CLASSES}",
    )
