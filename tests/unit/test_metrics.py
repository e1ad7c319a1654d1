"""Metrics from per-site sums agree with scikit-learn on the pooled examples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from syncfed.exceptions import AggregationError
from syncfed.metrics import (
    auc_error_bound,
    average_precision,
    binary_metrics,
    classification_metrics,
    combine,
    histogram_auc,
    histogram_pr_auc,
    regression_metrics,
    report,
    roc_auc,
    score_histogram,
)

FAST = settings(max_examples=60, deadline=None)


def close(ours: float | None, theirs: float) -> bool:
    """``None`` stands for scikit-learn's nan (undefined)."""
    if ours is None:
        return math.isnan(theirs)
    return math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-12)


# -- Classification -------------------------------------------------------------------------------


@st.composite
def labelled_sites(draw: st.DrawFn) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Sites of (true, predicted) classes over C classes; some sites empty or of one class, the pool not empty."""
    c = draw(st.integers(1, 5))
    labels = st.lists(st.integers(0, c - 1), min_size=0, max_size=25)
    sites = []
    for _ in range(draw(st.integers(1, 4))):
        truth = draw(labels)
        guess = draw(st.lists(st.integers(0, c - 1), min_size=len(truth), max_size=len(truth)))
        sites.append((np.array(truth, dtype=np.int64), np.array(guess, dtype=np.int64)))
    if not sum(len(t) for t, _ in sites):
        sites.append((np.array([0]), np.array([c - 1])))
    return c, sites


def confusion(truth: np.ndarray, guess: np.ndarray, c: int) -> np.ndarray:
    """A site's confusion matrix, counted one example at a time (an empty site too)."""
    matrix = np.zeros((c, c), dtype=np.int64)
    np.add.at(matrix, (truth, guess), 1)
    return matrix


