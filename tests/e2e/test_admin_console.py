"""The admin console against the admin API over real HTTPS on 127.0.0.1, with certificates from ``provision``.

The API serves a :class:`FakeService` in an event loop on a background
thread; the console runs in the test's thread through its ``main(argv)``,
as ``python -m syncfed admin`` would. Each test reads back what the audit
log says about it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_admin_service import FakeService, weights
from safetensors.numpy import load_file
from units import MS

from syncfed.__main__ import main as syncfed_main
from syncfed.audit import AuditLog, read_audit
from syncfed.cli import admin
from syncfed.exceptions import ConfigError
from syncfed.net.admin_api import AdminAPI, start_admin_api
from syncfed.net.web import https_tls
from syncfed.provision import Admin, Participant, Project, provision

TIMEOUT = 10_000 * MS
ADMIN = "ops@hospital-a.org"
VIEWER = "audit@hospital-b.org"


@dataclass
class Federation:
    api: AdminAPI
    service: FakeService
    audit: Path
    kits: dict[str, Path]
    foreign: dict[str, Path]
    loop: asyncio.AbstractEventLoop
    folder: Path

    def config(self, kit: str, *, kits: dict[str, Path] | None = None, ca: str | None = None) -> Path:
        """An admin.toml pointing at this API with the certificate of ``kit`` (of ``kits``) and the CA of ``ca``."""
        folder = (kits or self.kits)[kit]
        path = self.folder / f"{kit}-{id(kits)}-{ca}.toml"
        path.write_text(
            f'server = "{self.api.url}"\n'
            f'tls-cert = "{folder / f"{kit}.crt"}"\ntls-key = "{folder / f"{kit}.key"}"\n'
            f'tls-ca = "{self.kits[ca] / "ca.crt" if ca else folder / "ca.crt"}"\n',
            encoding="utf-8",
        )
        return path

    def entries(self) -> list[dict[str, Any]]:
        return read_audit(self.audit)


def request(federation: Federation, kit: str, method: str, path: str) -> tuple[int, str]:
    """A raw HTTPS request to the API with ``kit``'s certificate: its status and its error line (or body)."""
    folder = federation.kits[kit]
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(folder / f"{kit}.crt", folder / f"{kit}.key")
    host, port = federation.api.address
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    return response.status, body["error"] if isinstance(body, dict) and "error" in body else body


