"""Aggregation is a pure function over (weights, num_examples) pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from syncfed.aggregation import (
    AGGREGATORS,
    RunningMean,
    fedavg,
    from_float64,
    get_aggregator,
    mean,
    median,
    validate_updates,
)
from syncfed.exceptions import AggregationError, ConfigError

FAST = settings(max_examples=40, deadline=None)


@st.composite
def updates(draw: st.DrawFn, dtype: np.dtype, elements: st.SearchStrategy, min_size: int = 1) -> list:
    """Updates that agree in tensor names and shapes, with positive counts."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3, unique=True))
    shapes = {name: draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)) for name in names}
    count = draw(st.integers(min_size, 5))
    return [
        (
            {name: draw(hnp.arrays(dtype, shapes[name], elements=elements)) for name in names},
            draw(st.integers(1, 10_000)),
        )
        for _ in range(count)
    ]


floats64 = st.floats(-1e3, 1e3, allow_nan=False)
floats32 = st.floats(-1e3, 1e3, allow_nan=False, width=32)
aggregators = st.sampled_from([fedavg, mean])


def reference(ups: list, *, weighted: bool) -> dict[str, np.ndarray]:
    """np.average over the stacked tensors, the independent computation."""
    counts = [count if weighted else 1 for _, count in ups]
    return {
        name: np.average(np.stack([w[name].astype(np.float64) for w, _ in ups]), axis=0, weights=counts)
        for name in ups[0][0]
    }


@FAST
@given(ups=updates(np.dtype(np.float64), floats64))
def test_fedavg_agrees_with_np_average(ups: list) -> None:
    result = fedavg(ups)
    expected = reference(ups, weighted=True)
    assert list(result) == list(ups[0][0])
    for name, value in expected.items():
        assert result[name].dtype == np.float64 and result[name].shape == value.shape
        np.testing.assert_allclose(result[name], value, rtol=1e-10, atol=1e-9)


@FAST
@given(ups=updates(np.dtype(np.float64), floats64))
def test_mean_agrees_with_unweighted_np_average(ups: list) -> None:
    result = mean(ups)
    expected = reference(ups, weighted=False)
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-10, atol=1e-9)


@FAST
@given(aggregate=aggregators, data=st.data())
def test_order_independence(aggregate: object, data: st.DataObject) -> None:
    ups = data.draw(updates(np.dtype(np.float64), floats64, min_size=2))
    order = data.draw(st.permutations(range(len(ups))))
    first = aggregate(ups)  # type: ignore[operator]
    permuted = aggregate([ups[i] for i in order])  # type: ignore[operator]
    assert list(first) == list(permuted)
    for name in first:
        np.testing.assert_allclose(permuted[name], first[name], rtol=1e-10, atol=1e-9)


@st.composite
def exact_tensors(draw: st.DrawFn) -> np.ndarray:
    """float32 or integer tensors.

    int64 only up to 2**40: float64 holds integers exactly up to 2**53, and the weighted
    sum's relative rounding error of a few 2**-53 must stay well below half a unit.
    """
    dtype = draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int8), np.dtype(np.uint8)]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    elements = {"f": floats32, "i": st.integers(-(2**40), 2**40) if dtype.itemsize == 8 else None}
    return draw(hnp.arrays(dtype, shape, elements=elements.get(dtype.kind)))


# Regression test for a bug once in syncfed/aggregation.py, _average.
@FAST
@example(aggregate=fedavg, array=np.array(0.4375, dtype=np.float32), counts=[1, 1, 1])
@given(aggregate=aggregators, array=exact_tensors(), counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=6))
def test_equal_updates_give_the_same_weights_back_exactly(
    aggregate: object, array: np.ndarray, counts: list[int]
) -> None:
    # float32 and integer tensors are accumulated in float64: the tiny rounding error of
    # the weighted sum is far below their precision, so they come back bit for bit.
    weights = {"w": array}
    result = aggregate([(weights, count) for count in counts])  # type: ignore[operator]
    assert result["w"].dtype == array.dtype
    np.testing.assert_array_equal(result["w"], array)


