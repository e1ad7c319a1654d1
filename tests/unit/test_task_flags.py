"""The coordinator's side of tasks, pure: flag refusals, auto, class weights, target moments, headlines, JSONL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight

from syncfed.analytics import answer, combine_label_stats, from_sums, secure_clip, sums
from syncfed.cli.common import parse_arguments
from syncfed.cli.coordinator import build_parser, config_from_args
from syncfed.compatibility import check_compatible, chosen_recipe, decided_task
from syncfed.config import CoordinatorConfig
from syncfed.coordinator.dispatch import Dispatch
from syncfed.coordinator.evaluation import eval_event, score_line
from syncfed.coordinator.task_setup import balanced_weights, hello_histogram, target_scale
from syncfed.datasets import Dataset
from syncfed.evaluation import headline, pool, result_json, scalar_metrics
from syncfed.exceptions import ConfigError, IncompatibleWorkers
from syncfed.metrics import score_histogram
from syncfed.protocol import DataPlan, DataSchema, EvalResult, Feature, Info, Query, QueryResult, Recipe, TrainingPlan
from syncfed.strategies import WorkerNeeds

WORKERS = {"alice": "ws://unused", "bob": "ws://unused"}
FEATURES = (Feature("age"), Feature("bmi"))
MANY = settings(max_examples=60, deadline=None)


def config(**settings: Any) -> CoordinatorConfig:
    return CoordinatorConfig(workers=WORKERS, evaluator={}, **settings)


def refusal(**settings: Any) -> str:
    with pytest.raises(ConfigError) as error:
        config(**settings)
    return str(error.value)


def plan(classes: tuple[str, ...] | None) -> DataPlan:
    return DataPlan("table", (2,), classes, ("age", "bmi"))


def table(name: str, classes: tuple[str, ...] | None, histogram: tuple[int, ...] | None = None) -> Info:
    schema = DataSchema("table", (2,), classes, FEATURES)
    counts = histogram or (5,) * (1 if classes is None else len(classes))
    return Info(name, "trainer", "table", (2,), len(counts), counts, ("mlp", "linear"), schema=schema)


# -- Flags refused before any worker is contacted ----------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"task": "binary", "loss": "mse"}, "--loss mse goes with --task regression, not --task binary"),
        ({"task": "regression", "loss": "bce"}, "--loss bce goes with --task binary, not --task regression"),
        ({"loss": "hinge"}, "loss 'hinge' is not one of bce, cross_entropy, huber, mae, mse"),
        (
            {"task": "ranking"},
            "task 'ranking' is not one of auto, classification, binary, regression or an import path mypkg.tasks:Task",
        ),
        ({"optimizer": "adam", "momentum": 0.9}, "--momentum goes with --optimizer sgd, not adam"),
        ({"optimizer": "lbfgs"}, "optimizer 'lbfgs' is not one of sgd, adam, adamw"),
        ({"momentum": 1.0}, "momentum must be from 0 to below 1, not 1.0"),
        ({"weight_decay": 1.5}, "weight_decay must be from 0 to 1.0, not 1.5"),
        ({"grad_clip": 0.0}, "grad_clip must be a positive number, not 0.0"),
        ({"local_epochs": 1001}, "local_epochs must be from 1 to 1000, not 1001"),
        (
            {"task": "regression", "class_weights": "balanced"},
            "--class-weights goes with a classification task, not --task regression",
        ),
        ({"class_weights": "inverse"}, "class weights 'inverse' are not one of balanced"),
        (
            {"task": "classification", "threshold": 0.3},
            "--threshold goes with a binary task, not --task classification",
        ),
        ({"threshold": 1.0}, "threshold must be strictly between 0 and 1, not 1.0"),
        ({"loss": "huber", "huber_delta": 0.0}, "huber_delta must be above 0 and at most 1000, not 0.0"),
        ({"loss": "huber", "huber_delta": math.inf}, "huber_delta must be above 0 and at most 1000, not inf"),
        ({"loss": "huber", "huber_delta": 1000.5}, "huber_delta must be above 0 and at most 1000, not 1000.5"),
        ({"huber_delta": 0.5}, "--huber-delta goes with --loss huber, not the task's default loss"),
        ({"loss": "mae", "huber_delta": 0.5}, "--huber-delta goes with --loss huber, not --loss mae"),
        ({"target_units": ""}, "target units '' must be 1 to 32 printable characters"),
        ({"target_units": "d" * 33}, f"target units '{'d' * 33}' must be 1 to 32 printable characters"),
        ({"target_units": "days\x1b[2J"}, "target units 'days\\x1b[2J' must be 1 to 32 printable characters"),
        ({"target_units": " days"}, "target units ' days' must be 1 to 32 printable characters"),
        ({"task": "binary", "target_units": "days"}, "--target-units goes with a regression task, not --task binary"),
        ({"dropout": 1.0}, "dropout must be from 0 to below 1, not 1.0"),
        ({"hidden": (64, 0)}, "hidden must be at most 16 layer widths from 1 to 65536, not (64, 0)"),
        ({"allow_partial_weights": True}, "--allow-partial-weights needs --initial-weights"),
        (
            {"initial_weights": Path("/no/such/weights.safetensors")},
            "--initial-weights /no/such/weights.safetensors: no such file",
        ),
    ],
)
def test_bad_task_flags_are_refused_in_one_line(settings: dict[str, Any], reason: str) -> None:
    assert refusal(**settings) == reason


def test_initial_weights_cannot_start_a_resumed_run(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert refusal(initial_weights=weights, resume=True, checkpoint_dir=tmp_path) == (
        "--initial-weights starts a new run, --resume continues a checkpointed one: give one of them"
    )


def test_huber_delta_and_target_units_reach_the_recipe_and_the_config() -> None:
    flags = "--loss huber --huber-delta 1000 --target-units days".split()
    made = config_from_args(parse_arguments(build_parser(), flags), WORKERS, {})
    assert (made.huber_delta, made.target_units) == (1000.0, "days")
    assert chosen_recipe(made, plan(None), 0) == Recipe("regression", "huber", huber_delta=1000.0)
    assert chosen_recipe(config(loss="huber"), plan(None), 0) == Recipe("regression", "huber")  # delta 1


def test_the_flags_reach_the_config_and_local_epochs_replace_the_batch_count() -> None:
    flags = "--task binary --threshold 0.3 --optimizer adamw --weight-decay 0.01 --grad-clip 2 --local-epochs 3"
    args = parse_arguments(build_parser(), [*flags.split(), "--keep-optimizer-state", "--hidden", "16,8"])
    made = config_from_args(args, WORKERS, {})
    assert (made.task, made.threshold, made.optimizer, made.weight_decay, made.grad_clip) == (
        "binary",
        0.3,
        "adamw",
        0.01,
        2.0,
    )
    assert (made.local_epochs, made.keep_optimizer_state, made.hidden) == (3, True, (16, 8))
    both = parse_arguments(build_parser(), ["--local-epochs", "3", "--federate-after-n-batches", "5"])
    with pytest.raises(ConfigError, match="^--local-epochs and --federate-after-n-batches each size"):
        config_from_args(both, WORKERS, {})
    assert config_from_args(parse_arguments(build_parser(), []), WORKERS, {}).federate_after_n_batches == 10


class _Pool:
    model_name, plan, recipe = "digits-cnn", None, None


def test_the_training_plan_carries_the_optimizer_and_is_the_classic_one_by_default() -> None:
    needs = WorkerNeeds()
    classic = Dispatch(config(), _Pool()).fit(1, 7, 0.1, {}, needs, delta=False)  # type: ignore[arg-type]
    assert classic.plan == TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.1, seed=7)
    assert classic.recipe is None
    tuned = Dispatch(config(optimizer="adam", local_epochs=2, keep_optimizer_state=True), _Pool())  # type: ignore[arg-type]
    plan_ = tuned.fit(1, 7, 0.1, {}, needs, delta=False).plan
    assert (plan_.optimizer, plan_.num_batches, plan_.local_epochs, plan_.keep_state) == ("adam", 0, 2, True)


# -- auto and the handshake ---------------------------------------------------------------------------


def test_auto_decides_from_the_agreed_label() -> None:
    assert decided_task("auto", None) == "regression"
    assert decided_task("auto", ("no", "yes")) == "binary"
    assert decided_task("auto", ("a", "b", "c")) == "classification"
    assert decided_task("classification", ("no", "yes")) == "classification"


def test_the_bundled_demos_carry_no_recipe_unless_asked() -> None:
    assert chosen_recipe(config(), None, 10) is None
    weighted = chosen_recipe(config(class_weights="balanced"), None, 10)
    assert weighted == Recipe("classification")  # its weights come from the histograms before round 1
    with pytest.raises(IncompatibleWorkers, match="^--hidden and --dropout shape the built-in models over own data"):
        chosen_recipe(config(hidden=(8,)), None, 10)


@pytest.mark.parametrize(
    ("settings", "classes", "reason"),
    [
        (
            {"task": "regression"},
            ("a", "b", "c"),
            "--task regression cannot train on the workers' data:"
            " a regression task needs a continuous label, not 3 classes",
        ),
        (
            {"task": "binary"},
            ("a", "b", "c"),
            "--task binary cannot train on the workers' data: a binary task needs 2 classes, not 3",
        ),
        (
            {"task": "classification"},
            None,
            "--task classification cannot train on the workers' data: a classification task needs classes,"
            " not a continuous label",
        ),
        (
            {"loss": "mse"},
            ("no", "yes"),
            "--loss mse does not fit a binary task, which the workers' data (2 classes) make",
        ),
        (
            {"class_weights": "balanced"},
            None,
            "--class-weights goes with a classification task, not regression (a continuous label)",
        ),
        ({"threshold": 0.2}, ("a", "b", "c"), "--threshold goes with a binary task, not classification (3 classes)"),
        ({"target_units": "days"}, ("no", "yes"), "--target-units goes with a regression task, not binary (2 classes)"),
    ],
)
def test_a_task_the_data_cannot_serve_is_refused_at_the_handshake(
    settings: dict[str, Any], classes: tuple[str, ...] | None, reason: str
) -> None:
    with pytest.raises(IncompatibleWorkers) as error:
        chosen_recipe(config(**settings), plan(classes), 0)
    assert str(error.value) == reason


def test_a_binary_table_gets_a_one_logit_mlp_and_a_user_task_keeps_its_path() -> None:
    infos = {"alice": table("alice", ("no", "yes")), "bob": table("bob", ("no", "yes"))}
    model, _, agreed, recipe = check_compatible(config(hidden=(8,), dropout=0.1), infos)
    assert model == "mlp" and recipe == Recipe("binary", hidden=(8,), dropout=0.1)
    custom = chosen_recipe(config(task="mypkg.tasks:Focal", loss="focal"), agreed, 2)
    assert custom is not None and (custom.task, custom.loss) == ("mypkg.tasks:Focal", "focal")


# -- Class weights and the target's scale -------------------------------------------------------------


@MANY
@given(st.lists(st.integers(1, 500), min_size=2, max_size=8))
def test_balanced_weights_are_scikit_learn_s(counts: list[int]) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    expected = compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)
    np.testing.assert_allclose(balanced_weights(counts), expected, rtol=1e-12)


def test_a_class_without_training_examples_weighs_one_and_no_examples_is_refused() -> None:
    assert balanced_weights([30, 0, 10]) == (40 / 90, 1.0, 40 / 30)
    with pytest.raises(ConfigError, match="^--class-weights balanced needs training examples"):
        balanced_weights([0, 0])


def test_hello_histograms_add_up_in_the_agreed_class_order() -> None:
    infos = {"alice": table("alice", ("b", "c"), (3, 4)), "bob": table("bob", ("a", "c"), (5, 6))}
    total = hello_histogram(infos, plan(("a", "b", "c")))
    assert total is not None and total.tolist() == [5, 3, 10]
    withheld = {**infos, "carol": Info("carol", "trainer", "table", (2,), 3, None, (), max_examples=16)}
    assert hello_histogram(withheld, plan(("a", "b", "c"))) is None  # then a secure label-histogram query


def regression_data(labels: np.ndarray) -> Dataset:
    return Dataset("sites", np.zeros((len(labels), 2), dtype=np.float32), labels.astype(np.float32), 1)


@MANY
@given(
    st.lists(
        st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=10, max_size=40), min_size=1, max_size=4
    )
)
def test_label_stats_of_the_sites_combine_to_the_pooled_mean_and_std(sites: list[list[float]]) -> None:
    query = Query("label-stats", data=plan(None))
    answers = {str(i): answer(query, regression_data(np.array(site)), 10) for i, site in enumerate(sites)}
    assert all(isinstance(reply, QueryResult) for reply in answers.values())
    mean, std = target_scale(combine_label_stats(query, answers))  # type: ignore[arg-type]
    pooled = np.concatenate([np.array(site, dtype=np.float32) for site in sites]).astype(np.float64)
    assert mean == pytest.approx(pooled.mean(), rel=1e-9, abs=1e-9)
    assert std == pytest.approx(pooled.std() or 1.0, rel=1e-6, abs=1e-6)


def test_label_stats_travel_as_secure_sums_within_the_round_s_error() -> None:
    rng = np.random.default_rng(3)
    sites = [rng.normal(150, 70, size) for size in (40, 55, 61)]
    query = Query("label-stats", value_range=(-4096.0, 4096.0), data=plan(None))
    vectors = [sums(query, answer(query, regression_data(site), 10)) for site in sites]  # type: ignore[arg-type]
    clip = secure_clip(query, 61, 2, len(sites))
    assert max(np.abs(vector).max() for vector in vectors) <= clip
    combined = from_sums(query, np.sum(vectors, axis=0), 2)
    mean, std = target_scale(combine_label_stats(query, {"sum": combined}))
    pooled = np.concatenate(sites).astype(np.float32).astype(np.float64)
    assert (mean, std) == pytest.approx((pooled.mean(), pooled.std()), rel=1e-9)


def test_a_class_label_has_no_label_stats() -> None:
    labelled = Dataset("sites", np.zeros((20, 2), dtype=np.float32), np.zeros(20, dtype=np.int64), 2)
    reply = answer(Query("label-stats"), labelled, 10)
    assert not isinstance(reply, QueryResult) and reply.code == "incompatible"


# -- What the console and the metrics file show ------------------------------------------------------


def binary_result(labels: np.ndarray, scores: np.ndarray, *, exact: bool) -> EvalResult:
    predicted = (scores > 0.5).astype(np.int64)
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    metrics = {"confusion": confusion, "scores": score_histogram(labels, scores, 1000)}
    if exact:
        from syncfed.metrics import average_precision, roc_auc

        metrics |= {"auc": np.array([roc_auc(labels, scores)]), "pr_auc": np.array([average_precision(labels, scores)])}
    counts = tuple(confusion.sum(axis=1).tolist())
    right = tuple(np.diag(confusion).tolist())
    return EvalResult(0.3, sum(right), len(labels), tuple(confusion.sum(axis=0).tolist()), counts, right, metrics)


LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 0])
SCORES = np.array([0.1, 0.4, 0.6, 0.7, 0.9, 0.45, 0.8, 0.2])


def test_the_binary_headline_shows_the_exact_auc_alone_and_the_bound_when_pooled() -> None:
    alone = binary_result(LABELS, SCORES, exact=True)
    auc, pr_auc = roc_auc_score(LABELS, SCORES), average_precision_score(LABELS, SCORES)
    expected = f"AUC {auc:.3g}, PR AUC {pr_auc:.3g}, sensitivity 75.0%, specificity 75.0%"
    assert headline(alone) == expected == "AUC 0.938, PR AUC 0.95, sensitivity 75.0%, specificity 75.0%"
    pooled = pool([alone, binary_result(LABELS, SCORES, exact=True)])
    assert pooled.metrics is not None and "auc" not in pooled.metrics  # site-local: not additive
    assert headline(pooled) == expected  # from the summed histograms, exact here: no two scores share a bin
    tied = binary_result(np.array([0, 1, 0, 1]), np.array([0.5001, 0.5002, 0.1, 0.9]), exact=False)
    assert headline(tied) == "AUC 0.875 (±0.12 from binning), PR AUC 0.833, sensitivity 100.0%, specificity 50.0%"


def regression_result(predictions: np.ndarray, targets: np.ndarray) -> EvalResult:
    error = predictions - targets
    sums_ = np.array(
        [len(error), error.sum(), np.abs(error).sum(), (error**2).sum(), targets.sum(), (targets**2).sum()]
    )
    return EvalResult(0.5, 0, len(error), (len(error),), metrics={"regression": sums_})


def test_the_regression_headline_and_event_have_no_accuracy() -> None:
    predicted, targets = np.array([3.0, 5.0, 7.5]), np.array([2.0, 5.0, 9.0])
    reply = regression_result(predicted, targets)
    mae, rmse = mean_absolute_error(targets, predicted), math.sqrt(mean_squared_error(targets, predicted))
    assert headline(reply) == f"MAE {mae:.4g}, RMSE {rmse:.4g}, R² {r2_score(targets, predicted):.3g}"
    assert headline(reply) == "MAE 0.8333, RMSE 1.041, R² 0.868"
    assert score_line(reply) == "Average loss: 0.5000 (3 examples)"
    event = eval_event(4, "federated", reply, None)
    assert "accuracy" not in event and "correct" not in event
    assert list(event) == ["event", "round", "model", "loss", "n", "predictions", "mse", "rmse", "mae", "r2"]
    assert event["mae"] == pytest.approx(mae) and event["r2"] == pytest.approx(r2_score(targets, predicted))


def test_a_classic_eval_event_keeps_its_fields_and_order() -> None:
    reply = EvalResult(0.25, 7, 10, (4, 6), (5, 5), (4, 3))
    assert eval_event(2, "federated", reply, None) == {
        "event": "eval",
        "round": 2,
        "model": "federated",
        "accuracy": 0.7,
        "loss": 0.25,
        "n": 10,
        "correct": 7,
        "predictions": [4, 6],
        "class_counts": [5, 5],
        "class_correct": [4, 3],
    }
    assert headline(reply) == ""


def test_a_classification_event_adds_the_issue_s_fields_with_class_names() -> None:
    confusion = np.array([[4, 1, 0], [1, 3, 0], [0, 0, 1]], dtype=np.int64)
    reply = EvalResult(0.4, 8, 10, (5, 4, 1), (5, 4, 1), (4, 3, 1), {"confusion": confusion})
    event = eval_event(1, "federated", reply, ("a", "b", "c"))
    assert event["confusion"] == confusion.tolist()
    assert event["per_class"]["b"] == {"precision": 0.75, "recall": 0.75}
    assert event["balanced_accuracy"] == pytest.approx((0.8 + 0.75 + 1) / 3)
    assert headline(reply) == "accuracy 80.0%, balanced accuracy 85.0%, macro F1 0.85"
    assert scalar_metrics(reply)["f1_macro"] == pytest.approx(0.85)
    assert "per_class" not in scalar_metrics(reply) and "n" not in scalar_metrics(reply)


def test_pooled_sites_keep_their_metric_sums_only_when_every_site_has_them() -> None:
    first = regression_result(np.array([1.0, 2.0]), np.array([1.5, 2.0]))
    second = regression_result(np.array([4.0]), np.array([3.0]))
    both = pool([first, second])
    assert both.metrics is not None
    np.testing.assert_allclose(both.metrics["regression"], first.metrics["regression"] + second.metrics["regression"])  # type: ignore[index]
    assert "accuracy" not in result_json(both) and result_json(both)["mae"] == pytest.approx(0.5)
    plain = EvalResult(0.5, 0, 1, (1,))
    assert pool([first, plain]).metrics is None
    assert not math.isnan(result_json(both)["r2"])


# -- Resuming keeps the recipe; a run without accuracy still shows progress ---------------------------


def test_a_resumed_run_keeps_its_target_scale_and_refuses_another_task() -> None:
    from syncfed.checkpoint import Checkpoint
    from syncfed.coordinator.journal import _recorded_recipe
    from syncfed.exceptions import CheckpointError

    recorded = Recipe("regression", target_mean=151.0, target_std=77.0)
    checkpoint = Checkpoint(round=3, weights={}, identity={"recipe": recorded.to_body()}, seed=1, config={})
    assert _recorded_recipe(checkpoint, Recipe("regression")) == recorded
    with pytest.raises(CheckpointError, match="^cannot resume: the run trained regression with mse, now regression"):
        _recorded_recipe(checkpoint, Recipe("regression", "huber"))
    classic = Checkpoint(round=3, weights={}, identity={}, seed=1, config={})
    assert _recorded_recipe(classic, None) is None


def test_progress_reads_a_regression_s_events_without_accuracy() -> None:
    import io

    from syncfed.monitor import Progress

    stream = io.StringIO()
    progress = Progress(2, enabled=False, stream=stream)
    progress({"event": "eval", "round": 1, "model": "federated", "loss": 0.4, "mae": 3.1})
    progress({"event": "round", "round": 1, "seconds": 0.5, "failed": {}})
    assert stream.getvalue() == "Round 1/2 done in 0.50 s\n"
