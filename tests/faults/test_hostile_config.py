"""Issue 14, item 9: config files are checked as flags are, lr_decay is bounded, registry rows cannot pick code.

Every key of both command-line tools is fed a value of the wrong kind from a
TOML file (in process, through the same ``parse_arguments`` the tools use);
the issue's own cases then run the real tools as subprocesses. Registry rows
are edited in SQLite directly, as an attacker with the file would.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import given
from hypothesis import strategies as st
from units import MS

from syncfed.cli import coordinator as client
from syncfed.cli import worker as server
from syncfed.cli.common import parse_arguments
from syncfed.config import CoordinatorConfig
from syncfed.exceptions import CheckpointError, ConfigError
from syncfed.models import DigitsCNN, get_weights
from syncfed.registry import DATABASE_FILE, ModelRegistry

PARSERS = {"server": server.build_parser, "client": client.build_parser}


def keys(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    return [
        (action.option_strings[0].lstrip("-").replace("-", "_"), action)
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "config")
    ]


def wrong_values(action: argparse.Action) -> list[str]:
    """TOML values the key's flag would refuse."""
    if action.nargs == 0:
        return ['"yes"', "1", "{ a = 1 }"]
    values = ["{ a = 1 }", "[[1]]" if isinstance(action, argparse._AppendAction) else "[1]"]
    if action.type in (int, float) or action.type is not None and action.type.__name__ == "size":
        values.append("true")
    if action.type is int:
        values.append("1.5")
    if action.type in (None, str, Path):
        values.append("5")
    if action.choices is not None:
        values.append('"no-such-choice"')
    return values


CASES = [
    pytest.param(name, key, value, id=f"{name}-{key}-{value}")
    for name, build in PARSERS.items()
    for key, action in keys(build())
    for value in wrong_values(action)
]


