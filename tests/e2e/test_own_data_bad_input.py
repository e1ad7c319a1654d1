"""Bad input of a user's own data, end to end: each case stops a real program with one line and its exit status.

A worker that meets a bad file, folder, table, archive or loader at start-up
refuses to start (issue 16, "Bad input"): one line on stderr, the status of
``syncfed.cli.common.EXIT_CODES`` (a data problem 3, a wrong flag 2), no
traceback, and it never listens. Differences between sites that only the
coordinator sees stop the real coordinator program the same way, with the
status of ``IncompatibleWorkers``, before round 1.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import THREADS, running_workers
from PIL import Image
from programs import run_program

from syncfed.cli.common import exit_code
from syncfed.exceptions import ConfigError, DatasetError, IncompatibleWorkers
from syncfed.net.spawn import WorkerProcess

DATA_PROBLEM, WRONG_FLAG, DISAGREEMENT = (
    exit_code(DatasetError("")),
    exit_code(ConfigError("")),
    exit_code(IncompatibleWorkers("")),
)
LAYOUT = "expected one subfolder of images per class, as DIR/<class>/<image>"
FORMS = (
    "use one of images:DIR, csv:PATH, tsv:PATH, parquet:PATH, npz:PATH, module.path:function,"
    " or a path ending in .csv, .tsv, .parquet, .pq, .npz"
)

#: The loaders' module, written beside the data and put on the workers' PYTHONPATH.
LOADERS = """
import numpy as np

def raises(**settings):
    raise FileNotFoundError("no such file: /data/ward.csv")

def short_labels(**settings):
    return np.zeros((10, 3)), np.zeros(7)

def flat_inputs(**settings):
    return np.zeros(10), np.zeros(10)
"""


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), size: int = 8) -> Path:
    """A folder of grayscale PNG files, three per class; noise, so a truncated file loses image data, not its header."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bad input of the cases below, under one folder."""
    root = tmp_path_factory.mktemp("bad-input")
    (image_folder(root / "corrupt") / "dog" / "scan.png").write_bytes(b"this is not a PNG file")
    truncated = image_folder(root / "truncated", size=64) / "dog" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    Image.new("F", (8, 8)).save(image_folder(root / "float") / "dog" / "depth.tiff")
    (image_folder(root / "empty-class") / "bird").mkdir()
    (root / "flat").mkdir()
    Image.new("L", (8, 8)).save(root / "flat" / "a.png")

    table = pd.DataFrame({"age": [30, 40, 50, 60], "dose": [1.0, 2.0, 3.0, 4.0], "sick": ["yes", "no", "yes", "no"]})
    table.rename(columns={"sick": "ill"}).to_csv(root / "no-label.csv", index=False)
    text = table.assign(dose=["1", "2", "lots", "4"])
    text.to_csv(root / "text.csv", index=False)
    text.to_csv(root / "text.tsv", sep="\t", index=False)
    text.to_parquet(root / "text.parquet")
    gap = table.assign(dose=[1.0, np.nan, 3.0, 4.0])
    gap.to_csv(root / "gap.csv", index=False)
    gap.to_csv(root / "gap.tsv", sep="\t", index=False)
    gap.to_parquet(root / "gap.parquet")
    table.assign(sick=["yes", None, "yes", "no"]).to_csv(root / "label-gap.csv", index=False)
    table.assign(dose=np.nan).to_csv(root / "empty-column.csv", index=False)
    table.assign(dose=np.nan, age=[30, np.nan, 50, np.nan]).to_csv(root / "all-gaps.csv", index=False)
    table.to_csv(root / "good.csv", index=False)

    np.savez(root / "no-x.npz", y=np.array([0, 1]))
    np.savez(root / "objects.npz", x=np.ones((2, 2)), y=np.array([{"a": 1}, None], dtype=object))
    (root / "loaders").mkdir()
    (root / "loaders" / "ward_loaders.py").write_text(LOADERS)
    return root


