"""Tables: CSV, TSV and Parquet files and DataFrames read once, described without revealing rare categories,
and encoded as a plan says; every bad input stops with one pinned line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from syncfed.data.base import SourceOptions
from syncfed.data.tables import TableSource
from syncfed.exceptions import ConfigError, DatasetError
from syncfed.protocol.data_messages import DataPlan, DataSchema, Feature, encoded_width

CLAIMS = "age,region,smoker,fraud\n30,north,True,0\n41,south,False,1\n52,north,True,1\n"


def write(tmp_path: Path, text: str, name: str = "claims.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read(path: Path, **options: Any) -> TableSource:
    options.setdefault("label_column", "fraud")
    return TableSource.read(path, path.suffix[1:], SourceOptions(**options))


def table_plan(
    features: tuple[str, ...],
    categories: dict[str, tuple[str, ...]] | None = None,
    classes: tuple[str, ...] | None = ("0", "1"),
    **statistics: tuple[float, ...],
) -> DataPlan:
    width = encoded_width(features, categories or {})
    return DataPlan("table", (width,), classes, features, categories, **statistics)


def frame(rows: int = 40, seed: int = 0) -> pd.DataFrame:
    """A table of every column type: ints, floats, bools, a categorical text column, a label."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, rows),
            "income": rng.normal(50_000, 9_000, rows).round(2),
            "smoker": rng.integers(0, 2, rows).astype(bool),
            "region": rng.choice(["north", "south", "east"], rows),
            "fraud": rng.integers(0, 2, rows),
        }
    )


# Schema


def test_schema_lists_features_in_file_order_with_types_site_classes_and_the_label(tmp_path: Path) -> None:
    source = read(write(tmp_path, CLAIMS), categorical_columns=("region",), min_group_size=1)
    assert source.schema() == DataSchema(
        "table",
        (3,),
        ("0", "1"),
        (Feature("age"), Feature("region", "categorical", ("north", "south")), Feature("smoker")),
        "fraud",
    )
    assert len(source) == 3
    assert source.name == "table"
    assert source.labels.tolist() == [0, 1, 1]


def test_feature_columns_choose_and_order_the_features(tmp_path: Path) -> None:
    source = read(write(tmp_path, CLAIMS), feature_columns=("smoker", "age"))
    assert [feature.name for feature in source.schema().features] == ["smoker", "age"]


def test_a_column_without_a_header_is_not_a_feature_by_default(tmp_path: Path) -> None:
    path = tmp_path / "indexed.csv"
    frame().to_csv(path)  # pandas writes its index as a first column with an empty header
    features = read(path, categorical_columns=("region",)).schema().features
    assert [feature.name for feature in features] == ["age", "income", "smoker", "region"]
    named = read(path, feature_columns=("Unnamed: 0", "age")).schema().features
    assert [feature.name for feature in named] == ["Unnamed: 0", "age"]


def test_min_group_size_hides_rare_categories_which_go_to_other(tmp_path: Path) -> None:
    regions = ["north"] * 5 + ["south"] * 4 + ["east"]
    data = pd.DataFrame({"region": regions, "fraud": [0, 1] * 5})
    source = TableSource.from_frame(
        data, SourceOptions(label_column="fraud", categorical_columns=("region",), min_group_size=4)
    )
    assert source.schema().features == (Feature("region", "categorical", ("north", "south")),)
    hidden = TableSource.from_frame(
        data, SourceOptions(label_column="fraud", categorical_columns=("region",), min_group_size=5)
    )
    assert hidden.schema().features == (Feature("region", "categorical", ("north",)),)
    # The plan agreed without "south" (no site revealed it): this site's south rows go to the "other" slot.
    x = hidden.prepare(table_plan(("region",), {"region": ("north",)})).images
    assert x[:, 1].tolist() == [0.0] * 5 + [1.0] * 5
    # Another site revealed "east": this site's one east row takes its slot, though this site never named it.
    x = hidden.prepare(table_plan(("region",), {"region": ("east", "north")})).images
    assert x[-1].tolist() == [1.0, 0.0, 0.0]


