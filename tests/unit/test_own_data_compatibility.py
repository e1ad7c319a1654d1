"""The handshake over a user's own data, pure: the agreed plan, the default model it sizes, and who may rejoin."""

from __future__ import annotations

import pytest

from syncfed.compatibility import agreed_plan, check_compatible, check_fits_plan, check_rejoining
from syncfed.config import CoordinatorConfig
from syncfed.coordinator.coordinator import prediction_groups
from syncfed.coordinator.evaluation import recall_line
from syncfed.exceptions import IncompatibleWorkers
from syncfed.protocol import DataSchema, EvalResult, Feature, Info

CONFIG = CoordinatorConfig(workers={"alice": "ws://unused", "bob": "ws://unused"}, evaluator={"eve": "ws://unused"})
FEATURES = (Feature("age"), Feature("region", "categorical", ("north", "south")), Feature("bmi"))


def table(name: str, classes: tuple[str, ...], role: str = "trainer", features: tuple[Feature, ...] = FEATURES) -> Info:
    schema = DataSchema("table", (len(features),), classes, features)
    return Info(
        name, role, "table", schema.input_shape, len(classes), (5,) * len(classes), ("mlp", "cnn"), schema=schema
    )


def test_the_workers_agree_on_the_union_of_classes_and_an_mlp_sized_to_the_encoded_row() -> None:
    infos = {
        "alice": table("alice", ("no",)),
        "bob": table("bob", ("no", "yes")),
        "eve": table("eve", ("no", "yes"), "evaluator"),
    }
    model, reference, plan, _ = check_compatible(CONFIG, infos)
    assert plan is not None and model == "mlp" and reference is infos["alice"]
    assert plan.classes == ("no", "yes")
    assert plan.input_shape == (1 + 3 + 1,)  # age, region one-hot over north, south and "other", bmi


def test_own_data_beside_a_bundled_data_set_is_refused_in_one_line() -> None:
    bundled = Info("bob", "trainer", "digits", (1, 8, 8), 10, (3,) * 10, ("digits-cnn",))
    with pytest.raises(IncompatibleWorkers) as error:
        agreed_plan({"alice": table("alice", ("no", "yes")), "bob": bundled})
    assert str(error.value) == (
        "bob holds the bundled digits data set, but alice its own table: start every worker with --data, or none"
    )


def test_a_model_the_workers_do_not_serve_is_refused() -> None:
    infos = {"alice": table("alice", ("no", "yes")), "bob": table("bob", ("no", "yes"))}
    config = CoordinatorConfig(workers={"alice": "ws://unused", "bob": "ws://unused"}, model="digits-cnn")
    with pytest.raises(IncompatibleWorkers, match="^alice cannot build model digits-cnn"):
        check_compatible(config, infos)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (None, "carol holds a bundled data set, but the run trains on own table data"),
        (DataSchema("arrays", (3,), ("no",)), "carol holds arrays, but the run trains on table"),
        (DataSchema("table", (3,), None, FEATURES), "carol's label is continuous, unlike the run's"),
        (
            DataSchema("table", (3,), ("maybe",), FEATURES),
            "carol holds class 'maybe', which the run's model does not have",
        ),
        (DataSchema("table", (2,), ("no",), FEATURES[:2]), "carol's table has no column 'bmi'"),
        (
            DataSchema("table", (3,), ("no",), (Feature("age"), Feature("region"), Feature("bmi"))),
            "carol's column 'region' is numeric, the run's categorical",
        ),
    ],
)
def test_a_rejoining_worker_must_fit_the_run_s_plan(schema: DataSchema | None, reason: str) -> None:
    _, _, plan, _ = check_compatible(CONFIG, {"alice": table("alice", ("no", "yes")), "bob": table("bob", ("no",))})
    assert plan is not None
    with pytest.raises(IncompatibleWorkers) as error:
        check_fits_plan("carol", schema, plan)
    assert str(error.value) == reason


def test_a_rejoining_worker_with_fewer_classes_and_new_categories_fits() -> None:
    infos = {"alice": table("alice", ("no", "yes")), "bob": table("bob", ("no", "yes"))}
    model, reference, plan, _ = check_compatible(CONFIG, infos)
    assert plan is not None
    newcomer = table(
        "alice", ("yes",), features=(Feature("bmi"), Feature("region", "categorical", ("west",)), Feature("age"))
    )
    check_rejoining(CONFIG, "alice", newcomer, reference, model, plan)


def test_percentage_numbers_only_for_disjoint_groups_of_classes() -> None:
    def digits(name: str, held: range) -> Info:
        return Info(name, "trainer", "digits", (1, 8, 8), 10, tuple(5 if c in held else 0 for c in range(10)), ())

    config = CoordinatorConfig(workers={"alice": "ws://unused", "bob": "ws://unused"})
    disjoint = {"alice": digits("alice", range(0, 5)), "bob": digits("bob", range(5, 10))}
    assert prediction_groups(config, disjoint) == {"alice": [0, 1, 2, 3, 4], "bob": [5, 6, 7, 8, 9]}
    overlapping = {"alice": digits("alice", range(0, 2)), "bob": digits("bob", range(0, 2))}
    assert prediction_groups(config, overlapping) == {}  # the "0-1: 100%, 0-1: 100%" line of the issue


def test_recall_per_class_names_the_agreed_classes() -> None:
    reply = EvalResult(0.5, 7, 10, (4, 6, 0), (5, 4, 1), (4, 3, 0))
    assert recall_line(reply, ("NORMAL", "PNEUMONIA", "COVID")) == (
        "Recall per class: NORMAL 80.0%, PNEUMONIA 75.0%, COVID 0.0%"
    )
    assert recall_line(EvalResult(0.5, 7, 10, (4, 6, 0), (6, 4, 0), (4, 3, 0)), ("a", "b", "c")).endswith("c -")
    assert recall_line(EvalResult(0.5, 7, 10, (4, 6, 0)), ("a", "b", "c")) == ""


def test_a_continuous_label_makes_auto_a_regression_with_one_output() -> None:
    schema = DataSchema("table", (3,), None, FEATURES)
    infos = {name: Info(name, "trainer", "table", (3,), 1, (9,), ("mlp",), schema=schema) for name in ("alice", "bob")}
    config = CoordinatorConfig(workers={"alice": "ws://unused", "bob": "ws://unused"})
    _, _, plan, recipe = check_compatible(config, infos)
    assert plan is not None and plan.classes is None
    assert recipe is not None and (recipe.task, recipe.loss, recipe.num_outputs(plan.num_classes)) == (
        "regression",
        "mse",
        1,
    )
