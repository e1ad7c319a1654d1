"""A job file is checked as the coordinator's --config is, with workers by id and the service's keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncfed.cli.serve import JOB_FLAGS
from syncfed.config import DIAL_IN
from syncfed.coordinator.job_file import SERVICE_KEYS, read_job
from syncfed.exceptions import ConfigError

KNOWN = ("alice", "bob", "testing")
GOOD = 'name = "demo"\nworkers = ["alice", "bob"]\nevaluator = "testing"\ntraining-rounds = 5\nlr = 0.05\n'


def test_a_job_becomes_a_run_over_dial_in_workers_with_the_services_files(tmp_path: Path) -> None:
    job = read_job(GOOD, known=KNOWN, folder=tmp_path, flags=JOB_FLAGS)
    assert (job.name, job.workers, job.evaluator, job.rounds) == ("demo", ("alice", "bob"), "testing", 5)
    config = job.config(
        listen="127.0.0.1:0",
        insecure_listen=True,
        metrics_out=tmp_path / "m.jsonl",
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert config.workers == {"alice": DIAL_IN, "bob": DIAL_IN} and config.evaluator == {"testing": DIAL_IN}
    assert (config.lr, config.training_rounds, config.metrics_out, config.resume) == (
        0.05,
        5,
        tmp_path / "m.jsonl",
        True,
    )
    assert config.batch_size == 32  # the coordinator's defaults for what the job leaves out


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('workers = ["alice"]\nlearning-rate = 0.1', "job file: key 'learning-rate': not a setting of a job"),
        ('workers = ["alice"]\ntraining-rounds = "many"', "job file: key 'training-rounds': invalid int value: 'many'"),
        ('workers = ["alice"]\nstrategy = 3', "job file: key 'strategy': expected a string, not 3"),
        (
            'workers = ["alice"]\nsave-model = "x.safetensors"',
            "job file: key 'save-model' is set by the service, not by a job",
        ),
        ('workers = ["alice"]\nlisten = "0.0.0.0:1"', "job file: key 'listen' is set by the service, not by a job"),
        (
            'workers = ["alice"]\nrequest-timeout = 600',
            "job file: key 'request-timeout' is set by the service, not by a job",
        ),
        ('workers = ["alice", "dave"]', "job file: worker 'dave' is not one of the service's (alice, bob, testing)"),
        (
            'workers = "alice,bob"',
            "job file: key 'workers': expected a list of worker ids such as ['alice', 'bob'], not 'alice,bob'",
        ),
        ("lr = 0.1", "job file: key 'workers': expected a list of worker ids such as ['alice', 'bob'], not None"),
        ('workers = ["alice", "alice"]', "job file: key 'workers': ['alice', 'alice'] names a worker twice"),
        ('workers = ["alice"]\nevaluator = "alice"', "job file: worker alice cannot both train and evaluate"),
        (
            'workers = ["alice"]\nevaluator = ["testing"]',
            "job file: key 'evaluator': expected a worker id, not ['testing']",
        ),
        ('workers = ["alice"\n', "job file: invalid TOML: "),
    ],
)
def test_a_bad_job_file_is_refused_in_one_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_job(text, known=KNOWN, folder=tmp_path, flags=JOB_FLAGS)
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_settings_that_do_not_make_a_run_are_refused_naming_the_job_file(tmp_path: Path) -> None:
    job = read_job('workers = ["alice"]\ntraining-rounds = 0', known=KNOWN, folder=tmp_path, flags=JOB_FLAGS)
    with pytest.raises(ConfigError, match="^job file: training_rounds must be at least 1, not 0$"):
        job.config(listen="127.0.0.1:0", insecure_listen=True)


def test_every_key_the_service_sets_is_a_flag_of_the_coordinator() -> None:
    from syncfed.cli.coordinator import build_parser

    dests = {action.dest for action in build_parser()._actions}
    assert SERVICE_KEYS <= dests


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            'name = "a\\n2025-01-01 00:00:00 Done: accuracy 0.99"',
            "job file: key 'name': 'a\\n2025-01-01 00:00:00 Done: accuracy 0.99' has a character that is not printable",
        ),
        ('name = "\\u001b[2Jwiped"', "job file: key 'name': '\\x1b[2Jwiped' has a character that is not printable"),
        (
            'strategy = "this:x"',
            "job file: key 'strategy': import path 'this:x' is not one the service allows (allow-imports: mine.s:S)",
        ),
        (
            'aggregation = "this:x"',
            "job file: key 'strategy': import path 'this:x' is not one the service allows (allow-imports: mine.s:S)",
        ),
        ('task = "os:system"', "job file: key 'task': import path 'os:system' is not one the service allows"),
        ('model = "this:x"', "job file: key 'model': import path 'this:x' is not one the service allows"),
        ('initial-weights = "/etc/passwd"', "job file: key 'initial-weights': /etc/passwd is not in the service's"),
        ('initial-weights = "../m.safetensors"', "job file: key 'initial-weights': "),
    ],
)
def test_a_job_may_not_forge_lines_import_code_or_read_files_of_its_choosing(
    tmp_path: Path, text: str, error: str
) -> None:
    state = tmp_path / "state"
    with pytest.raises(ConfigError) as caught:
        read_job(f'workers = ["alice"]\n{text}', known=KNOWN, folder=state, flags=JOB_FLAGS, allow_imports=["mine.s:S"])
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_allowed_import_paths_and_weights_in_the_state_folder_pass(tmp_path: Path) -> None:
    text = 'workers = ["alice"]\nstrategy = "mine.s:S"\nname = "ünïcode ok"\ninitial-weights = "registry/m.safetensors"'
    job = read_job(text, known=KNOWN, folder=tmp_path, flags=JOB_FLAGS, allow_imports=["mine.s:S"])
    assert (job.name, job.args.strategy, job.args.initial_weights) == (
        "ünïcode ok",
        "mine.s:S",
        tmp_path / "registry" / "m.safetensors",
    )