# Regression test for a bug once in syncfed/aggregation.py, _average.
def test_products_are_computed_in_float64() -> None:
    w = {"w": np.array([0.4375], dtype=np.float32)}
    np.testing.assert_array_equal(fedavg([(w, 1), (w, 1), (w, 1)])["w"], [np.float32(0.4375)])
    low = {"w": np.array([1.0], dtype=np.float16)}
    high = {"w": np.array([2.0], dtype=np.float16)}
    result = fedavg([(low, 1), (high, 2)])["w"]
    assert result.dtype == np.float16
    assert result[0] == np.float16(5 / 3)


@FAST
@given(
    aggregate=aggregators,
    array=hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), elements=floats64),
    counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=6),
)
def test_equal_float64_updates_give_the_same_weights_back(
    aggregate: object, array: np.ndarray, counts: list[int]
) -> None:
    result = aggregate([({"w": array}, count) for count in counts])  # type: ignore[operator]
    assert result["w"].dtype == np.float64
    np.testing.assert_allclose(result["w"], array, rtol=1e-12, atol=1e-12)


@FAST
@given(ups=updates(np.dtype(np.float32), floats32))
def test_float32_is_kept(ups: list) -> None:
    result = fedavg(ups)
    expected = reference(ups, weighted=True)
    for name, value in expected.items():
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], value, rtol=1e-6, atol=1e-4)


@FAST
@given(
    dtype=st.sampled_from([np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.int64)]),
    weighted=st.booleans(),
    data=st.data(),
)
def test_integer_tensors_are_rounded_and_keep_dtype(dtype: np.dtype, weighted: bool, data: st.DataObject) -> None:
    elements = st.integers(-1000, 1000) if dtype.itemsize >= 4 else None
    ups = data.draw(updates(dtype, elements))
    result = (fedavg if weighted else mean)(ups)
    expected = reference(ups, weighted=weighted)
    for name, value in expected.items():
        assert result[name].dtype == dtype
        # Rounded to the nearest integer: never more than half a unit away.
        assert np.all(np.abs(result[name].astype(np.float64) - value) <= 0.5 + 1e-9)


def test_integer_rounding_examples() -> None:
    a = {"n": np.array([1, 2, 10], dtype=np.int64)}
    b = {"n": np.array([2, 4, 11], dtype=np.int64)}
    # Weights 3/4 and 1/4 are exact in binary: 1.25 -> 1, 2.5 -> 2 (half to even), 10.25 -> 10.
    np.testing.assert_array_equal(fedavg([(a, 3), (b, 1)])["n"], [1, 2, 10])
    # Unweighted: 1.5 -> 2, 3 -> 3, 10.5 -> 10.
    result = mean([(a, 3), (b, 1)])["n"]
    np.testing.assert_array_equal(result, [2, 3, 10])
    assert result.dtype == np.int64


def test_fedavg_weights_by_examples_and_mean_does_not() -> None:
    low = {"w": np.array([0.0], dtype=np.float32)}
    high = {"w": np.array([10.0], dtype=np.float32)}
    assert fedavg([(low, 1), (high, 3)])["w"][0] == pytest.approx(7.5)
    assert mean([(low, 1), (high, 3)])["w"][0] == pytest.approx(5.0)


def test_read_only_inputs_are_not_modified() -> None:
    a = np.arange(4, dtype=np.float32)
    b = np.arange(4, dtype=np.float32) * 3
    a.flags.writeable = False
    b.flags.writeable = False
    result = fedavg([({"w": a}, 1), ({"w": b}, 1)])
    np.testing.assert_array_equal(a, np.arange(4))
    np.testing.assert_array_equal(result["w"], np.arange(4) * 2)
    assert not np.shares_memory(result["w"], a)


