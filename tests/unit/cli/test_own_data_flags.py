"""The worker's own-data flags: they build its source options, and a mistake costs one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncfed.cli import worker
from syncfed.cli.common import parse_arguments
from syncfed.config import WorkerConfig
from syncfed.data.base import SourceOptions
from syncfed.datasets import DatasetSpec


def config(argv: list[str]) -> WorkerConfig:
    return worker.config_from_args(parse_arguments(worker.build_parser(), ["--id", "alice", *argv]))


def test_the_own_data_flags_build_the_source_options(tmp_path: Path) -> None:
    built = config(
        [
            "--data",
            "csv:claims.csv",
            "--image-size",
            "224,160",
            "--channels",
            "1",
            "--label-column",
            "fraud",
            "--feature-columns",
            "age, amount,region",
            "--categorical-columns",
            "region",
            "--missing",
            "mean",
            "--label-type",
            "classes",
            "--data-arg",
            "site=north",
            "--data-arg",
            "rows=a=b",
            "--min-group-size",
            "5",
        ]
    )
    assert built.data == "csv:claims.csv"
    assert built.source_options == SourceOptions(
        image_size=(224, 160),
        channels=1,
        label_column="fraud",
        feature_columns=("age", "amount", "region"),
        categorical_columns=("region",),
        missing="mean",
        label_type="classes",
        data_args={"site": "north", "rows": "a=b"},
        min_group_size=5,
    )
    assert config(["--data", "images:x", "--image-size", "64"]).source_options.image_size == (64, 64)
    assert config(["--dataset-spec", "n=csv:a.csv"]).datasets == (DatasetSpec("n", source="csv:a.csv"),)
    file = tmp_path / "worker.toml"
    file.write_text('id = "bob"\ndata = "npz:site.npz"\nimage-size = 32\ndata-arg = ["k=v"]\n')
    from_file = worker.config_from_args(parse_arguments(worker.build_parser(), ["--config", str(file)]))
    assert (from_file.data, from_file.source_options.image_size) == ("npz:site.npz", (32, 32))
    assert from_file.source_options.data_args == {"k": "v"}


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--dataset", "mnist", "--data", "csv:a.csv"],
            "argument --data: not allowed with argument --dataset",
        ),
        (["--data", "images:x", "--image-size", "big"], "argument --image-size: 'big' is not a size such as 224"),
        (["--data", "csv:a.csv", "--feature-columns", "a,,b"], "argument --feature-columns: 'a,,b' is not a list"),
        (["--data", "csv:a.csv", "--data-arg", "novalue"], "argument --data-arg: 'novalue' is not a loader setting"),
        (["--data", "images:x", "--channels", "2"], "argument --channels: invalid choice: 2"),
    ],
)
def test_a_flag_mistake_costs_one_line(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        worker.main(["--id", "alice", *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run_websocket_server.py: error: {error}") and err.count("\n") == 1


def test_digits_with_own_data_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--id", "alice", "--data", "npz:a.npz", "--digits", "0-3"]) == 2
    assert capsys.readouterr().err == (
        "run_websocket_server.py: error: --digits picks classes of digits or MNIST; a worker with its own data"
        " holds every example of it (use --shard K/N for a part)\n"
    )