def project(name: str) -> Project:
    return Project(
        name,
        "coordinator",
        (Participant("alice", dial_out=True),),
        coordinator_hosts=("127.0.0.1",),
        admins=(Admin(ADMIN, "project-admin"), Admin(VIEWER, "viewer")),
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    folder = tmp_path_factory.mktemp("admin")
    kits = provision(project("consortium"), folder / "startup")
    foreign = provision(project("elsewhere"), folder / "foreign")
    service = FakeService(folder)
    audit = folder / "audit.jsonl"
    coordinator = kits["coordinator"]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    tls = https_tls(
        coordinator / "coordinator.crt",
        coordinator / "coordinator.key",
        coordinator / "ca.crt",
        require_certificate=True,
    )
    started = asyncio.run_coroutine_threadsafe(
        start_admin_api(service, host="127.0.0.1", port=0, tls=tls, audit=AuditLog(audit), max_body=1024), loop
    )
    api = started.result(TIMEOUT)
    try:
        yield Federation(api, service, audit, kits, foreign, loop, folder)
    finally:
        asyncio.run_coroutine_threadsafe(api.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def console(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    """Run ``python -m syncfed admin --config CONFIG ARGV`` in this process: exit status, output, errors."""
    status = syncfed_main(["admin", "--config", str(config), *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_project_admin_submits_and_aborts_and_the_audit_log_says_so(
    federation: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('name = "digits"\nrounds = 5\n', encoding="utf-8")
    config = federation.config(ADMIN)
    status, out, err = console(capsys, config, "submit", str(job))
    assert (status, err) == (0, "")
    job_id = out.split()[2]
    assert out == f"submitted job {job_id} (digits): queued\n"
    assert federation.service.records[job_id]["submitted_by"] == ADMIN
    assert console(capsys, config, "abort", job_id) == (0, f"job {job_id}: aborted\n", "")
    status, out, err = console(capsys, config, "status", job_id)
    assert status == 0
    assert f"reason     aborted by {ADMIN}" in out.splitlines()
    attempted, submitted, abort_attempted, aborted, looked = federation.entries()[-5:]
    # A submit and an abort are on record before they are carried out.
    assert (attempted["action"], attempted["result"], abort_attempted["action"], abort_attempted["result"]) == (
        "submit",
        "attempt",
        "abort",
        "attempt",
    )
    assert submitted | {"time": 0} == {
        "time": 0,
        "who": ADMIN,
        "role": "project-admin",
        "action": "submit",
        "target": "",
        "result": "ok",
        "job": job_id,
    }
    assert (aborted["action"], aborted["target"], aborted["result"], aborted["state"]) == (
        "abort",
        job_id,
        "ok",
        "aborted",
    )
    assert (looked["action"], looked["result"]) == ("status", "ok")
    # Aborting it again is refused by the service: one line, the state conflict's exit status.
    status, out, err = console(capsys, config, "abort", job_id)
    assert (status, out) == (1, "")
    assert err == f"python -m syncfed admin: error: job {job_id} has finished (aborted): nothing to abort\n"
    assert federation.entries()[-1]["result"] == f"error: job {job_id} has finished (aborted): nothing to abort"


def test_a_viewer_reads_but_may_neither_abort_nor_submit(
    federation: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    running = federation.service.add("long", "running", refusals={"carol": "requires --secure-agg"})
    failed = federation.service.add("wordy", "failed", reason="0 of 3 training workers accepted the job " + "x" * 80)
    config = federation.config(VIEWER)
    status, out, err = console(capsys, config, "jobs")
    assert (status, err) == (0, "")
    wordy = next(line for line in out.splitlines() if line.split()[:2] == [failed["id"], "wordy"])
    assert wordy.endswith("0 of 3 training workers accepted the job " + "x" * 18 + "…")  # status has it whole
    assert out.splitlines()[0].split() == ["id", "name", "state", "round", "workers", "submitted", "by", "reason"]
    assert any(line.split()[:4] == [running["id"], "long", "running", "0/3"] for line in out.splitlines())
    status, out, err = console(capsys, config, "abort", running["id"])
    assert (status, out, err) == (10, "", f"python -m syncfed admin: error: viewer {VIEWER} may not abort\n")
    assert federation.service.records[running["id"]]["state"] == "running"
    job = tmp_path / "job.toml"
    job.write_text('name = "sneaky"\n', encoding="utf-8")
    status, out, err = console(capsys, config, "submit", str(job))
    assert (status, err) == (10, f"python -m syncfed admin: error: viewer {VIEWER} may not submit\n")
    assert all(record["name"] != "sneaky" for record in federation.service.records.values())
    read, denied_abort, denied_submit = federation.entries()[-3:]
    assert (read["who"], read["role"], read["action"], read["result"]) == (VIEWER, "viewer", "jobs", "ok")
    assert (denied_abort["action"], denied_abort["target"], denied_abort["result"]) == (
        "abort",
        running["id"],
        "denied",
    )
    assert (denied_submit["who"], denied_submit["action"], denied_submit["result"]) == (VIEWER, "submit", "denied")
    # The status shows the site's refusal and its reason.
    status, out, err = console(capsys, config, "status", running["id"])
    assert status == 0
    assert "refused by  carol: requires --secure-agg" in out.splitlines()


def test_a_certificate_of_another_ca_is_refused_before_any_request(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(federation.entries())
    # The foreign admin trusts our CA, so only the service can refuse: its certificate is signed by another.
    status, out, err = console(capsys, federation.config(ADMIN, kits=federation.foreign, ca="coordinator"), "jobs")
    assert (status, out) == (10, "")
    # TLS 1.3: the service checks the client's certificate after the client's handshake ended, and hangs up.
    assert err == (
        f"python -m syncfed admin: error: TLS failure with {federation.api.url}: it closed the connection without"
        " an answer (does it accept this admin certificate?)\n"
    )
    # And a console that trusts only its own CA refuses the service's certificate.
    status, out, err = console(capsys, federation.config(ADMIN, kits=federation.foreign), "jobs")
    assert (status, out) == (10, "")
    assert err == (
        f"python -m syncfed admin: error: TLS failure with {federation.api.url}: its certificate does not verify"
        " against the --tls-ca: self-signed certificate in certificate chain\n"
    )
    assert len(federation.entries()) == before


def test_a_worker_certificate_names_no_role_and_is_refused(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = console(capsys, federation.config("alice"), "workers")
    assert (status, out) == (10, "")
    assert err == "python -m syncfed admin: error: the certificate of 'alice' names no admin role\n"
    entry = federation.entries()[-1]
    assert (entry["who"], entry["role"], entry["action"], entry["result"]) == ("alice", "", "workers", "denied")


@pytest.mark.parametrize(
    ("text", "message", "code"),
    [
        ('name = "x"\nepochs = 3\n', "job: unknown key 'epochs'", 2),
        ('rounds = "many"\n', "job: key 'rounds': expected int, not 'many'", 2),
        ("name = '" + "x" * 2000 + "'\n", "job text of 2010 bytes exceeds limit of 1024 bytes", 2),
    ],
)
def test_a_bad_job_is_one_line_naming_what_is_wrong(
    federation: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str, code: int
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text, encoding="utf-8")
    status, out, err = console(capsys, federation.config(ADMIN), "submit", str(job))
    assert (status, out, err) == (code, "", f"python -m syncfed admin: error: {message}\n")
    assert federation.entries()[-1]["result"] == f"error: {message}"


def test_download_writes_the_model_of_the_round_asked_for(
    federation: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    done = federation.service.add("finished", "done")
    config = federation.config(VIEWER)
    output = tmp_path / "model.safetensors"
    status, out, err = console(capsys, config, "download", done["id"], "--round", "2", "-o", str(output))
    assert (status, err) == (0, "")
    assert out == f"wrote {output} ({output.stat().st_size} bytes)\n"
    np.testing.assert_array_equal(load_file(str(output))["fc.weight"], weights(2)["fc.weight"])
    assert federation.entries()[-1] | {"time": 0} == {
        "time": 0,
        "who": VIEWER,
        "role": "viewer",
        "action": "download",
        "target": done["id"],
        "result": "ok",
        "round": 2,
        "bytes": output.stat().st_size,
    }
    # A round that was not kept: one line, and the file is left as it was.
    status, out, err = console(capsys, config, "download", done["id"], "--round", "9", "-o", str(output))
    assert (status, err) == (1, f"python -m syncfed admin: error: job {done['id']} kept no model of round 9\n")
    np.testing.assert_array_equal(load_file(str(output))["fc.weight"], weights(2)["fc.weight"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]


def test_logs_follow_ends_when_the_job_finishes(federation: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    running = federation.service.add("followed", "running")
    status, out, err = console(
        capsys, federation.config(VIEWER), "logs", running["id"], "--follow", "--interval", "0.01"
    )
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"{running['id']} submitted",
        "round 1 done",
        "round 2 done",
        "round 3 done",
        "job done",
    ]
    assert federation.service.records[running["id"]]["state"] == "done"


def test_workers_metrics_and_json(federation: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    config = federation.config(VIEWER)
    status, out, err = console(capsys, config, "workers")
    assert (status, err) == (0, "")
    rows = out.splitlines()
    assert rows[0].split()[:2] == ["id", "role"]
    assert rows[1].split()[:2] == ["alice", "trainer"] and "digits train: 449 examples" in rows[1]
    assert "not connected" in rows[2] and "never" in rows[2]
    status, out, err = console(capsys, config, "workers", "--json")
    assert [record["id"] for record in json.loads(out)] == ["alice", "bob"]
    done = federation.service.add("measured", "done")
    status, out, err = console(capsys, config, "metrics", done["id"])
    assert (status, err) == (0, "")
    assert [line.split() for line in out.splitlines()] == [
        ["round", "seconds", "workers", "failed", "accuracy", "loss"],
        ["1", "0.50", "2", "0", "0.9000", "0.3000"],
    ]


def test_errors_of_the_service_are_one_line_without_its_details(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    config = federation.config(VIEWER)
    assert console(capsys, config, "status", "job-999") == (1, "", "python -m syncfed admin: error: no job 'job-999'\n")
    broken = federation.service.add("broken", "done")
    status, out, err = console(capsys, config, "metrics", broken["id"])
    assert (status, out) == (1, "")
    assert err == "python -m syncfed admin: error: internal error; the service's log has the details\n"
    assert federation.entries()[-1]["result"] == "error: internal error"


def test_a_service_that_is_down_is_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kit = tmp_path / "kit"
    kits = provision(project("down"), kit)
    config = kits[ADMIN] / "admin.toml"
    config.write_text(config.read_text().replace("https://127.0.0.1:8443", f"https://127.0.0.1:{port}"))
    status = admin.main(["--config", str(config), "jobs"])
    assert (status, capsys.readouterr().err) == (
        1,
        f"python -m syncfed admin: error: cannot reach https://127.0.0.1:{port}: connection refused\n",
    )


def test_the_api_will_not_serve_without_client_certificates(federation: Federation) -> None:
    coordinator = federation.kits["coordinator"]
    tls = https_tls(
        coordinator / "coordinator.crt",
        coordinator / "coordinator.key",
        coordinator / "ca.crt",
        require_certificate=False,
    )
    started = start_admin_api(federation.service, host="127.0.0.1", port=0, tls=tls, audit=AuditLog(federation.audit))
    with pytest.raises(ConfigError, match=r"^the admin API's TLS context must require client certificates"):
        asyncio.run(started)


def test_every_request_is_audited_and_no_value_splits_an_audit_line(federation: Federation) -> None:
    assert request(federation, VIEWER, "DELETE", "/v1/jobs/1") == (405, "method not allowed")
    assert request(federation, VIEWER, "GET", "/v2/nothing") == (404, "not found")
    assert request(federation, VIEWER, "GET", "/v1/jobs/%E2%80%A8") == (404, "no job '\\u2028'")
    unknown_method, unknown_path, separator = federation.entries()[-3:]  # the log still reads, line by line
    assert (unknown_method["who"], unknown_method["action"], unknown_method["target"], unknown_method["result"]) == (
        VIEWER,
        "unknown",
        "DELETE /v1/jobs/1",
        "error: method not allowed",
    )
    assert (unknown_path["target"], unknown_path["result"]) == ("GET /v2/nothing", "error: not found")
    assert (separator["action"], separator["target"]) == ("status", "\u2028")
    assert b"\\u2028" in federation.audit.read_bytes() and federation.audit.read_bytes().isascii()


@pytest.mark.parametrize("number", ["01", "%D9%A1", "%C2%B2", "-1", "1" * 19, ""])
def test_numbers_are_taken_in_one_canonical_form_only(federation: Federation, number: str) -> None:
    done = federation.service.add("numbered", "done")
    for query in ("logs?since", "model?round"):
        status, error = request(federation, VIEWER, "GET", f"/v1/jobs/{done['id']}/{query}={number}")
        assert status == 400 and error.endswith("is not a whole number from 0 on"), (query, status, error)


def test_an_action_whose_attempt_cannot_be_audited_is_not_carried_out(
    federation: Federation, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    tls = https_tls(
        *(federation.kits["coordinator"] / name for name in ("coordinator.crt", "coordinator.key", "ca.crt")),
        require_certificate=True,
    )
    started = start_admin_api(federation.service, host="127.0.0.1", port=0, tls=tls, audit=AuditLog(audit))
    api = asyncio.run_coroutine_threadsafe(started, federation.loop).result(TIMEOUT)
    try:
        audit.unlink()
        audit.mkdir()  # no line can be appended to it now
        running = federation.service.add("kept", "running")
        broken = Federation(api, federation.service, audit, federation.kits, {}, federation.loop, federation.folder)
        assert request(broken, ADMIN, "POST", f"/v1/jobs/{running['id']}/abort") == (
            500,
            "the audit log cannot be written",
        )
        assert federation.service.records[running["id"]]["state"] == "running"
        assert request(broken, VIEWER, "GET", "/v1/jobs") == (500, "the audit log cannot be written")
    finally:
        asyncio.run_coroutine_threadsafe(api.close(), federation.loop).result(TIMEOUT)