def test_numpy_integer_counts_are_accepted() -> None:
    w = {"w": np.ones(2)}
    assert fedavg([(w, np.int64(3)), (w, np.uint8(2))])["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("aggregate", [fedavg, mean])
def test_empty_list(aggregate: object) -> None:
    with pytest.raises(AggregationError) as info:
        aggregate([])  # type: ignore[operator]
    assert str(info.value) == "no updates to aggregate"


@pytest.mark.parametrize("aggregate", [fedavg, mean])
def test_mismatched_names(aggregate: object) -> None:
    first = {"a": np.zeros(2), "b": np.zeros(3)}
    with pytest.raises(AggregationError) as info:
        aggregate([(first, 1), ({"a": np.zeros(2)}, 1)])  # type: ignore[operator]
    assert str(info.value) == "update 1 has different tensors than update 0 (missing ['b'], extra [])"
    with pytest.raises(AggregationError) as info:
        aggregate([(first, 1), (first, 1), ({**first, "c": np.zeros(1)}, 1)])  # type: ignore[operator]
    assert str(info.value) == "update 2 has different tensors than update 0 (missing [], extra ['c'])"


@pytest.mark.parametrize("aggregate", [fedavg, mean])
def test_mismatched_shapes(aggregate: object) -> None:
    with pytest.raises(AggregationError) as info:
        aggregate([({"w": np.zeros((2, 3))}, 1), ({"w": np.zeros((3, 2))}, 1)])  # type: ignore[operator]
    assert str(info.value) == "update 1 has tensor w of shape (3, 2), update 0 has (2, 3)"
    with pytest.raises(AggregationError):
        aggregate([({"w": np.zeros(())}, 1), ({"w": np.zeros((1,))}, 1)])  # type: ignore[operator]


@pytest.mark.parametrize("aggregate", [fedavg, mean])
@pytest.mark.parametrize("count", [0, -1, 1.5, 2.0, True, "3", None, np.int64(0)])
def test_non_positive_or_non_integer_count(aggregate: object, count: object) -> None:
    w = {"w": np.ones(2)}
    with pytest.raises(AggregationError, match="expected a positive integer"):
        aggregate([(w, 1), (w, count)])  # type: ignore[operator]


def test_count_error_text() -> None:
    with pytest.raises(AggregationError) as info:
        fedavg([({"w": np.ones(1)}, 0)])
    assert str(info.value) == "update 0 has example count 0, expected a positive integer"


def test_get_aggregator() -> None:
    assert get_aggregator("fedavg") is fedavg
    assert get_aggregator("mean") is mean
    assert set(AGGREGATORS) == {"fedavg", "mean"}
    with pytest.raises(ConfigError) as info:
        get_aggregator("median")
    assert str(info.value) == "aggregation 'median' is not one of fedavg, mean"


# RunningMean: the streaming form of fedavg and mean, one update at a time.


@FAST
@given(ups=updates(np.dtype(np.float64), floats64), weighted=st.booleans())
def test_running_mean_equals_fedavg_and_np_average(ups: list, weighted: bool) -> None:
    running = RunningMean(weighted=weighted)
    for weights, count in ups:
        running.add(weights, count)
    assert running.count == len(ups)
    assert running.total == sum(count for _, count in ups)
    result = running.result()
    batch = (fedavg if weighted else mean)(ups)
    expected = reference(ups, weighted=weighted)
    assert list(result) == list(ups[0][0])
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], batch[name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result[name], value, rtol=1e-10, atol=1e-9)


def test_running_mean_keeps_its_sums_across_results() -> None:
    running = RunningMean()
    running.add({"w": np.array([1.0], dtype=np.float32), "n": np.array([1])}, 1)
    assert running.result()["w"].tolist() == [1.0]
    running.add({"w": np.array([4.0], dtype=np.float32), "n": np.array([4])}, 2)
    result = running.result()
    assert result["w"].tolist() == [3.0] and result["w"].dtype == np.float32
    assert result["n"].tolist() == [3] and result["n"].dtype == np.int64
    assert running.result()["w"].tolist() == [3.0]


