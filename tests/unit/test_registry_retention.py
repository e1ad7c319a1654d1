"""What a registry keeps: the rounds a run records, prune, du, the short `best` line and export's format."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from syncfed.cli.models import main as models_main
from syncfed.config import CoordinatorConfig
from syncfed.coordinator.journal import Journal
from syncfed.exceptions import ConfigError
from syncfed.protocol import Info
from syncfed.registry import ModelRegistry, ModelVersion, export_format
from syncfed.retention import disk_usage, headline_metric, prune_plan
from syncfed.strategies import make_strategy


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((64, 64), value, dtype=np.float32)}


def record(registry: ModelRegistry, run_id: str, round: int, value: float, **metrics: float) -> ModelVersion:
    return registry.record(
        run_id=run_id,
        round=round,
        model="digits-cnn",
        weights=weights(value),
        participants=["alice"],
        strategy={"name": "fedavg"},
        settings={"input_shape": [1, 8, 8]},
        metrics=metrics,
    )


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """Run alpha: 5 classification rounds, best at round 2; run beta: 4 regression rounds (lower MAE is
    better), best at round 1, its round 4 with alpha:5's weights (one shared file)."""
    registry = ModelRegistry(tmp_path / "registry")
    for round, accuracy in enumerate([0.5, 0.9, 0.7, 0.8, 0.6], start=1):
        record(registry, "alpha", round, float(round), accuracy=accuracy, loss=1 - accuracy)
    for round, mae in enumerate([1.0, 3.0, 2.0, 4.0], start=1):
        record(registry, "beta", round, 5.0 if round == 4 else 10.0 + round, mae=mae, loss=mae)
    return registry


def cli(registry: ModelRegistry, capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    code = models_main(["--registry", str(registry.directory), *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def size(number: int) -> str:
    """The figure `du` and `prune` print, computed here by hand: MiB with one decimal (KiB below 1 MiB)."""
    return f"{number / 2**20:.1f} MiB" if number >= 2**20 else f"{number / 2**10:.1f} KiB"


# What a run records


def journal_run(tmp_path: Path, rounds_done: int, **settings: object) -> list[int]:
    """The rounds a 40-round run (evaluated every 10) leaves in its registry when it stops after
    ``rounds_done``, as --dp-target-epsilon stops one."""
    config = CoordinatorConfig(
        workers={"alice": "ws://127.0.0.1:1"},
        evaluator={},
        training_rounds=40,
        eval_every=10,
        registry=tmp_path / "registry",
        **settings,  # type: ignore[arg-type]
    )
    journal = Journal(config, make_strategy("fedavg"), report=lambda _: None, listeners=())
    result, _ = journal.initial_state("digits-cnn", Info("alice", "trainer", "digits", (1, 8, 8), 10, (1,) * 10, ()))

    async def rounds() -> None:
        for round_number in range(1, rounds_done + 1):
            await journal.version_done(round_number, result)
        await journal.finish(result)

    asyncio.run(rounds())
    return [version.round for version in ModelRegistry(tmp_path / "registry").versions()]


def test_a_run_records_its_evaluated_rounds_and_its_final_model(tmp_path: Path) -> None:
    assert journal_run(tmp_path / "full", 40) == [1, 11, 21, 31, 40]
    assert journal_run(tmp_path / "stopped", 14) == [1, 11, 14]
    assert journal_run(tmp_path / "every", 4, registry_every_round=True) == [1, 2, 3, 4]


# Headline metric and prune


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"accuracy", "loss", "auc", "balanced_accuracy"}, ("auc", False)),  # binary: accuracy is there too
        ({"mae", "rmse", "loss"}, ("mae", True)),
        ({"accuracy", "loss", "f1_macro"}, ("accuracy", False)),
        ({"site_accuracy", "site_loss"}, ("site_accuracy", False)),  # federated evaluation only
        ({"loss", "my_score"}, ("loss", True)),
        (set(), None),
    ],
)
def test_the_headline_metric_is_the_tasks(names: set[str], expected: tuple[str, bool] | None) -> None:
    def version(metrics: dict[str, float]) -> ModelVersion:
        return ModelVersion("a" * 64, "run", 1, "digits-cnn", "", (), {}, {}, metrics, "b" * 64, Path("w"))

    versions = [version(dict.fromkeys(names, 0.5)), version({"auc": math.nan})]  # a NaN decides nothing
    assert headline_metric(versions) == expected