#: (case, worker flags, exit status, the line after "run_websocket_server.py: error: "); {bad} is the fixture's folder.
CASES: list[tuple[str, list[str], int, str]] = [
    (
        "corrupt image",
        ["--data", "images:{bad}/corrupt"],
        DATA_PROBLEM,
        "{bad}/corrupt/dog/scan.png: cannot decode image: not an image file Pillow recognises",
    ),
    (
        "truncated image",
        ["--data", "images:{bad}/truncated"],
        DATA_PROBLEM,
        "{bad}/truncated/dog/1.png: cannot decode image: image file is truncated",
    ),
    (
        "unsupported image mode",
        ["--data", "images:{bad}/float"],
        DATA_PROBLEM,
        "{bad}/float/dog/depth.tiff: unsupported image mode 'F';"
        " expected 8-bit grayscale or colour, or 16-bit grayscale",
    ),
    (
        "empty class folder",
        ["--data", "images:{bad}/empty-class"],
        DATA_PROBLEM,
        "{bad}/empty-class/bird: class folder holds no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .dcm);"
        f" {LAYOUT}",
    ),
    (
        "no class subfolders",
        ["--data", "images:{bad}/flat"],
        DATA_PROBLEM,
        f"{{bad}}/flat: found 1 files and no class subfolders; {LAYOUT}",
    ),
    ("missing folder", ["--data", "images:{bad}/nowhere"], DATA_PROBLEM, f"{{bad}}/nowhere: no such folder; {LAYOUT}"),
    (
        "missing label column",
        ["--data", "csv:{bad}/no-label.csv", "--label-column", "sick"],
        DATA_PROBLEM,
        "{bad}/no-label.csv: no label column 'sick'; the columns are: age, dose, ill",
    ),
    *(
        (
            f"non-numeric feature ({kind})",
            ["--data", f"{kind}:{{bad}}/text.{kind}", "--label-column", "sick"],
            DATA_PROBLEM,
            f"{{bad}}/text.{kind}: row 3, column 'dose': 'lots' is not a number;"
            " if the column is categorical, pass --categorical-columns dose",
        )
        for kind in ("csv", "tsv", "parquet")
    ),
    *(
        (
            f"missing value, --missing error ({kind})",
            ["--data", f"{kind}:{{bad}}/gap.{kind}", "--label-column", "sick", "--missing", "error"],
            DATA_PROBLEM,
            f"{{bad}}/gap.{kind}: row 2, column 'dose' has no value; --missing mean or drop accepts it",
        )
        for kind in ("csv", "tsv", "parquet")
    ),
    (
        "missing value by default",
        ["--data", "{bad}/gap.csv", "--label-column", "sick"],
        DATA_PROBLEM,
        "{bad}/gap.csv: row 2, column 'dose' has no value; --missing mean or drop accepts it",
    ),
    (
        "missing label, --missing mean",
        ["--data", "csv:{bad}/label-gap.csv", "--label-column", "sick", "--missing", "mean"],
        DATA_PROBLEM,
        "{bad}/label-gap.csv: row 2, label column 'sick' has no value; --missing drop skips the row",
    ),
    (
        "a column of no values, --missing mean",
        ["--data", "csv:{bad}/empty-column.csv", "--label-column", "sick", "--missing", "mean"],
        DATA_PROBLEM,
        "{bad}/empty-column.csv: column 'dose' has no values to take a mean of",
    ),
    (
        "a missing value in every row, --missing drop",
        ["--data", "csv:{bad}/all-gaps.csv", "--label-column", "sick", "--missing", "drop"],
        DATA_PROBLEM,
        "{bad}/all-gaps.csv: no rows left after dropping 4 rows with missing values",
    ),
    (
        "npz without x",
        ["--data", "npz:{bad}/no-x.npz"],
        DATA_PROBLEM,
        "{bad}/no-x.npz: no array 'x'; the file holds 'y'",
    ),
    (
        "npz of Python objects",
        ["--data", "npz:{bad}/objects.npz"],
        DATA_PROBLEM,
        "{bad}/objects.npz: array 'y' holds Python objects, which a worker never unpickles;"
        " save numbers, and names as strings",
    ),
    (
        "a loader that raises",
        ["--data", "ward_loaders:raises"],
        DATA_PROBLEM,
        "loader ward_loaders:raises failed: FileNotFoundError: no such file: /data/ward.csv",
    ),
    (
        "a loader's labels of the wrong length",
        ["--data", "ward_loaders:short_labels"],
        DATA_PROBLEM,
        "loader ward_loaders:short_labels: y must hold one label per example (10), not shape (7,)",
    ),
    (
        "a loader's inputs without a feature axis",
        ["--data", "ward_loaders:flat_inputs"],
        DATA_PROBLEM,
        "loader ward_loaders:flat_inputs: x must hold at least one example of at least one value, not shape (10,)",
    ),
    (
        "unknown prefix",
        ["--data", "cvs:{bad}/good.csv"],
        WRONG_FLAG,
        f"--data 'cvs:{{bad}}/good.csv' is not a data source (did you mean csv:?); {FORMS}",
    ),
    (
        "--digits with --data",
        ["--data", "csv:{bad}/good.csv", "--label-column", "sick", "--digits", "0,1"],
        WRONG_FLAG,
        "--digits picks classes of digits or MNIST; a worker with its own data holds every example of it"
        " (use --shard K/N for a part)",
    ),
]