def test_running_mean_rejects_a_bad_update_and_keeps_the_good_ones() -> None:
    running = RunningMean(weighted=False)
    with pytest.raises(AggregationError) as info:
        running.result()
    assert str(info.value) == "no updates to aggregate"
    running.add({"a": np.zeros(2), "b": np.ones(3, dtype=np.float32)}, 5)
    bad = [
        (({"a": np.zeros(2), "b": np.ones(3)}, 1), "update 1 has tensor b of dtype float64, update 0 has float32"),
        (
            ({"a": np.zeros(2), "b": np.ones(2, np.float32)}, 1),
            "update 1 has tensor b of shape (2,), update 0 has (3,)",
        ),
        (({"a": np.zeros(2)}, 1), "update 1 has different tensors than update 0 (missing ['b'], extra [])"),
        (
            ({"a": np.ones(2), "b": np.ones(3, np.float32)}, 0),
            "update 1 has example count 0, expected a positive integer",
        ),
    ]
    for (weights, count), message in bad:
        with pytest.raises(AggregationError) as info:
            running.add(weights, count)
        assert str(info.value) == message
    assert running.count == 1 and running.total == 5
    running.add({"b": np.full(3, 3, dtype=np.float32), "a": np.full(2, 2.0)}, 1)
    result = running.result()
    assert list(result) == ["a", "b"]
    assert result["a"].tolist() == [1.0, 1.0] and result["b"].tolist() == [2.0, 2.0, 2.0]


def test_validate_updates_is_the_check_every_rule_shares() -> None:
    validate_updates([({"w": np.zeros(2)}, 1), ({"w": np.ones(2)}, 3)])
    with pytest.raises(AggregationError) as info:
        validate_updates([({"w": np.zeros(2)}, 1), ({"w": np.ones(2, dtype=np.float32)}, 3)])
    assert str(info.value) == "update 1 has tensor w of dtype float32, update 0 has float64"
    with pytest.raises(AggregationError) as info:
        median([])
    assert str(info.value) == "no updates to aggregate"


def test_from_float64_rounds_integers_half_to_even() -> None:
    values = np.array([0.5, 1.5, 2.49, -0.5])
    assert from_float64(values, np.dtype(np.int64)).tolist() == [0, 2, 2, 0]
    assert from_float64(values, np.dtype(np.float32)).dtype == np.float32
    np.testing.assert_array_equal(from_float64(values, np.dtype(np.float16)), values.astype(np.float16))


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(1, 5000), min_size=2, max_size=8),
    st.permutations(range(8)),
    st.booleans(),
)
def test_running_mean_around_an_origin_does_not_depend_on_arrival_order(
    seed: int, counts: list[int], order: list[int], weighted: bool
) -> None:
    """Replies race over the network: the folded mean must be the same bits in any order."""
    rng = np.random.default_rng(seed)
    origin = {"w": rng.normal(0, 1, 4000).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    updates = [
        ({"w": (origin["w"] + rng.normal(0, 0.01, 4000)).astype(np.float32), "n": np.array(7 + k, dtype=np.int64)}, c)
        for k, c in enumerate(counts)
    ]
    results = []
    for permutation in (range(len(updates)), [i for i in order if i < len(updates)]):
        running = RunningMean(weighted=weighted, origin=origin)
        for index in permutation:
            running.add(*updates[index])
        results.append(running.result())
    assert results[0]["w"].tobytes() == results[1]["w"].tobytes()
    assert results[0]["n"] == results[1]["n"]
    expected = np.average(
        np.stack([weights["w"].astype(np.float64) for weights, _ in updates]),
        axis=0,
        weights=np.array(counts, dtype=np.float64) if weighted else None,
    )
    np.testing.assert_allclose(results[0]["w"], expected, rtol=1e-6, atol=1e-7)


def test_running_mean_origin_must_fit_the_updates() -> None:
    running = RunningMean(origin={"w": np.zeros(3, np.float32)})
    with pytest.raises(AggregationError, match=r"update 0 has tensor w of shape \(4,\), the origin has \(3,\)"):
        running.add({"w": np.zeros(4, np.float32)}, 1)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.booleans(), st.booleans())