def test_category_values_are_named_as_class_names_are(tmp_path: Path) -> None:
    path = write(tmp_path, "grade,fraud\n1,0\n2.0,1\n10,0\n\n")
    source = read(path, categorical_columns=("grade",), min_group_size=1)
    assert source.schema().features == (Feature("grade", "categorical", ("1", "2", "10")),)


# Labels


@pytest.mark.parametrize(
    ("values", "label_type", "classes", "labels"),
    [
        ([1, 0, 2, 0], "auto", ("0", "1", "2"), [1, 0, 2, 0]),
        (["yes", "no", "yes", "maybe"], "auto", ("maybe", "no", "yes"), [2, 1, 2, 0]),
        ([True, False, False, True], "auto", ("False", "True"), [1, 0, 0, 1]),
        ([1.0, 0.0, 10.0, 2.0], "auto", ("0", "1", "2", "10"), [1, 0, 3, 2]),
        ([1, 0, 2, 0], "continuous", None, [1.0, 0.0, 2.0, 0.0]),
        ([0.5, 1.5, 0.5, 2.25], "auto", None, [0.5, 1.5, 0.5, 2.25]),
        ([0.5, 1.5, 0.5, 2.25], "classes", ("0.5", "1.5", "2.25"), [0, 1, 0, 2]),
    ],
)
def test_label_types(tmp_path: Path, values: list[Any], label_type: str, classes: Any, labels: list[Any]) -> None:
    path = tmp_path / "labels.csv"
    pd.DataFrame({"x": range(4), "fraud": values}).to_csv(path, index=False)
    source = read(path, label_type=label_type)
    assert source.schema().classes == classes
    assert source.classes == classes
    assert source.labels.tolist() == labels
    assert source.labels.dtype == (np.float32 if classes is None else np.int64)


def test_labels_map_to_the_agreed_classes(tmp_path: Path) -> None:
    source = read(write(tmp_path, CLAIMS), feature_columns=("age",))
    dataset = source.prepare(table_plan(("age",), classes=("0", "1", "2")))
    assert dataset.labels.tolist() == [0, 1, 1]
    assert dataset.num_classes == 3
    assert dataset.classes == ("0", "1", "2")
    regression = read(write(tmp_path, "age,fraud\n1,0.5\n2,1.25\n"))
    assert regression.prepare(table_plan(("age",), classes=None)).labels.tolist() == [0.5, 1.25]


def test_a_label_kind_or_class_the_plan_lacks_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    source = read(path, feature_columns=("age",))
    with pytest.raises(DatasetError) as caught:
        source.prepare(table_plan(("age",), classes=None))
    assert str(caught.value) == f"{path}: this site's label has classes, the plan's is continuous"
    with pytest.raises(DatasetError) as caught:
        source.prepare(table_plan(("age",), classes=("0", "2")))
    assert str(caught.value) == f"{path}: class '1' of this site is not among the agreed classes"


# Encoding


def test_prepare_encodes_numbers_and_one_hot_categories_in_plan_order(tmp_path: Path) -> None:
    source = read(write(tmp_path, CLAIMS), categorical_columns=("region",))
    plan = table_plan(("region", "smoker", "age"), {"region": ("east", "north")})
    dataset = source.prepare(plan)
    assert dataset.name == "table"
    assert dataset.images.dtype == np.float32
    assert dataset.images.tolist() == [
        [0, 1, 0, 1, 30],
        [0, 0, 1, 0, 41],  # south: not in the vocabulary, the "other" slot
        [0, 1, 0, 1, 52],
    ]


def test_one_hot_matches_pandas_get_dummies_over_the_agreed_vocabulary() -> None:
    data = frame(200, seed=3)
    source = TableSource.from_frame(data, SourceOptions(label_column="fraud", categorical_columns=("region",)))
    vocabulary = ("east", "north", "west")  # "west" from another site; this site's "south" is not agreed
    x = source.prepare(table_plan(("region",), {"region": vocabulary})).images
    values = data["region"].where(data["region"].isin(vocabulary), "other")
    expected = pd.get_dummies(pd.Categorical(values, categories=[*vocabulary, "other"]), dtype=np.float32)
    np.testing.assert_array_equal(x, expected.to_numpy())