@pytest.mark.parametrize(
    ("keep_last", "keep_best", "alpha", "beta"),
    [
        (1, 0, [5], [4]),
        (0, 1, [2], [1]),  # alpha's highest accuracy, beta's lowest MAE
        (2, 2, [2, 4, 5], [1, 3, 4]),
        (9, 0, [1, 2, 3, 4, 5], [1, 2, 3, 4]),
        (0, 0, [], []),
    ],
)
def test_prune_keeps_the_last_and_the_best_of_each_run(
    registry: ModelRegistry, keep_last: int, keep_best: int, alpha: list[int], beta: list[int]
) -> None:
    plans = prune_plan(registry.versions(), keep_last=keep_last, keep_best=keep_best)
    assert [plan.run_id for plan in plans] == ["alpha", "beta"]
    assert [[version.round for version in plan.keep] for plan in plans] == [alpha, beta]
    every = {"alpha": range(1, 6), "beta": range(1, 5)}
    for plan, kept in zip(plans, [alpha, beta], strict=True):
        assert [version.round for version in plan.remove] == [
            round for round in every[plan.run_id] if round not in kept
        ]
    assert [plan.metric for plan in plans] == (["accuracy", "mae"] if keep_best else [None, None])
    with pytest.raises(ConfigError, match=r"^--keep-last -1 must be an integer of at least 0$"):
        prune_plan(registry.versions(), keep_last=-1)


def test_a_run_without_a_metric_keeps_its_last_rounds_under_keep_best() -> None:
    def version(round_number: int) -> ModelVersion:
        return ModelVersion(
            f"{round_number:064x}", "quiet", round_number, "digits-cnn", "", (), {}, {}, {}, "b" * 64, Path("w")
        )

    (plan,) = prune_plan([version(number) for number in (1, 2, 3)], keep_best=2)
    assert plan.metric is None
    assert [v.round for v in plan.keep] == [2, 3] and [v.round for v in plan.remove] == [1]


def files(registry: ModelRegistry) -> dict[Path, int]:
    return {path: path.stat().st_size for path in (registry.directory / "weights").iterdir()}


def test_prune_lists_by_default_removes_with_yes_and_frees_the_files(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files(registry)
    kept = {"alpha": [2, 5], "beta": [1, 4]}  # alpha:5 and beta:4 share one file, which stays
    gone = {registry.get(f"{run}:{round}").path for run, round in [("alpha", 1), ("alpha", 3), ("alpha", 4)]}
    gone |= {registry.get(f"beta:{round}").path for round in (2, 3)}
    freed = sum(before[path] for path in gone)
    lines = [
        "run alpha: {} rounds 2, 5 (last 1, best 1 by accuracy), {} 3 of 5",
        "run beta: {} rounds 1, 4 (last 1, best 1 by mae), {} 2 of 4",
    ]

    code, out, err = cli(registry, capsys, "prune", "--keep-last", "1", "--keep-best", "1")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        *(line.format("keeps", "removes") for line in lines),
        f"would free {size(freed)}; pass --yes to remove them",
    ]
    assert len(registry.versions()) == 9 and files(registry) == before

    code, out, err = cli(registry, capsys, "prune", "--keep-last", "1", "--keep-best", "1", "--yes")
    assert (code, err) == (0, "")
    assert out.splitlines() == [*(line.format("kept", "removed") for line in lines), f"freed {size(freed)}"]
    assert {run: [v.round for v in registry.versions(run)] for run in kept} == kept
    assert files(registry) == {path: before[path] for path in before.keys() - gone}
    assert registry.load_weights("beta:4")["w"][0, 0] == 5.0  # the shared file is intact

    assert registry.delete([registry.get("beta:4")]) == 0  # alpha:5 still uses its file
    assert registry.delete([registry.get("alpha:5")]) == before[registry.get("alpha:2").path]  # same size: one shape