def test_running_mean_result_is_the_whole_tensor_formula_bit_for_bit(
    seed: int, blocks: int, weighted: bool, with_origin: bool
) -> None:
    """result() works in blocks to bound its temporaries; across block edges it must equal the plain formula."""
    rng = np.random.default_rng(seed)
    size = blocks * 65_536 + int(rng.integers(1, 999))
    origin = {"w": rng.normal(0, 1, size).astype(np.float32), "n": np.array([3, 8], dtype=np.int64)}
    ups = [
        ({"w": rng.normal(0, 1, size).astype(np.float32), "n": rng.integers(0, 9, 2)}, int(rng.integers(1, 500)))
        for _ in range(3)
    ]
    running = RunningMean(weighted=weighted, origin=origin if with_origin else None)
    for weights, count in ups:
        running.add(weights, count)
    divisor = sum(count for _, count in ups) if weighted else len(ups)
    for name, array in running.result().items():
        total = running._sums[name] / divisor
        expected = from_float64(total + origin[name] if with_origin else total, origin[name].dtype)
        assert array.dtype == expected.dtype and array.tobytes() == expected.tobytes()


def test_running_mean_reuses_released_sums_and_gives_the_same_bits() -> None:
    rng = np.random.default_rng(5)
    origin = {"w": rng.normal(0, 1, (70, 1000)).astype(np.float32), "b": np.zeros(3, np.float32)}
    rounds = [
        [
            ({name: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32) for name, a in origin.items()}, 3 + k)
            for k in range(3)
        ]
        for _ in range(2)
    ]
    first = RunningMean(origin=origin)
    for weights, count in rounds[0]:
        first.add(weights, count)
    first.result()
    spare = first.release()
    assert first.count == 0 and set(spare) == {"w", "b"}
    with pytest.raises(AggregationError, match="no updates to aggregate"):
        first.result()
    spare["b"] = np.full(4, 9.0)  # another shape: not reused
    reused, fresh = RunningMean(origin=origin, spare=spare), RunningMean(origin=origin)
    for weights, count in rounds[1]:
        reused.add(weights, count)
        fresh.add(weights, count)
    assert reused._sums["w"] is spare["w"] and reused._sums["b"] is not spare["b"]
    for name, array in fresh.result().items():
        assert reused.result()[name].tobytes() == array.tobytes()


@settings(max_examples=30, deadline=None)
@pytest.mark.filterwarnings("error")
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 3 * 65_536),
    st.lists(st.tuples(st.floats(0, 1), st.sampled_from([np.nan, np.inf, -np.inf])), max_size=3),
    st.sampled_from([np.float32, np.float16, np.float64]),
    st.booleans(),
)
def test_add_part_checking_finiteness_stops_before_the_first_block_that_is_not(
    seed: int, size: int, bad: list[tuple[float, float]], dtype: type, with_origin: bool
) -> None:
    """add_part(finite=True) adds whole blocks up to the first holding a NaN or an infinity, each block
    the float64 difference times the count, as the independent formula computes it bit for bit. A hostile
    block (inf beside -inf) warns of nothing: its check's answer is expected, not an accident."""
    rng = np.random.default_rng(seed)
    origin = rng.normal(0, 1, size).astype(dtype)
    values = (origin + rng.normal(0, 0.01, size)).astype(dtype)
    positions = sorted(min(int(where * size), size - 1) for where, _ in bad)
    for position, (_, value) in zip(positions, bad, strict=True):
        values[position] = value
    running = RunningMean(origin={"w": origin} if with_origin else None)
    running.start({"w": values})
    added = running.add_part("w", 0, values, 7.0, running.scratch(), finite=True)
    block = 65_536
    assert added == (size if not positions else positions[0] // block * block)
    widened = values[:added].astype(np.float64) - (origin[:added].astype(np.float64) if with_origin else 0.0)
    expected = np.concatenate([widened * 7.0, np.zeros(size - added)])
    assert running._sums["w"].tobytes() == expected.tobytes()


@pytest.mark.parametrize("position", [0, 65_535, 65_536, 2 * 65_536 + 4])
def test_add_part_finds_a_non_finite_value_at_either_edge_of_a_block(position: int) -> None:
    values = np.ones(2 * 65_536 + 5, np.float32)
    values[position] = np.nan
    running = RunningMean()
    running.start({"w": values})
    assert running.add_part("w", 0, values, 1.0, running.scratch(), finite=True) == position // 65_536 * 65_536