def test_features_are_matched_by_name_when_files_order_columns_differently(tmp_path: Path) -> None:
    data = frame()
    first = tmp_path / "first.csv"
    second = tmp_path / "second.csv"
    data.to_csv(first, index=False)
    data[["fraud", "region", "income", "smoker", "age"]].to_csv(second, index=False)
    plan = table_plan(("income", "region", "age", "smoker"), {"region": ("east", "north", "south")})
    one, two = (read(path, categorical_columns=("region",)).prepare(plan) for path in (first, second))
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)


def test_prepare_standardises_with_the_plan_statistics(tmp_path: Path) -> None:
    source = read(write(tmp_path, CLAIMS), feature_columns=("age", "smoker"))
    plan = table_plan(("age", "smoker"), mean=(40.0, 0.5), std=(10.0, 0.5))
    np.testing.assert_allclose(source.prepare(plan).images, [[-1.0, 1.0], [0.1, -1.0], [1.2, 1.0]], rtol=1e-6)


def test_csv_tsv_and_parquet_give_identical_prepared_arrays(tmp_path: Path) -> None:
    data = frame()
    data.to_csv(tmp_path / "t.csv", index=False)
    data.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    data.to_parquet(tmp_path / "t.parquet")
    plan = table_plan(("age", "income", "smoker", "region"), {"region": ("east", "north", "south")})
    sources = [read(tmp_path / name, categorical_columns=("region",)) for name in ("t.csv", "t.tsv", "t.parquet")]
    assert len({source.schema() for source in sources}) == 1
    assert len({source.fingerprint() for source in sources}) == 1
    prepared = [source.prepare(plan) for source in sources]
    for other in prepared[1:]:
        np.testing.assert_array_equal(prepared[0].images, other.images)
        np.testing.assert_array_equal(prepared[0].labels, other.labels)


def test_a_dataframe_source_and_the_file_it_was_written_to_agree(tmp_path: Path) -> None:
    data = frame()
    data.to_parquet(tmp_path / "t.parquet")
    options = SourceOptions(label_column="fraud", categorical_columns=("region",))
    from_frame = TableSource.from_frame(data, options)
    from_file = TableSource.read(tmp_path / "t.parquet", "parquet", options)
    assert from_frame.schema() == from_file.schema()
    assert from_frame.fingerprint() == from_file.fingerprint()
    assert from_frame.where == "DataFrame"


def test_the_source_keeps_arrays_not_the_dataframe() -> None:
    source = TableSource.from_frame(frame(), SourceOptions(label_column="fraud", categorical_columns=("region",)))
    assert not any(isinstance(value, (pd.DataFrame, pd.Series)) for value in vars(source).values())
    assert source._numeric.dtype == np.float32
    assert source._codes.dtype == np.int32


def test_a_changed_value_changes_the_fingerprint() -> None:
    data = frame()
    options = SourceOptions(label_column="fraud", categorical_columns=("region",))
    before = TableSource.from_frame(data, options).fingerprint()
    data.loc[3, "age"] += 1
    assert TableSource.from_frame(data, options).fingerprint() != before


def test_non_string_column_names_become_text() -> None:
    data = pd.DataFrame({0: [1.0, 2.0], 1: [0, 1]})
    source = TableSource.from_frame(data, SourceOptions(label_column="1"))
    assert source.schema().features == (Feature("0"),)


def test_a_latin1_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("ville,fraud\nBéziers,0\nNîmes,1\n".encode("latin-1"))
    source = read(path, categorical_columns=("ville",), min_group_size=1)
    assert source.schema().features[0].categories == ("Béziers", "Nîmes")


# Missing values


MISSING = "age,region,fraud\n30,north,0\n,south,1\n50,,1\n70,north,0\n"


def test_missing_value_under_error_names_file_row_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, MISSING)
    with pytest.raises(DatasetError) as caught:
        read(path, categorical_columns=("region",))
    assert str(caught.value) == f"{path}: row 2, column 'age' has no value; --missing mean or drop accepts it"