@FAST
@given(labelled_sites())
def test_classification_metrics_of_summed_site_confusions_are_scikit_learns_on_the_pool(
    case: tuple[int, list[tuple[np.ndarray, np.ndarray]]],
) -> None:
    c, sites = case
    truth = np.concatenate([t for t, _ in sites])
    guess = np.concatenate([g for _, g in sites])
    summed = combine([{"confusion": confusion(t, g, c)} for t, g in sites])
    figures = classification_metrics(summed["confusion"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns of classes predicted but absent, or of one class
        pooled_confusion = sk.confusion_matrix(truth, guess, labels=list(range(c)))
        balanced = sk.balanced_accuracy_score(truth, guess)
        precision, recall, _, _ = sk.precision_recall_fscore_support(
            truth, guess, labels=list(range(c)), zero_division=np.nan
        )
    assert np.array_equal(summed["confusion"], pooled_confusion)  # per-site sums added == pooled
    assert close(figures.accuracy, sk.accuracy_score(truth, guess))
    assert close(figures.balanced_accuracy, balanced)
    assert close(figures.f1_macro, sk.f1_score(truth, guess, average="macro", zero_division=0))
    assert all(close(ours, theirs) for ours, theirs in zip(figures.precision, precision, strict=True))
    assert all(close(ours, theirs) for ours, theirs in zip(figures.recall, recall, strict=True))
    assert figures.confusion == tuple(map(tuple, pooled_confusion.tolist()))


def test_a_class_with_neither_examples_nor_predictions_is_left_out_of_the_averages() -> None:
    figures = classification_metrics(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert figures.precision[2] is None and figures.recall[2] is None
    assert figures.balanced_accuracy == pytest.approx((3 / 4 + 1) / 2)
    assert figures.f1_macro == pytest.approx((2 * 3 / 7 + 2 * 2 / 5) / 2)


# -- Binary ---------------------------------------------------------------------------------------

#: Scores on a coarse grid tie often; free floats rarely do.
scores = st.one_of(
    st.integers(0, 8).map(lambda k: k / 8), st.floats(0, 1, allow_nan=False), st.sampled_from([0.0, 1.0])
)


@st.composite
def scored_sites(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sites of (0/1 labels, probabilities); a site may hold one class only, or nothing."""
    sites = []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(0, 20))
        one_class = draw(st.sampled_from([None, 0, 1]))
        labels = (
            [one_class] * size
            if one_class is not None
            else draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
        )
        probabilities = draw(st.lists(scores, min_size=size, max_size=size))
        sites.append((np.array(labels, dtype=np.int64), np.array(probabilities, dtype=np.float64)))
    return sites


def pooled(sites: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites])


@FAST
@given(scored_sites())
@example([(np.array([1, 1]), np.array([0.5, 0.5])), (np.array([0, 0]), np.array([0.5, 0.2]))])
def test_exact_auc_and_average_precision_are_scikit_learns(sites: list[tuple[np.ndarray, np.ndarray]]) -> None:
    labels, probabilities = pooled(sites)
    if len(set(labels.tolist())) == 2:
        assert close(roc_auc(labels, probabilities), sk.roc_auc_score(labels, probabilities))
    else:
        assert roc_auc(labels, probabilities) is None  # undefined without both classes
    if labels.sum():
        assert close(average_precision(labels, probabilities), sk.average_precision_score(labels, probabilities))
    else:
        assert average_precision(labels, probabilities) is None


@FAST
@given(scored_sites(), st.integers(1, 12))
def test_histogram_auc_is_the_pooled_auc_of_the_binned_scores_within_its_bound(
    sites: list[tuple[np.ndarray, np.ndarray]], bins: int
) -> None:
    summed = combine([{"scores": score_histogram(y, p, bins)} for y, p in sites])["scores"]
    labels, probabilities = pooled(sites)
    assert np.array_equal(summed, score_histogram(labels, probabilities, bins))  # per-site sums added == pooled
    binned = np.minimum(np.floor(probabilities * bins), bins - 1)  # the bin of each score, independently
    if len(set(labels.tolist())) < 2:
        assert histogram_auc(summed) is None and auc_error_bound(summed) is None
    else:
        auc = histogram_auc(summed)
        assert close(auc, sk.roc_auc_score(labels, binned))
        bound = auc_error_bound(summed)
        assert auc is not None and bound is not None
        assert abs(auc - sk.roc_auc_score(labels, probabilities)) <= bound + 1e-12
    if labels.sum():
        assert close(histogram_pr_auc(summed), sk.average_precision_score(labels, binned))


def test_the_auc_bound_is_reached_when_a_bin_hides_a_perfect_order() -> None:
    labels, probabilities = np.array([0, 0, 1, 1]), np.array([0.51, 0.52, 0.53, 0.54])
    histograms = score_histogram(labels, probabilities, 10)
    assert roc_auc(labels, probabilities) == 1.0
    assert histogram_auc(histograms) == 0.5
    assert auc_error_bound(histograms) == 0.5


def test_the_last_bin_holds_a_probability_of_one() -> None:
    assert score_histogram(np.array([1, 0]), np.array([1.0, 0.0]), 4).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]


@FAST
@given(scored_sites(), st.sampled_from([0.25, 0.5, 0.9]))
def test_sensitivity_and_specificity_are_the_recalls_of_each_class(
    sites: list[tuple[np.ndarray, np.ndarray]], threshold: float
) -> None:
    labels, probabilities = pooled(sites)
    assume(len(labels) > 0)
    guess = (probabilities > threshold).astype(np.int64)
    figures = binary_metrics(confusion(labels, guess, 2), score_histogram(labels, probabilities, 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sensitivity = sk.recall_score(labels, guess, pos_label=1, zero_division=np.nan)
        specificity = sk.recall_score(labels, guess, pos_label=0, zero_division=np.nan)
    assert close(figures.sensitivity, sensitivity) if labels.sum() else figures.sensitivity is None
    assert close(figures.specificity, specificity) if (labels == 0).any() else figures.specificity is None


# -- Regression -----------------------------------------------------------------------------------

values = st.integers(-400, 400).map(lambda k: k / 4)  # exact in float64, so the sums are too


@st.composite
def regression_sites(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    sites = []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(0, 15))
        y = draw(st.lists(values, min_size=size, max_size=size))
        constant = draw(st.booleans())
        pred = y if constant and draw(st.booleans()) else draw(st.lists(values, min_size=size, max_size=size))
        sites.append((np.array(y), np.array(pred)))
    if sum(len(y) for y, _ in sites) < 2:
        sites.append((np.array([1.0, 1.0]), np.array([1.0, 2.0])))
    return sites


def regression_sums(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    error = pred - y
    return np.array([len(y), error.sum(), np.abs(error).sum(), (error**2).sum(), y.sum(), (y**2).sum()])


@FAST
@given(regression_sites())
@example([(np.array([2.0, 2.0, 2.0]), np.array([2.0, 2.0, 2.0]))])  # a constant target fitted exactly: R^2 = 1
@example([(np.array([2.0, 2.0, 2.0]), np.array([2.0, 1.0, 2.0]))])  # a constant target missed: R^2 = 0
def test_regression_metrics_of_summed_sites_are_scikit_learns_on_the_pool(
    sites: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    summed = combine([{"regression": regression_sums(y, p)} for y, p in sites])["regression"]
    y, pred = pooled(sites)
    figures = regression_metrics(summed)
    assert figures is not None
    assert close(figures.mse, sk.mean_squared_error(y, pred))
    assert close(figures.rmse, math.sqrt(sk.mean_squared_error(y, pred)))
    assert close(figures.mae, sk.mean_absolute_error(y, pred))
    assert math.isclose(figures.r2, sk.r2_score(y, pred), rel_tol=1e-9, abs_tol=1e-9)
    assert close(figures.mean_error, float(np.mean(pred - y)))


def test_no_examples_give_no_regression_figures() -> None:
    assert regression_metrics(np.zeros(6)) is None


# -- Combining ------------------------------------------------------------------------------------


def test_a_sites_exact_auc_is_kept_alone_and_dropped_from_a_federation() -> None:
    site = {"scores": np.ones((2, 4), dtype=np.int64), "auc": np.array([0.9]), "pr_auc": np.array([0.8])}
    one_class = {"scores": np.ones((2, 4), dtype=np.int64)}  # a site with one class has no AUC of its own
    assert combine([site])["auc"].tolist() == [0.9]
    assert combine([site, one_class]).keys() == {"scores"}


def test_sums_that_disagree_are_refused_in_one_line() -> None:
    with pytest.raises(AggregationError, match=r"^metric sum confusion of site 1 has shape \(3, 3\)"):
        combine([{"confusion": np.zeros((2, 2), np.int64)}, {"confusion": np.zeros((3, 3), np.int64)}])
    with pytest.raises(AggregationError, match=r"^metric sums of site 1 name \['regression'\]"):
        combine([{"confusion": np.zeros((2, 2), np.int64)}, {"regression": np.zeros(6)}])
    with pytest.raises(AggregationError, match="^metric sum regression of site 0 is not finite$"):
        combine([{"regression": np.array([1.0, np.nan, 0, 0, 0, 0])}])
    with pytest.raises(AggregationError, match="^no metric sums to combine$"):
        combine([])


def test_the_report_names_the_metrics_jsonl_fields() -> None:
    histograms = score_histogram(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), 1000)
    fields = report({"confusion": np.array([[1, 0], [1, 1]]), "scores": histograms}, classes=("no", "yes"))
    assert fields["confusion"] == [[1, 0], [1, 1]]
    assert fields["per_class"] == {"no": {"precision": 0.5, "recall": 1.0}, "yes": {"precision": 1.0, "recall": 0.5}}
    assert fields["sensitivity"] == 0.5 and fields["specificity"] == 1.0
    assert fields["auc"] == 1.0 and fields["auc_bound"] == 0.0
    regression = report({"regression": regression_sums(np.array([1.0, 3.0]), np.array([2.0, 3.0]))})
    assert regression == {"mse": 0.5, "rmse": math.sqrt(0.5), "mae": 0.5, "r2": 0.5}