def test_prune_needs_a_count(registry: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(registry, capsys, "prune") == (
        2,
        "",
        "python -m syncfed models: error: prune needs --keep-last N, --keep-best N or both:"
        " it keeps only what they name\n",
    )
    assert len(registry.versions()) == 9


# du


def test_du_figures_are_the_files_sizes(registry: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    stray = registry.directory / "weights" / f"{'0' * 64}.safetensors"  # a write cut short leaves one
    stray.write_bytes(b"x" * 1000)
    usage = disk_usage(registry)
    everything = sum(path.stat().st_size for path in registry.directory.rglob("*") if path.is_file())
    assert usage.total == everything
    alpha = sum(path.stat().st_size for path in {v.path for v in registry.versions("alpha")})
    beta = sum(
        path.stat().st_size
        for path in {v.path for v in registry.versions("beta")} - {v.path for v in registry.versions("alpha")}
    )
    assert dict(usage.runs) == {"alpha": (5, alpha), "beta": (4, beta)}  # the shared file counts under alpha
    assert usage.unreferenced == 1000

    code, out, err = cli(registry, capsys, "du")
    assert (code, err) == (0, "")
    assert [line.split() for line in out.splitlines()] == [
        ["RUN", "VERSIONS", "SIZE"],
        ["alpha", "5", *size(alpha).split()],
        ["beta", "4", *size(beta).split()],
        ["weights", "no", "version", "uses", "1000", "B"],
        ["database", *size(usage.database).split()],
        ["total", "9", *size(everything).split()],
    ]


# best


def test_best_prints_one_line_and_the_record_with_json(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    best = registry.get("alpha:2")
    assert cli(registry, capsys, "best", "accuracy") == (
        0,
        f"{best.id[:12]} (run alpha, round 2): accuracy=0.9\n",
        "",
    )
    lowest = registry.get("beta:1")
    assert cli(registry, capsys, "best", "mae", "--lowest")[1] == f"{lowest.id[:12]} (run beta, round 1): mae=1\n"

    registry.add_metrics("alpha", 2, {"f1_macro": math.nan})
    code, out, _ = cli(registry, capsys, "best", "accuracy", "--json")
    assert code == 0 and len(out.splitlines()) == 1
    assert json.loads(out) == {
        "id": best.id,
        "run": "alpha",
        "round": 2,
        "model": "digits-cnn",
        "created": best.created,
        "participants": ["alice"],
        "strategy": {"name": "fedavg"},
        "settings": {"input_shape": [1, 8, 8]},
        "metrics": {"accuracy": 0.9, "f1_macro": None, "loss": pytest.approx(0.1)},
        "hash": best.hash,
        "weights": str(best.path),
    }


# export's format


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("m.onnx", None, "onnx"),
        ("M.ONNX", "onnx", "onnx"),
        ("m.safetensors", None, "safetensors"),
        ("model", None, "safetensors"),
        ("model.bin", "onnx", "onnx"),
    ],
)
def test_the_extension_picks_the_export_format(name: str, given: str | None, expected: str) -> None:
    assert export_format(Path(name), given) == expected


@pytest.mark.parametrize(
    ("name", "given", "message"),
    [
        ("m.onnx", "safetensors", "export format safetensors does not match m.onnx, which names onnx"),
        ("m.safetensors", "onnx", "export format onnx does not match m.safetensors, which names safetensors"),
        (
            "m.pt",
            None,
            "m.pt names a torch pickle, which syncfed does not write: name it .safetensors"
            " (safetensors.torch.load_file reads it for load_state_dict) or .onnx",
        ),
    ],
)
def test_a_format_the_file_name_contradicts_is_refused(
    registry: ModelRegistry,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    given: str | None,
    message: str,
) -> None:
    flags = ["--format", given] if given else []
    assert cli(registry, capsys, "export", "alpha:1", str(tmp_path / name), *flags) == (
        2,
        "",
        f"python -m syncfed models: error: {message}\n",
    )
    assert not (tmp_path / name).exists()