def test_missing_values_under_mean_take_the_site_mean_and_the_other_slot(tmp_path: Path) -> None:
    source = read(write(tmp_path, MISSING), categorical_columns=("region",), missing="mean", min_group_size=1)
    x = source.prepare(table_plan(("age", "region"), {"region": ("north", "south")})).images
    assert x.tolist() == [[30, 1, 0, 0], [50, 0, 1, 0], [50, 0, 0, 1], [70, 1, 0, 0]]
    assert source.schema().features[1].categories == ("north", "south")


def test_missing_values_under_drop_drop_their_rows_and_say_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, MISSING)
    with caplog.at_level(logging.INFO, logger="syncfed.data"):
        source = read(path, categorical_columns=("region",), missing="drop")
    assert len(source) == 2
    assert source.labels.tolist() == [0, 0]
    assert f"{path}: dropped 2 of 4 rows with a missing value" in caplog.messages


def test_a_missing_value_in_an_unused_column_is_no_matter(tmp_path: Path) -> None:
    assert len(read(write(tmp_path, MISSING), feature_columns=("age",), missing="drop")) == 3


def test_a_missing_label_stops_unless_drop(tmp_path: Path) -> None:
    path = write(tmp_path, "age,fraud\n30,0\n40,\n50,1\n")
    with pytest.raises(DatasetError) as caught:
        read(path, missing="mean")
    assert str(caught.value) == f"{path}: row 2, label column 'fraud' has no value; --missing drop skips the row"
    with pytest.raises(DatasetError) as caught:
        read(path)
    assert str(caught.value) == f"{path}: row 2, label column 'fraud' has no value; --missing drop skips the row"
    assert read(path, missing="drop").labels.tolist() == [0, 1]


def test_missing_values_everywhere(tmp_path: Path) -> None:
    path = write(tmp_path, "age,fraud\n,0\n,1\n")
    with pytest.raises(DatasetError) as caught:
        read(path, missing="drop")
    assert str(caught.value) == f"{path}: no rows left after dropping 2 rows with missing values"
    with pytest.raises(DatasetError) as caught:
        read(path, missing="mean")
    assert str(caught.value) == f"{path}: column 'age' has no values to take a mean of"


# Bad input


def test_missing_label_column_suggests_a_close_one_and_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    with pytest.raises(DatasetError) as caught:
        read(path, label_column="fruad")
    columns = "the columns are: age, region, smoker, fraud"
    assert str(caught.value) == f"{path}: no label column 'fruad' (did you mean 'fraud'?); {columns}"
    with pytest.raises(DatasetError) as caught:
        read(path, label_column="diagnosis")
    assert str(caught.value) == f"{path}: no label column 'diagnosis'; {columns}"


def test_a_long_list_of_columns_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    pd.DataFrame({f"c{i}": [1] for i in range(25)}).to_csv(path, index=False)
    with pytest.raises(DatasetError) as caught:
        read(path, label_column="label")
    assert str(caught.value).endswith(", c19 and 5 more")


def test_no_label_column_option_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    with pytest.raises(ConfigError) as caught:
        TableSource.read(path, "csv", SourceOptions())
    assert (
        str(caught.value)
        == f"{path}: which column is the label? pass --label-column, one of: age, region, smoker, fraud"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"feature_columns": ("agee",)},
            "no feature column 'agee' (did you mean 'age'?); the columns are: age, region, smoker, fraud",
        ),
        ({"feature_columns": ("age", "fraud")}, "column 'fraud' is the label; it cannot be a feature too"),
        ({"feature_columns": ("age", "age")}, "feature column 'age' is named twice"),
        (
            {"categorical_columns": ("regoin",)},
            "no categorical column 'regoin' (did you mean 'region'?); the columns are: age, region, smoker, fraud",
        ),
        (
            {"feature_columns": ("age",), "categorical_columns": ("region",)},
            "categorical column 'region' is not one of the feature columns",
        ),
    ],
)
def test_bad_column_options(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    path = write(tmp_path, CLAIMS)
    with pytest.raises(DatasetError) as caught:
        read(path, **options)
    assert str(caught.value) == f"{path}: {message}"


def test_a_non_numeric_feature_names_row_column_value_and_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    with pytest.raises(DatasetError) as caught:
        read(path)
    assert str(caught.value) == (
        f"{path}: row 1, column 'region': 'north' is not a number; if the column is categorical,"
        " pass --categorical-columns region"
    )
    path = write(tmp_path, "age,fraud\n30,0\n40,1\nforty,1\n", "mixed.csv")
    with pytest.raises(DatasetError) as caught:
        read(path)
    assert str(caught.value).startswith(f"{path}: row 3, column 'age': 'forty' is not a number;")


def test_row_numbers_count_kept_rows_as_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "age,fraud\n30,\nx,1\n")
    with pytest.raises(DatasetError) as caught:
        read(path, missing="drop")
    assert str(caught.value).startswith(f"{path}: row 2, column 'age': 'x' is not a number")


