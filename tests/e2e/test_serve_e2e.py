"""The job service over real processes on 127.0.0.1, as docs/operations.md deploys it: kits from ``provision``.

Three dial-out trainers and a dial-out evaluator, each proving its id with
its certificate, join ``python -m syncfed serve`` started from the
coordinator's ``server.toml`` with the demo's 40-round digits job queued.
While it runs, a project admin submits a second job through the console
(charlie's site policy refuses it, so it runs on bob alone), and a viewer's
abort is refused. The service is SIGKILLed mid-job and started again: the
workers dial back by themselves, the job resumes from its checkpoint, every
round is once in its metrics file, and its final accuracy is the classic
demo's (a resumed run recomputes the round cut off as the uninterrupted run
did). Headless Chromium watches the dashboard of the restarted service; then
the second job runs, and ``status`` names the refusal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import chromium, curve_points, page_text, save_screenshot, wait_until, worker_rows
from conftest import REPO, STARTUP_TIMEOUT
from dashboard_kit import spki_pin
from test_dial_out_e2e import dialing
from units import MS

from syncfed.audit import read_audit
from syncfed.coordinator.job_store import JobStore
from syncfed.provision import Admin, Participant, Project, provision
from syncfed.service_api import FINISHED_STATES, JobRecord

IDS = ("alice", "bob", "charlie", "testing")
JOB_TIMEOUT = 300_000 * MS
CONSOLE_TIMEOUT = 60_000 * MS
POLL = 100 * MS
TOKEN = "dashboard-token-for-the-e2e-test"
CHARLIE_REFUSES = "min_other_sites: the job has 1 other sites, the policy needs at least 2"


def demo_accuracy() -> str:
    """The classic demo's final accuracy at round 40, as the README shows it."""
    found = re.search(r"Final federated accuracy at round 40: (\d+\.\d+)%", (REPO / "README.md").read_text())
    assert found is not None
    return found.group(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


def rounds_done(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [event["round"] for event in map(json.loads, metrics.read_text().splitlines()) if event["event"] == "round"]


@dataclass
class Served:
    folder: Path
    state: Path
    jobs: dict[str, JobRecord]
    console: dict[str, subprocess.CompletedProcess[str]]  # what each console call said
    dialers: dict[str, str]  # each worker's output
    page: dict[str, object]  # what the browser saw


def console(kit: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m syncfed admin`` as its own process, with the admin's kit."""
    command = [sys.executable, "-m", "syncfed", "admin", "--config", str(kit / "admin.toml"), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=CONSOLE_TIMEOUT, check=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("serve")
    listen, admin, dashboard = free_port(), free_port(), free_port()
    workers = (
        *(Participant(name, dial_out=True) for name in IDS[:3]),
        Participant("testing", role="evaluator", dial_out=True),
    )
    project = Project(
        "hospitals",
        "coordinator",
        workers,
        coordinator_hosts=("127.0.0.1",),
        listen=listen,
        admin_port=admin,
        admins=(Admin("ada@example.org", "project-admin"), Admin("grace@example.org", "viewer")),
    )
    kits = provision(project, folder / "startup")
    server = kits["coordinator"]
    state = server / "state"
    (folder / "token").write_text(TOKEN)
    (folder / "charlie-policy.toml").write_text("min_other_sites = 2\n")
    (folder / "demo.toml").write_text(
        'name = "demo"\nworkers = ["alice", "bob", "charlie"]\nevaluator = "testing"\neval-every = 2\n'
    )
    (folder / "short.toml").write_text(
        'name = "short"\nworkers = ["bob", "charlie"]\nevaluator = "testing"\ntraining-rounds = 3\nmin-workers = 1\n'
    )
    metrics = state / "jobs" / "1" / "metrics.jsonl"
    local = ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]  # the kit's say 0.0.0.0
    consoles = [*local, "--dashboard", f"127.0.0.1:{dashboard}", "--dashboard-token-file", str(folder / "token")]

    def start_service(*extra: str) -> subprocess.Popen[bytes]:
        log = (folder / "serve.out").open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "syncfed", "serve", "--config", str(server / "server.toml"), *consoles]
        return subprocess.Popen([*command, *extra], cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)

    plan = {name: ["--config", str(kits[name] / "worker.toml")] for name in IDS}
    plan["charlie"] += ["--policy", str(folder / "charlie-policy.toml")]
    said: dict[str, subprocess.CompletedProcess[str]] = {}
    page: dict[str, object] = {}
    service = start_service("--queue", str(folder / "demo.toml"))
    try:
        with dialing(folder, f"wss://127.0.0.1:{listen}", plan) as dialers:
            wait_for(lambda: len(rounds_done(metrics)) >= 4, JOB_TIMEOUT, "round 4 of the first job")
            said["submit"] = console(kits["ada@example.org"], "submit", str(folder / "short.toml"))
            said["viewer abort"] = console(kits["grace@example.org"], "abort", "1")
            said["viewer jobs"] = console(kits["grace@example.org"], "jobs")
            wait_for(lambda: len(rounds_done(metrics)) >= 12, JOB_TIMEOUT, "round 12 of the first job")
            service.send_signal(signal.SIGKILL)
            service.wait(10_000 * MS)
            for name, dialer in dialers.items():  # each notices, and dials again by itself
                dialer.wait_for(f"{name}: connection lost", 10_000 * MS)
            service = start_service("--queue", str(folder / "demo.toml"))  # as a restart with the same flags
            wait_for(
                lambda: (folder / "serve.out").read_text().count("Dashboard on ") == 2,
                STARTUP_TIMEOUT,
                "the restarted service's dashboard",
            )
            watch_dashboard(f"https://127.0.0.1:{dashboard}/", spki_pin(server / "coordinator.crt"), page, folder)
            store = JobStore(state)
            wait_for(
                lambda: all(record["state"] in FINISHED_STATES for record in store.all()),
                JOB_TIMEOUT,
                "both jobs to finish",
            )
            said["status"] = console(kits["ada@example.org"], "status", "2")
            said["download"] = console(kits["grace@example.org"], "download", "1", "-o", str(folder / "m.safetensors"))
            outputs = {name: dialer.stdout() + dialer.err.read_text() for name, dialer in dialers.items()}
        yield Served(folder, state, {record["name"]: record for record in store.all()}, said, outputs, page)
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(STARTUP_TIMEOUT)


def watch_dashboard(url: str, pin: str, page: dict[str, object], folder: Path) -> None:
    """Open the dashboard of the running service, wait for it to move on, and keep what it showed."""
    with chromium(pin) as browser:
        browser.get(f"{url}?token={TOKEN}")
        wait_until(browser, lambda: len(worker_rows(browser)) == 4, "the four workers")
        wait_until(
            browser,
            lambda: all(row[2].startswith("connected") for row in worker_rows(browser).values()),
            "the four workers connected again",
        )
        wait_until(browser, lambda: curve_points(browser).get("federated", 0) > 0, "a federated curve")
        first = curve_points(browser)["federated"], page_text(browser, "#jobs tr[data-job='1'] td.number")

        def moved_on() -> bool:
            points = curve_points(browser).get("federated")
            return (points or 0) > first[0] or page_text(browser, "#jobs tr[data-job='1'] td.number") != first[1]

        wait_until(browser, moved_on, f"the page to move on from {first}")
        page["workers"] = worker_rows(browser)
        page["lines"] = curve_points(browser)
        page["severe"] = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        page["shot"] = save_screenshot(browser, folder / "dashboard.png")[0]


def test_a_killed_service_resumes_the_demo_job_to_the_demo_accuracy(served: Served) -> None:
    demo = served.jobs["demo"]
    assert demo["state"] == "done", (demo, (served.folder / "serve.out").read_text()[-3000:])
    assert (demo["round"], demo["rounds"], demo["submitted_by"]) == (40, 40, "serve --queue")
    assert rounds_done(served.state / "jobs" / "1" / "metrics.jsonl") == list(range(1, 41))
    assert demo["result"] is not None and f"{demo['result']['accuracy']:.2%}" == f"{demo_accuracy()}%"
    log = (served.state / "jobs" / "1" / "log.txt").read_text()
    assert "The service restarted: the job resumes from its checkpoint" in log
    # Killed once round 12's metrics were written: its checkpoint may not have been, so 11 counts too.
    assert re.search(r"Resuming after round (1[1-9]|[2-3]\d) from ", log), log


def test_the_workers_dial_back_by_themselves_and_prove_their_ids(served: Served) -> None:
    for name in IDS:
        connected = [line for line in served.dialers[name].splitlines() if line.startswith(f"{name}: connected to ")]
        assert len(connected) == 2, served.dialers[name]  # once per start of the service: kept across both jobs
    said = (served.folder / "serve.out").read_text()
    assert "Job 1 (demo) resumes on alice, bob, charlie, testing" in said
    assert f"Not queued again: {served.folder / 'demo.toml'} is job 1, running" in said  # the restart's --queue


def test_the_second_job_runs_after_the_first_without_the_site_whose_policy_refused_it(served: Served) -> None:
    submitted = served.console["submit"]
    assert (submitted.returncode, submitted.stdout, submitted.stderr) == (0, "submitted job 2 (short): queued\n", "")
    short, demo = served.jobs["short"], served.jobs["demo"]
    assert (short["state"], short["round"], short["submitted_by"]) == ("done", 3, "ada@example.org"), short
    assert demo["finished_at"] is not None and short["started_at"] is not None
    assert short["started_at"] >= demo["finished_at"]
    assert short["refusals"] == {"charlie": CHARLIE_REFUSES}
    status = served.console["status"]
    assert status.returncode == 0 and f"refused by  charlie: {CHARLIE_REFUSES}" in status.stdout, status
    assert "policy: refused job" in served.dialers["charlie"] and CHARLIE_REFUSES in served.dialers["charlie"]


def test_a_viewer_reads_and_downloads_but_cannot_abort_and_the_audit_log_says_so(served: Served) -> None:
    abort = served.console["viewer abort"]
    assert (abort.returncode, abort.stderr) == (
        10,
        "python -m syncfed admin: error: viewer grace@example.org may not abort\n",
    )
    assert served.console["viewer jobs"].returncode == 0 and "demo" in served.console["viewer jobs"].stdout
    assert served.console["download"].returncode == 0 and (served.folder / "m.safetensors").stat().st_size > 0
    entries = [
        (entry["who"], entry["action"], entry["target"], entry["result"])
        for entry in read_audit(served.state / "audit.jsonl")
    ]
    assert entries[:4] == [
        ("ada@example.org", "submit", "", "attempt"),
        ("ada@example.org", "submit", "", "ok"),
        ("grace@example.org", "abort", "1", "denied"),
        ("grace@example.org", "jobs", "", "ok"),
    ]
    assert ("grace@example.org", "download", "1", "ok") in entries


def test_the_dashboard_shows_the_workers_and_follows_the_running_job(served: Served) -> None:
    workers = served.page["workers"]
    assert isinstance(workers, dict) and sorted(workers) == sorted(IDS)
    assert workers["testing"][1] == "evaluator" and "360 examples" in workers["testing"][4], workers
    assert all(re.fullmatch(r"\d+\.\d ms", row[3]) for row in workers.values()), workers  # measured at the greeting
    lines = served.page["lines"]
    assert isinstance(lines, dict) and set(lines) >= {"federated", "alice's model"}, lines
    assert served.page["severe"] == []
    shot = served.page["shot"]
    assert isinstance(shot, Path) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
