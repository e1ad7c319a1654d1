"""``python -m syncfed serve`` refuses bad settings and bad queued jobs in one line, before it listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncfed.__main__ import main
from syncfed.cli.common import parse_arguments
from syncfed.cli.serve import build_parser
from syncfed.provision import Admin, Participant, Project, provision

SERVER = 'listen = "127.0.0.1:0"\nstate = "state"\nworkers = ["alice", "testing"]\ninsecure-listen = true\n'


@pytest.mark.parametrize(
    ("server", "job", "error"),
    [
        (
            SERVER.replace('listen = "127.0.0.1:0"\n', ""),
            None,
            "the service needs --listen HOST:PORT for its workers to dial",
        ),
        (
            SERVER + "rounds = 3\n",
            None,
            "config file server.toml: key 'rounds': not a setting of python -m syncfed serve",
        ),
        (
            SERVER.replace("insecure-listen = true\n", ""),
            None,
            "--listen lets in only workers that prove their id: add",
        ),
        (
            SERVER.replace('workers = ["alice", "testing"]\n', ""),
            None,
            "the service needs the ids of the workers it lets in: give",
        ),
        (
            SERVER + 'admin = "127.0.0.1:0"\n',
            None,
            "--admin needs --tls-cert, --tls-key and --tls-ca: the service's kit from provision",
        ),
        (
            SERVER + 'dashboard = "127.0.0.1"\n',
            None,
            "--dashboard '127.0.0.1' must look like 0.0.0.0:8765",
        ),
        (
            SERVER + 'dashboard-token-file = "token"\n',
            None,
            "--dashboard-token-file goes with --dashboard HOST:PORT",
        ),
        (SERVER, 'workers = ["bob"]', "job.toml: job file: worker 'bob' is not one of the service's (alice, testing)"),
        (SERVER, 'workers = ["alice"]\nsave-model = "m.safetensors"', "job.toml: job file: key 'save-model' is set by"),
        (
            SERVER,
            'workers = ["alice"]\nstrategy = "this:x"',
            "job.toml: job file: key 'strategy': import path 'this:x' is not one the service allows"
            " (allow-imports: none)",
        ),
        (
            SERVER + 'allow-imports = ["mine.s:S"]\n',
            'workers = ["alice"]\ntask = "this:x"',
            "job.toml: job file: key 'task': import path 'this:x' is not one the service allows"
            " (allow-imports: mine.s:S)",
        ),
        (SERVER, 'workers = ["alice"]\nmin-workers = 5', "job.toml: job file: min_workers 5 is not between 1 and 1"),
    ],
)
def test_bad_settings_or_a_bad_queued_job_stop_the_service_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    server: str,
    job: str | None,
    error: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server.toml").write_text(server)
    (tmp_path / "job.toml").write_text(job or "")
    queue = ["--queue", "job.toml"] if job is not None else []
    assert main(["serve", "--config", "server.toml", *queue]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m syncfed serve: error: {error}"), lines


def test_provision_writes_the_service_a_server_toml_its_parser_takes(tmp_path: Path) -> None:
    project = Project(
        "clinics",
        "coordinator",
        (
            Participant("alice", dial_out=True),
            Participant("bob", hosts=("bob.example.org",)),
            Participant("testing", role="evaluator", dial_out=True),
        ),
        coordinator_hosts=("fl.example.org",),
        listen=443,
        admins=(Admin("ops@example.org", "project-admin"),),
    )
    kit = provision(project, tmp_path / "startup")["coordinator"]
    args = parse_arguments(build_parser(), ["--config", str(kit / "server.toml")])
    assert (args.listen, args.admin, args.workers) == ("0.0.0.0:443", "0.0.0.0:8443", ["alice", "testing"])
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (
        kit / "coordinator.crt",
        kit / "coordinator.key",
        kit / "ca.crt",
    )
    assert args.state == kit / "state"