#: Both ways of starting a worker, taken in turn by the cases.
ENTRIES = (["run_websocket_server.py"], ["-m", "syncfed.cli.worker"])


@pytest.mark.parametrize(
    ("flags", "status", "line", "entry"),
    [(flags, status, line, ENTRIES[i % 2]) for i, (_, flags, status, line) in enumerate(CASES)],
    ids=[case for case, *_ in CASES],
)
def test_bad_input_stops_the_worker_with_one_line(
    bad: Path, flags: list[str], status: int, line: str, entry: list[str]
) -> None:
    filled = [flag.format(bad=bad) for flag in flags]
    started = run_program(
        [*entry, "--id", "north", "--host", "127.0.0.1", "--port", "0", *THREADS, *filled], bad / "loaders"
    )
    assert (started.returncode, started.stderr) == (status, f"run_websocket_server.py: error: {line.format(bad=bad)}\n")
    assert "listening on" not in started.stdout


# Differences only the coordinator sees ---------------------------------------------------


def patients(seed: int, labels: tuple[str, str] = ("no", "yes"), rows: int = 40) -> pd.DataFrame:
    """A site's table: a label that age and dose decide."""
    rng = np.random.default_rng(seed)
    age, dose = rng.normal(50, 10, rows).round(1), rng.normal(2, 1, rows).round(2)
    return pd.DataFrame({"age": age, "dose": dose, "sick": np.where(age + 10 * dose > 70, labels[1], labels[0])})


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tables and image folders of sites that each differ from alice's in one way."""
    root = tmp_path_factory.mktemp("sites")
    patients(1).to_csv(root / "alice.csv", index=False)
    patients(2).to_csv(root / "bob.csv", index=False)
    test = patients(3)
    test.to_csv(root / "test.csv", index=False)
    test.assign(sick=np.where(test.index < 5, "unsure", test.sick)).to_csv(root / "test-unsure.csv", index=False)
    patients(2, labels=("No", "Yes")).to_csv(root / "bob-capitals.csv", index=False)
    patients(2).drop(columns="age").to_csv(root / "bob-no-age.csv", index=False)
    patients(2).assign(weight=70.0).to_csv(root / "bob-weight.csv", index=False)
    bob = patients(2)
    bob.assign(sick=bob.age / 7).to_csv(root / "bob-continuous.csv", index=False)
    bob.assign(dose=np.where(bob.dose > 2, "high", "low")).to_csv(root / "bob-dose-levels.csv", index=False)
    image_folder(root / "alice")
    image_folder(root / "bob")
    for mode, size, name in (("RGB", 8, "bob-rgb"), ("L", 12, "bob-12px")):
        for label in ("cat", "dog"):
            (root / name / label).mkdir(parents=True)
            Image.new(mode, (size, size)).save(root / name / label / "0.png")
    return root


TABLE = "--worker-args=--label-column sick"
NO_EVALUATOR = "--evaluator="

