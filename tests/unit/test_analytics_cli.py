"""Federated analytics from the command line: bad settings stop before connecting, and runs over
real workers, plain, differentially private and securely aggregated, with workers that refuse or die."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, THREADS, running_workers
from units import MS

from syncfed.analytics import sums_length
from syncfed.cli import analytics as analytics_cli
from syncfed.config import WorkerConfig
from syncfed.exceptions import SecAggError
from syncfed.net.link import WorkerLink
from syncfed.net.secure_round import SecureRound
from syncfed.net.spawn import WorkerProcess
from syncfed.protocol import Hello, Query
from syncfed.secagg import SecAggConfig, SecAggResult
from syncfed.worker import load_shard

CLI_TIMEOUT = 120_000 * MS  # one command-line run on a busy machine
DIGITS_TRAIN = 1437  # 80% of scikit-learn's 1,797 digits


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["quantiles", "--range", "1", "0"],
            "--bins 256 --range 1.0 0.0: range must be two finite numbers low < high, not (1.0, 0.0)",
        ),
        (
            ["--workers", "alice=http://x", "label-histogram"],
            "worker entry 'alice=http://x' must look like alice=ws://localhost:8777",
        ),
        (["--dp-seed", "3", "label-histogram"], "--dp-seed only applies with --dp-epsilon"),
        (["feature-stats", "--clip-range", "0", "1"], "--clip-range only applies with --dp-epsilon or --secure-agg"),
        (["--secagg-threshold", "2", "label-histogram"], "--secagg-threshold needs --secure-agg"),
        (
            ["--workers", "alice=ws://localhost:1", "--secure-agg", "label-histogram"],
            "--secure-agg needs at least 2 workers, not 1",
        ),
        (
            ["--secure-agg", "--secagg-threshold", "1", "label-histogram"],
            "--secagg-threshold 1 must be more than half of, and at most, the 3 workers",
        ),
        (
            ["--secure-agg", "--secagg-threshold", "4", "label-histogram"],
            "--secagg-threshold 4 must be more than half of, and at most, the 3 workers",
        ),
        (
            ["--secure-agg", "feature-stats"],
            "feature-stats with --secure-agg needs --clip-range LOW HIGH (digits: -0.82 1.85, MNIST: -0.43 2.83)",
        ),
        (
            ["--secure-agg", "--dp-epsilon", "1", "feature-stats"],
            "feature-stats with --dp-epsilon and --secure-agg needs --clip-range LOW HIGH (digits: -0.82 1.85,"
            " MNIST: -0.43 2.83)",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats"],
            "feature-stats with --dp-epsilon needs --clip-range LOW HIGH (digits: -0.82 1.85, MNIST: -0.43 2.83)",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats", "--clip-range", "1", "0"],
            "--clip-range 1 0 must be two finite numbers low < high",
        ),
        (
            ["--dp-epsilon", "1", "feature-stats", "--clip-range", "0", "inf"],
            "--clip-range 0 inf must be two finite numbers low < high",
        ),
    ],
)
def test_bad_settings_stop_before_connecting(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert analytics_cli.main(argv) == 2
    assert capsys.readouterr().err == f"python -m syncfed analytics: error: {message}\n"


def test_bad_flag_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in (
        (["feature-stats", "--features", "3-1"], "'3-1' is not all, none or indices such as 0-7,36"),
        (["quantiles", "--range", "0", "1", "--q", "0.5,1.5"], "probability 1.5 is not within 0..1"),
        (["--dp-epsilon", "0", "label-histogram"], "argument --dp-epsilon: '0' is not a positive finite number"),
        (["--dp-epsilon", "-1", "label-histogram"], "argument --dp-epsilon: '-1' is not a positive finite number"),
        (["--dp-epsilon", "inf", "label-histogram"], "argument --dp-epsilon: 'inf' is not a positive finite number"),
        (["--dp-epsilon", "nan", "label-histogram"], "argument --dp-epsilon: 'nan' is not a positive finite number"),
        (["--dp-epsilon", "one", "label-histogram"], "argument --dp-epsilon: 'one' is not a positive finite number"),
        (["--dp-seed", "-1", "label-histogram"], "argument --dp-seed: '-1' is not a non-negative integer"),
    ):
        with pytest.raises(SystemExit) as stopped:
            analytics_cli.main(argv)
        assert stopped.value.code == 2
        assert text in capsys.readouterr().err


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncfed", "analytics", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def test_cli_over_real_workers(digits_workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    names = ("alice", "bob", "charlie")
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    # What each session worker trains on: its classes of the training set, less its validation split.
    holdings = {name: load_shard(WorkerConfig(name)) for name in names}
    sizes = {name: len(holding.data) for name, holding in holdings.items()}
    assert sum(sizes.values()) + sum(h.validation_size for h in holdings.values()) == DIGITS_TRAIN
    pixels = np.concatenate([h.data.images.reshape(len(h.data), -1) for h in holdings.values()]).astype(np.float64)
    labels = np.concatenate([h.data.labels for h in holdings.values()])

    histogram = run_cli(["--workers", workers, "--json", str(tmp_path / "labels.json"), "label-histogram"])
    assert histogram.returncode == 0, histogram.stderr
    lines = histogram.stdout.splitlines()
    assert lines[0] == f"label-histogram over {len(labels)} examples of 3 workers (alice, bob, charlie)"
    assert lines[1].split() == ["label", "alice", "bob", "charlie", "total"]
    assert lines[-1].split() == ["total", *(str(sizes[name]) for name in names), str(len(labels))]
    document = json.loads((tmp_path / "labels.json").read_text())
    assert document["total"] == np.bincount(labels, minlength=10).tolist()
    assert document["answered"] == sizes and document["failed"] == {}

    # Differentially private: the noisy total only, with its noise named; no exact sizes.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dp.json"), "--dp-epsilon", "1.0", "--dp-seed", "0"]
        + ["label-histogram"]
    )
    assert private.returncode == 0, private.stderr
    lines = private.stdout.splitlines()
    assert lines[:2] == [
        "label-histogram over 3 workers (alice, bob, charlie)",
        "1-differentially private: Laplace noise of scale 1 on each count (sensitivity 1)",
    ]
    assert lines[2].split() == ["label", "total"]
    document = json.loads((tmp_path / "dp.json").read_text())
    exact = np.bincount(labels, minlength=10)
    noisy = np.array(document["total"])
    assert np.abs(noisy - exact).max() < 12  # Laplace(1): P(|noise| >= 12) = exp(-12) per count
    assert not np.array_equal(noisy, exact)
    assert [float(line.split()[1]) for line in lines[3:13]] == pytest.approx(noisy.tolist(), abs=0.051)
    assert document["answered"] == list(names) and document["epsilon"] == 1.0
    assert document["noise"] == [
        {"released": "each count", "mechanism": "laplace", "epsilon": 1.0, "sensitivity": 1.0, "scale": 1.0}
    ]

    # Quantiles over all 64 pixels: one example is 64 values, so each cell gets noise of scale 64 / epsilon.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dpq.json"), "--dp-epsilon", "1", "--dp-seed", "0"]
        + ["quantiles", "--range", "-0.82", "1.85", "--bins", "64", "--q", "0.5,0.9"]
    )
    assert private.returncode == 0, private.stderr
    assert private.stdout.splitlines()[1] == (
        "1-differentially private: Laplace noise of scale 64 on each histogram cell (sensitivity 64)"
    )
    document = json.loads((tmp_path / "dpq.json").read_text())
    assert document["noise"][0]["sensitivity"] == 64 and document["noise"][0]["scale"] == 64
    (row,) = document["features"]
    exact = np.quantile(pixels.ravel(), [0.5, 0.9])
    # Noise of scale 64 on 66 cells of 82,000 values moves ranks by about 1%: a few bin widths at most.
    assert np.abs(np.array(row["quantiles"]) - exact).max() < 4 * 2.67 / 64

    stats = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "stats.json"), "feature-stats", "--features", "2,36"]
    )
    assert stats.returncode == 0, stats.stderr
    rows = {row["feature"]: row for row in json.loads((tmp_path / "stats.json").read_text())["features"]}
    assert list(rows) == ["2", "36", "all"]
    for name, column in (("2", pixels[:, 2]), ("36", pixels[:, 36]), ("all", pixels.ravel())):
        assert rows[name]["count"] == column.size
        assert rows[name]["mean"] == pytest.approx(column.mean(), rel=1e-9, abs=1e-12)
        assert rows[name]["variance"] == pytest.approx(column.var(), rel=1e-9)

    # Differentially private statistics: the workers clip to the range, the answer carries noise.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "dps.json"), "--dp-epsilon", "1", "--dp-seed", "0"]
        + ["feature-stats", "--features", "2,36", "--clip-range", "-0.82", "1.85"]
    )
    assert private.returncode == 0, private.stderr
    noisy = {row["feature"]: row for row in json.loads((tmp_path / "dps.json").read_text())["features"]}
    assert list(noisy) == ["2", "36", "all"]
    clipped = np.clip(pixels, -0.82, 1.85)  # clips nothing on digits: the data lie in [-0.812, 1.848]
    for name, column in (("2", clipped[:, 2]), ("36", clipped[:, 36]), ("all", clipped.ravel())):
        assert noisy[name]["mean"] != column.mean()  # noise was added
        # The sums' noise: Laplace of scale (2 + 64) features x half the range / (epsilon / 3), over 1292 examples.
        assert abs(noisy[name]["mean"] - column.mean()) < 6 * 66 * 1.335 * 3 / len(labels)
        assert -0.82 <= noisy[name]["mean"] <= 1.85

    # Pixel 36 takes rare values on every shard: each worker refuses, none answers.
    refused = run_cli(["--workers", workers, "quantiles", "--range", "-0.82", "1.85", "--features", "36"])
    assert refused.returncode == 6
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == pixel_36_refusals(names)


def pixel_36_refusals(names: Sequence[str]) -> list[str]:
    """What the command prints when these workers refuse quantiles of pixel 36, whose values are rare everywhere."""
    return [
        f"python -m syncfed analytics: {name} answered with error refused: quantiles would describe a group of fewer"
        " than 10 examples (a cell of feature 36); this worker's minimum group size is 10"
        for name in names
    ]


def test_cli_secure_aggregation_over_real_workers_equals_the_plain_answer(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    names = ["alice", "bob", "charlie"]
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    queries = {
        "label-histogram": ["label-histogram"],
        "quantiles": ["quantiles", "--range", "-0.82", "1.85", "--bins", "64", "--q", "0.1,0.5,0.9"],
        # The range clips nothing on digits (the data lie in [-0.812, 1.848]): the plain answer needs none.
        "feature-stats": ["feature-stats", "--features", "2,36", "--clip-range", "-0.82", "1.85"],
    }
    documents = {}
    for kind, arguments in queries.items():
        plain_arguments = arguments[: arguments.index("--clip-range")] if "--clip-range" in arguments else arguments
        plain = run_cli(["--workers", workers, "--json", str(tmp_path / f"{kind}.json"), *plain_arguments])
        assert plain.returncode == 0, plain.stderr
        secure = run_cli(["--workers", workers, "--json", str(tmp_path / f"s-{kind}.json"), "--secure-agg", *arguments])
        assert secure.returncode == 0, secure.stderr
        assert secure.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
        assert secure.stdout.splitlines()[1].startswith(
            "securely aggregated: only the sum of the answers was revealed (threshold 2 of 3 workers)"
        )
        documents[kind] = (
            json.loads((tmp_path / f"{kind}.json").read_text()),
            json.loads((tmp_path / f"s-{kind}.json").read_text()),
        )
        exact, summed = documents[kind]
        assert summed["answered"] == names and summed["failed"] == {}
        assert summed["secure_agg"]["summed"] == names and summed["secure_agg"]["recovered"] == []

    exact, summed = documents["label-histogram"]
    assert summed["total"] == exact["total"] and "per_worker" not in summed  # no worker's own counts
    assert summed["secure_agg"] == {
        "workers": 3,
        "threshold": 2,
        "summed": names,
        "recovered": [],
        "sum_error_bound": 0.0,
    }
    exact, summed = documents["quantiles"]
    assert summed["features"] == exact["features"]  # the same summed histogram, so the same estimates
    exact, summed = documents["feature-stats"]
    bound = summed["secure_agg"]["sum_error_bound"]
    assert 0 < bound < 1e-6
    for plain_row, secure_row in zip(exact["features"], summed["features"], strict=True):
        assert secure_row["feature"] == plain_row["feature"] and secure_row["count"] == plain_row["count"]
        assert secure_row["mean"] == pytest.approx(plain_row["mean"], rel=1e-9, abs=10 * bound)
        assert secure_row["variance"] == pytest.approx(plain_row["variance"], rel=1e-9, abs=10 * bound)

    # A range that clips: the workers clip before summing, as numpy does over their pooled pixels.
    clipped = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "clipped.json"), "--secure-agg"]
        + ["feature-stats", "--features", "2,36", "--clip-range", "-0.5", "1.0"]
    )
    assert clipped.returncode == 0, clipped.stderr
    holdings = [load_shard(WorkerConfig(name)).data for name in names]
    pixels = np.clip(np.concatenate([h.images.reshape(len(h), -1) for h in holdings]).astype(np.float64), -0.5, 1.0)
    rows = {row["feature"]: row for row in json.loads((tmp_path / "clipped.json").read_text())["features"]}
    for name, column in (("2", pixels[:, 2]), ("36", pixels[:, 36]), ("all", pixels.ravel())):
        assert rows[name]["count"] == column.size
        assert rows[name]["mean"] == pytest.approx(column.mean(), rel=1e-9, abs=1e-9)
        assert rows[name]["variance"] == pytest.approx(column.var(), rel=1e-9, abs=1e-9)
    assert pixels.max() == 1.0 and pixels.min() == -0.5  # the range did clip

    # Secure and differentially private: the noise goes on the sum.
    private = run_cli(
        ["--workers", workers, "--json", str(tmp_path / "sdp.json"), "--secure-agg", "--dp-epsilon", "1"]
        + ["--dp-seed", "0", "label-histogram"]
    )
    assert private.returncode == 0, private.stderr
    assert private.stdout.splitlines()[:3] == [
        "label-histogram over 3 workers (alice, bob, charlie)",
        "1-differentially private: Laplace noise of scale 1 on each count (sensitivity 1)",
        "securely aggregated: only the sum of the answers was revealed (threshold 2 of 3 workers)",
    ]
    noisy = np.array(json.loads((tmp_path / "sdp.json").read_text())["total"])
    exact_total = np.array(documents["label-histogram"][0]["total"])
    assert 0 < np.abs(noisy - exact_total).max() < 12  # Laplace(1): P(|noise| >= 12) = exp(-12) per count

    # Every worker refuses pixel 36's histogram: too few masked answers to unmask anything.
    refused = run_cli(
        ["--workers", workers, "--secure-agg", "quantiles", "--range", "-0.82", "1.85", "--features", "36"]
    )
    assert refused.returncode == 8
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        *pixel_36_refusals(names),
        "python -m syncfed analytics: error: secure aggregation aborted: 0 clients sent masked inputs, threshold is 2",
    ]


def test_a_refusing_worker_is_left_out_of_the_secure_sum(
    digits_workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    names = ["alice", "bob", "charlie"]
    workers = ",".join(f"{name}={digits_workers[name].uri}" for name in names)
    with running_workers([("gina", [*THREADS, "--digits", "1,2", "--min-group-size", "100000"])]) as extra:
        everyone = f"{workers},gina={extra['gina'].uri}"
        secure = run_cli(["--workers", everyone, "--json", str(tmp_path / "s.json"), "--secure-agg", "label-histogram"])
    assert secure.returncode == 6  # a refusal, as without secure aggregation
    assert secure.stderr.splitlines() == [
        "python -m syncfed analytics: gina answered with error refused: this worker holds 259 examples, fewer than"
        " its minimum group size of 100000"
    ]
    plain = run_cli(["--workers", workers, "--json", str(tmp_path / "p.json"), "label-histogram"])
    assert plain.returncode == 0, plain.stderr
    summed, exact = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "p.json"))
    assert secure.stdout.splitlines()[0] == plain.stdout.splitlines()[0] + "; left out: gina"
    assert summed["total"] == exact["total"]  # gina's masks are stripped through her key's shares
    assert summed["secure_agg"]["summed"] == names and summed["secure_agg"]["threshold"] == 3
    assert list(summed["failed"]) == ["gina"]


def test_a_worker_lost_after_masking_its_answer_stays_in_the_secure_sum(
    digits_workers: dict[str, WorkerProcess],
    disposable_worker: WorkerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = ["alice", "bob", "charlie", "erin"]
    uris = {**{name: digits_workers[name].uri for name in names[:3]}, "erin": disposable_worker.uri}
    workers = ",".join(f"{name}={uri}" for name, uri in uris.items())
    assert analytics_cli.main(["--workers", workers, "--json", str(tmp_path / "p.json"), "label-histogram"]) == 0

    class KillingErin(SecureRound):
        async def unmask(self) -> SecAggResult:
            os.kill(disposable_worker.process.pid, signal.SIGKILL)  # erin's masked answer is already in
            return await super().unmask()

    monkeypatch.setattr("syncfed.coordinator.query_round.SecureRound", KillingErin)
    capsys.readouterr()
    status = analytics_cli.main(
        ["--workers", workers, "--json", str(tmp_path / "s.json"), "--secure-agg", "label-histogram"]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.splitlines()[1] == (
        "securely aggregated: only the sum of the answers was revealed (threshold 3 of 4 workers;"
        " left after masking, unmasked from the others' shares: erin)"
    )
    summed, exact = (json.loads((tmp_path / name).read_text()) for name in ("s.json", "p.json"))
    assert summed["total"] == exact["total"] and summed["answered"] == names and summed["failed"] == {}
    assert summed["secure_agg"]["recovered"] == ["erin"]


def test_a_worker_refuses_an_answer_beyond_the_secure_round_s_limit(digits_workers: dict[str, WorkerProcess]) -> None:
    """A coordinator that sizes the round too small gets a refusal, not a silently clipped answer."""
    names = ["alice", "bob"]
    query = Query("label-histogram")
    reasons: dict[str, str] = {}

    async def why(client: WorkerLink, error: BaseException) -> str:
        reasons[client.name] = str(error)
        return str(error)

    async def scenario() -> None:
        clients = [
            WorkerLink(
                name, digits_workers[name].uri, max_message_size=2**20, connect_timeout=10_000 * MS, ping_interval=None
            )
            for name in names
        ]
        try:
            for client in clients:
                await client.connect()
                await client.request(Hello())
            # 100 is below every worker's example count (the first entry of its sums).
            config = SecAggConfig(2, 2, sums_length(query, 10), 100.0, os.urandom(32), bits=64, max_count=1)
            secure = SecureRound(clients, config, timeout=60_000 * MS, failure=why)
            with pytest.raises(SecAggError, match="^0 clients sent masked inputs, threshold is 2$"):
                await secure.run(dict.fromkeys(names, query), weighted=False)
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    asyncio.run(asyncio.wait_for(scenario(), timeout=CLI_TIMEOUT))
    assert reasons == {
        name: f"{name} answered with error incompatible: the answer exceeds the secure round's limit of 100"
        for name in names
    }