def test_an_infinite_number_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "age,fraud\n30,0\ninf,1\n")
    with pytest.raises(DatasetError) as caught:
        read(path)
    assert str(caught.value) == f"{path}: row 2, column 'age': inf is not a finite number"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("age,fraud\n", "the table has no rows"),
        ("fraud\n1\n", "no feature columns besides the label 'fraud'"),
    ],
)
def test_empty_and_degenerate_tables(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DatasetError) as caught:
        read(path)
    assert str(caught.value) == f"{path}: {message}"


def test_a_dataframe_with_a_column_twice_is_refused() -> None:
    data = pd.DataFrame([[1, 2, 0]], columns=["age", "age", "fraud"])
    with pytest.raises(DatasetError) as caught:
        TableSource.from_frame(data, SourceOptions(label_column="fraud"))
    assert str(caught.value) == "DataFrame: column 'age' appears twice"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        read(tmp_path / "absent.csv")
    assert str(caught.value) == f"{tmp_path / 'absent.csv'}: no such file"
    broken = write(tmp_path, "not parquet at all", "broken.parquet")
    with pytest.raises(DatasetError) as caught:
        read(broken)
    assert str(caught.value).startswith(f"{broken}: cannot be read as parquet: ")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="table format 'xlsx' is not one of csv, tsv, parquet"):
        TableSource.read(broken, "xlsx", SourceOptions(label_column="fraud"))


# The plan against this site's table


def test_a_plan_feature_this_table_lacks_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "income,fraud\n1,0\n")
    with pytest.raises(DatasetError) as caught:
        read(path).prepare(table_plan(("income", "age")))
    assert str(caught.value) == f"{path}: this site's table has no column 'age'"


def test_a_column_typed_differently_from_the_plan_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    numeric = read(path, feature_columns=("age",))
    with pytest.raises(DatasetError) as caught:
        numeric.prepare(table_plan(("age",), {"age": ("30",)}))
    assert str(caught.value) == (
        f"{path}: column 'age' is categorical in the plan, numeric here:"
        " start this worker with --categorical-columns age"
    )
    categorical = read(path, feature_columns=("region",), categorical_columns=("region",))
    with pytest.raises(DatasetError) as caught:
        categorical.prepare(table_plan(("region",)))
    assert str(caught.value) == (
        f"{path}: column 'region' is numeric in the plan, categorical here: leave it out of --categorical-columns"
    )


def test_a_plan_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CLAIMS)
    with pytest.raises(DatasetError) as caught:
        read(path, feature_columns=("age",)).prepare(DataPlan("arrays", (1,), ("0", "1")))
    assert str(caught.value) == f"{path}: this worker holds a table, the plan describes arrays"


def test_names_the_wire_cannot_carry_stop_the_start() -> None:
    long = "x" * 300
    with pytest.raises(DatasetError) as caught:
        TableSource.from_frame(pd.DataFrame({long: [1], "fraud": [0]}), SourceOptions(label_column="fraud"))
    assert str(caught.value).startswith("DataFrame: feature name must be a string of 1 to 256 characters, not 'xxx")
    many = pd.DataFrame({"code": [f"c{i}" for i in range(10_001)], "fraud": 0})
    with pytest.raises(DatasetError) as caught:
        TableSource.from_frame(
            many, SourceOptions(label_column="fraud", categorical_columns=("code",), min_group_size=1)
        )
    assert str(caught.value).startswith("DataFrame: categories of feature code must be a list of at most 10000 names")