#: (case, the coordinator's flags, the line after "run_websocket_client.py: error: "); {sites} is the fixture's folder.
DISAGREEMENTS: list[tuple[str, list[str], str]] = [
    (
        "a class only the evaluator holds",
        ["alice=csv:{sites}/alice.csv", "bob=csv:{sites}/bob.csv", "testing=csv:{sites}/test-unsure.csv", TABLE],
        "only the evaluator testing holds class 'unsure': no trainer has an example of it,"
        " so the model could never learn it",
    ),
    (
        "a class spelt in another case",
        ["alice=csv:{sites}/alice.csv", "bob=csv:{sites}/bob-capitals.csv", NO_EVALUATOR, TABLE],
        "bob's class 'No' and alice's class 'no' differ only in case or surrounding spaces:"
        " name the class the same way at every site",
    ),
    (
        "a column one site lacks",
        ["alice=csv:{sites}/alice.csv", "bob=csv:{sites}/bob-no-age.csv", NO_EVALUATOR, TABLE],
        "bob's table has no column 'age'",
    ),
    (
        "an extra column at one of three sites",
        [
            "alice=csv:{sites}/alice.csv",
            "bob=csv:{sites}/bob.csv",
            "charlie=csv:{sites}/bob-weight.csv",
            NO_EVALUATOR,
            TABLE,
        ],
        "charlie's table has a column 'weight' that the others lack: start it with --feature-columns age,dose",
    ),
    (
        "a continuous label at one of three sites",
        [
            "alice=csv:{sites}/alice.csv",
            "bob=csv:{sites}/bob-continuous.csv",
            "testing=csv:{sites}/test.csv",
            TABLE,
        ],
        "bob has a continuous label (non-integral numbers), the others class names: check its label column,"
        " or start every site with --label-type continuous",
    ),
    (
        "images of another channel count",
        ["alice=images:{sites}/alice", "bob=images:{sites}/bob-rgb", NO_EVALUATOR],
        "bob's images are 3-channel, alice 1: start it with --channels 1",
    ),
    (
        "images of another size",
        ["alice=images:{sites}/alice", "bob=images:{sites}/bob-12px", NO_EVALUATOR],
        "bob's images are 12x12 pixels, alice 8x8: start it with --image-size 8,8",
    ),
]


def coordinator(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return run_program(["run_websocket_client.py", "--training-rounds", "1", "--no-progress", *arguments])


def assert_refused(run: subprocess.CompletedProcess[str], line: str) -> None:
    """The coordinator stopped at the handshake with one line and the status of a disagreement."""
    assert (run.returncode, run.stderr) == (DISAGREEMENT, f"run_websocket_client.py: error: {line}\n")
    assert "Round 1" not in run.stdout


@pytest.mark.parametrize(("arguments", "line"), [case[1:] for case in DISAGREEMENTS], ids=[c[0] for c in DISAGREEMENTS])
def test_sites_that_disagree_stop_the_coordinator_with_one_line(sites: Path, arguments: list[str], line: str) -> None:
    flags = [argument if argument.startswith("--") else f"--site={argument}" for argument in arguments]
    assert_refused(coordinator([flag.format(sites=sites) for flag in flags]), line)


@pytest.fixture(scope="module")
def odd_workers(sites: Path) -> Iterator[dict[str, WorkerProcess]]:
    """Workers started with flags of their own, which --site cannot give one site: alice over her table, bob with
    'dose' as a categorical column, and charlie over the bundled digits."""
    table = ["--label-column", "sick"]
    plan = [
        ("alice", [*THREADS, "--data", f"csv:{sites}/alice.csv", *table]),
        ("bob", [*THREADS, "--data", f"csv:{sites}/bob-dose-levels.csv", *table, "--categorical-columns", "dose"]),
        ("charlie", [*THREADS, "--dataset", "digits"]),
    ]
    with running_workers(plan) as workers:
        yield workers


@pytest.mark.parametrize(
    ("listed", "line"),
    [
        (
            ("alice", "bob"),
            "bob's column 'dose' is categorical, alice's numeric: start it without 'dose' in --categorical-columns",
        ),
        (
            ("charlie", "alice"),
            "charlie holds the bundled digits data set, but alice its own table:"
            " start every worker with --data, or none",
        ),
    ],
    ids=["numeric at one site, categorical at another", "own data beside a bundled data set"],
)
def test_workers_started_apart_that_disagree_stop_the_coordinator(
    odd_workers: dict[str, WorkerProcess], listed: tuple[str, ...], line: str
) -> None:
    endpoints = ",".join(f"{name}={odd_workers[name].uri}" for name in listed)
    assert_refused(coordinator(["--workers", endpoints, NO_EVALUATOR]), line)
