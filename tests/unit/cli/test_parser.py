"""Flag mistakes cost one line: the closest flag, a pointer to --help, and no abbreviations."""

from __future__ import annotations

import re

import pytest

from syncfed.cli import coordinator, worker
from syncfed.cli.common import Parser


def error_of(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)  # type: ignore[operator]
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_a_misspelt_flag_gets_one_line_with_the_closest_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(coordinator.main, ["--traning-rounds", "3"], capsys) == (
        "run_websocket_client.py: error: unrecognized arguments: --traning-rounds 3;"
        " did you mean --training-rounds? (see run_websocket_client.py --help)\n"
    )


def test_an_abbreviated_flag_is_refused_not_guessed(capsys: pytest.CaptureFixture[str]) -> None:
    error = error_of(coordinator.main, ["--spawn-worker"], capsys)
    assert error.startswith("run_websocket_client.py: error: unrecognized arguments: --spawn-worker;")
    assert "did you mean --spawn-workers?" in error
    assert error_of(worker.main, ["--id", "alice", "--max-message"], capsys).count("\n") == 1


def test_a_flag_far_from_every_other_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    error = error_of(worker.main, ["--id", "alice", "--zzzzzz"], capsys)
    assert "did you mean" not in error and error.endswith("(see run_websocket_server.py --help)\n")


def test_subcommands_share_the_rules() -> None:
    parser = Parser(prog="tool")
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("go")
    sub.add_argument("--rounds")
    assert isinstance(sub, Parser) and not sub.allow_abbrev
    with pytest.raises(SystemExit):
        parser.parse_args(["go", "--round", "3"])


#: The coordinator flags the README's first sections use: what a new user looks for first in --help.
README_COMMON_FLAGS = [
    "--training-rounds",
    "--model",
    "--workers",
    "--evaluator",
    "--spawn-workers",
    "--worker-args",
    "--site",
    "--save-model",
    "--metrics-out",
    "--config",
]


def test_help_opens_with_the_common_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        coordinator.main(["--help"])
    text = capsys.readouterr().out
    usage, *sections = text.split("\n\n")
    assert usage.count("\n") == 0, "the usage is one line, not every flag"
    headings = [section.split("\n", 1)[0] for section in sections]
    assert headings[1:3] == ["options:", "common options:"], headings
    first_group = sections[2]
    assert re.findall(r"^  (--[\w-]+)", first_group, flags=re.MULTILINE) == README_COMMON_FLAGS