@pytest.mark.parametrize(("program", "key", "value"), CASES)
def test_every_key_refuses_what_its_flag_would(program: str, key: str, value: str, tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        parse_arguments(
            PARSERS[program](), ["--config", str(path), "--id", "a"] if program == "server" else ["--config", str(path)]
        )
    assert str(info.value).startswith(f"config file {path}: key {key!r}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("program", "text", "flags"),
    [
        (
            "server",
            'port = 8000\nshard_seed = "7"\nno_download = true\nmodel = ["a:B", "c:D"]',
            ["--port", "8000", "--shard-seed", "7", "--no-download", "--model", "a:B", "--model", "c:D"],
        ),
        (
            "server",
            'max_message_size = "2MiB"\nval_fraction = 0\nslowdown = 0.5\ncuda = false',
            ["--max-message-size", "2MiB", "--val-fraction", "0", "--batch-delay", "0.5"],
        ),
        (
            "client",
            'lr = 1\nmu = 0.5\naggregation = "fedprox"\ncompress = "fp16"\nsecure_agg = true',
            ["--lr", "1", "--mu", "0.5", "--strategy", "fedprox", "--compress", "fp16", "--secure-agg"],
        ),
    ],
)
def test_a_valid_file_reads_as_the_same_flags(program: str, text: str, flags: list[str], tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(text + "\n")
    extra = ["--id", "a"] if program == "server" else []
    from_file = parse_arguments(PARSERS[program](), ["--config", str(path), *extra])
    from_flags = parse_arguments(PARSERS[program](), [*flags, *extra])
    assert vars(from_file) | {"config": None} == vars(from_flags) | {"config": None}


def cli(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script, *arguments], cwd=REPO, capture_output=True, text=True, timeout=120_000 * MS
    )


@pytest.mark.parametrize(
    ("script", "text", "line"),
    [
        ("run_websocket_server.py", "port = 1.5", "key 'port': invalid int value: 1.5"),
        ("run_websocket_server.py", "testing = 1", "key 'testing': expected true or false, not 1"),
        ("run_websocket_client.py", "workers = 5", "key 'workers': expected a string, not 5"),
        ("run_websocket_client.py", "no_such_setting = 1", "key 'no_such_setting': not a setting of"),
        ("run_websocket_client.py", 'spawn_workers = "true"', "key 'spawn_workers': expected true or false"),
        ("run_websocket_client.py", "training_rounds = 2.0", "key 'training_rounds': invalid int value: 2.0"),
    ],
)
def test_the_tools_refuse_a_bad_config_value_with_one_line_and_exit_2(
    script: str, text: str, line: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    done = cli(script, "--config", str(path), "--id", "a") if "server" in script else cli(script, "--config", str(path))
    assert done.returncode == 2, done.stderr
    (only,) = done.stderr.splitlines()
    assert only.startswith(f"{script}: error: config file {path}: {line}"), only


def test_a_huge_lr_decay_is_refused_with_the_value_and_the_limit() -> None:
    with pytest.raises(ConfigError, match=r"^lr_decay 1e\+30 exceeds limit of 1.0: the rate decays or stays$"):
        CoordinatorConfig(lr_decay=1e30)
    done = cli("run_websocket_client.py", "--lr-decay", "1e30")
    assert done.returncode == 2 and done.stderr.strip().endswith(
        "lr_decay 1e+30 exceeds limit of 1.0: the rate decays or stays"
    )


@given(
    lr=st.floats(1e-300, 1e300),
    decay=st.floats(1e-300, 1.0),
    floor=st.floats(1e-300, 1e300),
    round_number=st.one_of(st.integers(1, 100), st.integers(1, 2**63)),
)
def test_the_learning_rate_is_finite_positive_and_never_above_lr(
    lr: float, decay: float, floor: float, round_number: int
) -> None:
    settings = CoordinatorConfig(lr=lr, lr_decay=decay, lr_min=floor)
    rate = settings.learning_rate(round_number)
    assert math.isfinite(rate) and 0 < rate <= lr
    assert rate >= min(floor, lr)


# The registry: rows that pick what code runs --------------------------------------------------

HOSTILE = """
from pathlib import Path
Path(__file__).with_name("imported").write_text("yes")
from user_models import TinyNet as Net
"""


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    (tmp_path / "hostile_model.py").write_text(HOSTILE)
    return ModelRegistry(tmp_path / "registry")


def models_cli(registry: ModelRegistry, *arguments: str) -> subprocess.CompletedProcess[str]:
    folder = registry.directory.parent
    path = os.pathsep.join([str(folder), str(REPO / "tests"), str(REPO)])
    return subprocess.run(
        [sys.executable, "-m", "syncfed", "models", "--registry", str(registry.directory), *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120_000 * MS,
        env={**os.environ, "PYTHONPATH": path},
    )


def record(registry: ModelRegistry, model: str) -> str:
    if model == "digits-cnn":
        weights = get_weights(DigitsCNN())
        shape = [1, 8, 8]
    else:
        from user_models import TinyNet

        weights, shape = get_weights(TinyNet()), [1, 8, 8]
    version = registry.record(
        run_id="run",
        round=1,
        model=model,
        weights=weights,
        participants=["a"],
        strategy={},
        settings={"input_shape": shape},
    )
    return version.id


def tamper(registry: ModelRegistry, column: str, value: str) -> None:
    with sqlite3.connect(registry.directory / DATABASE_FILE) as connection:
        connection.execute(f"UPDATE versions SET {column} = ?", (value,))


def test_a_row_whose_model_was_edited_is_refused_on_load(registry: ModelRegistry) -> None:
    version = record(registry, "digits-cnn")
    tamper(registry, "model", "mnist-cnn")
    with pytest.raises(CheckpointError, match=rf"^version {version[:12]} does not match its id: .* changed"):
        registry.load_weights(version)


def test_a_row_whose_settings_were_edited_is_refused_on_export(registry: ModelRegistry, tmp_path: Path) -> None:
    version = record(registry, "digits-cnn")
    tamper(registry, "settings", '{"input_shape": [1, 64, 64]}')
    with pytest.raises(CheckpointError, match="does not match its id"):
        registry.export(version, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_export_of_a_row_edited_to_name_a_module_imports_nothing(registry: ModelRegistry, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    version = record(registry, "digits-cnn")
    tamper(registry, "model", "hostile_model:Net")
    done = models_cli(registry, "export", version[:12], str(tmp_path / "out.onnx"), "--format", "onnx")
    assert done.returncode == 9, done.stderr
    assert "does not match its id" in done.stderr
    assert not (tmp_path / "imported").exists(), "the module named by the edited row was imported"


def test_export_imports_a_model_path_only_when_the_command_line_names_it(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    version = record(registry, "hostile_model:Net")
    done = models_cli(registry, "export", version[:12], str(tmp_path / "out.onnx"), "--format", "onnx")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"python -m syncfed models: error: version {version[:12]} names model 'hostile_model:Net', an import"
        " path: pass --model hostile_model:Net to import it"
    )
    assert not (tmp_path / "imported").exists()
    allowed = models_cli(
        registry, "export", version[:12], str(tmp_path / "out.onnx"), "--format", "onnx", "--model", "hostile_model:Net"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "imported").exists() and (tmp_path / "out.onnx").is_file()
