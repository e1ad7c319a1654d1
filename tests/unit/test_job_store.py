"""The service's jobs in SQLite: queued in order, updated as they run, ended once, kept across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncfed.cli.serve import JOB_FLAGS
from syncfed.config import DIAL_IN
from syncfed.coordinator.job_file import JobFile, read_job
from syncfed.coordinator.job_run import LOG, JobRun
from syncfed.coordinator.job_store import JobStore
from syncfed.coordinator.service import Service, ServiceSettings
from syncfed.exceptions import ConfigError, JobStateError, UnknownJob
from syncfed.net.dial_in import DialInLink
from syncfed.service_api import JobRecord


def add(store: JobStore, name: str) -> str:
    record = store.add(
        name=name, job=f'workers = ["alice"]\nname = "{name}"', by="ada", workers=["alice"], evaluator=None, rounds=3
    )
    return record["id"]


def test_jobs_queue_in_order_and_are_listed_newest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first, second = add(store, "one"), add(store, "two")
    assert [record["id"] for record in store.in_state("queued")] == [first, second]
    assert [record["name"] for record in store.all()] == ["two", "one"]
    record = store.get(first)
    assert (record["state"], record["submitted_by"], record["round"], record["rounds"], record["refusals"]) == (
        "queued",
        "ada",
        0,
        3,
        {},
    )
    assert store.text(first) == 'workers = ["alice"]\nname = "one"'


def test_a_job_ends_once_and_its_record_outlives_the_store(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = add(store, "one")
    store.update(job, state="running", started_at=1.0, round=2, refusals={"bob": "rounds above 10"})
    done = store.finish(job, "done", result={"accuracy": 0.5})
    assert (done["state"], done["round"], done["result"], done["refusals"]) == (
        "done",
        2,
        {"accuracy": 0.5},
        {"bob": "rounds above 10"},
    )
    assert done["finished_at"] is not None
    with pytest.raises(JobStateError, match=f"^job {job} has done already$"):
        store.finish(job, "aborted", reason="aborted by ada")
    assert JobStore(tmp_path).get(job) == done  # a restarted service reads the same file


@pytest.mark.parametrize("job_id", ["7", "abc", "1; DROP TABLE jobs", "", "01", "\u0661", "\u00b2", "-1", "1" * 19])
def test_an_unknown_job_is_named(tmp_path: Path, job_id: str) -> None:
    store = JobStore(tmp_path)
    add(store, "one")
    with pytest.raises(UnknownJob, match="^no job "):
        store.get(job_id)


def test_a_site_refusal_event_is_kept_in_the_jobs_record_and_rounds_advance_it(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = add(store, "one")
    job = read_job('workers = ["alice", "bob"]', known=("alice", "bob"), folder=tmp_path, flags=JOB_FLAGS)
    links = {name: DialInLink(name, DIAL_IN, max_message_size=2**20) for name in ("alice", "bob")}
    run = JobRun(
        job_id,
        job,
        store,
        tmp_path / "jobs" / job_id,
        links=links,
        registry=tmp_path / "registry",
        service={"listen": "127.0.0.1:0", "insecure_listen": True},
        resume=False,
    )
    run.event({"event": "refused", "worker": "bob", "reason": "site policy: at most 10 rounds"})
    run.event({"event": "round", "round": 1, "workers": ["alice"]})
    run.report("a line")
    record = store.get(job_id)
    assert (record["refusals"], record["round"]) == ({"bob": "site policy: at most 10 rounds"}, 1)
    assert (tmp_path / "jobs" / job_id / LOG).read_text().endswith(" a line\n")


def test_a_job_on_a_worker_that_is_not_connected_is_refused(tmp_path: Path) -> None:
    settings = ServiceSettings(state=tmp_path, listen="127.0.0.1:0", workers=("alice", "bob"), insecure_listen=True)

    async def submit() -> None:
        await Service(settings, flags=JOB_FLAGS).submit('workers = ["alice"]', by="ada")

    with pytest.raises(ConfigError, match="^job file: worker alice is not connected$"):
        asyncio.run(submit())
    assert JobStore(tmp_path).all() == []


def settings(folder: Path, *workers: str) -> ServiceSettings:
    return ServiceSettings(
        state=folder, listen="127.0.0.1:0", workers=workers, insecure_listen=True, poll_interval=0.01
    )


@pytest.mark.parametrize("job_id", ["01", "\u0661", "\u00b2", "-1", "1" * 19])
def test_an_abort_names_the_job_in_one_form_only_and_stops_its_task(tmp_path: Path, job_id: str) -> None:
    async def scenario() -> tuple[str, str, bool]:
        service = Service(settings(tmp_path, "alice"), flags=JOB_FLAGS, report=lambda line: None)
        record = service.queue('workers = ["alice"]', service.check('workers = ["alice"]'), by="ada")
        service.store.update(record["id"], state="running")
        task = service._running[record["id"]] = asyncio.create_task(asyncio.sleep(3600))
        with pytest.raises(UnknownJob, match="^no job "):
            await service.abort(job_id, by="ada")
        with pytest.raises(UnknownJob, match="^no job "):
            await service.logs(job_id)
        state = service.store.get(record["id"])["state"]
        aborted = await service.abort(record["id"], by="ada")
        return state, aborted["state"], task.cancelled()

    assert asyncio.run(scenario()) == ("running", "aborted", True)


def test_the_scheduler_fails_a_job_whose_worker_is_gone_and_goes_on(tmp_path: Path) -> None:
    reports: list[str] = []

    async def scenario() -> tuple[str, str | None, bool]:
        before = Service(settings(tmp_path, "alice", "bob"), flags=JOB_FLAGS)
        before.queue('workers = ["bob"]', before.check('workers = ["bob"]'), by="ada")  # then bob leaves server.toml
        service = Service(settings(tmp_path, "alice"), flags=JOB_FLAGS, report=reports.append)
        await service.start()
        try:
            for _ in range(200):
                if service.store.get("1")["state"] != "queued":
                    break
                await asyncio.sleep(0.01)
            service.store._db = None  # type: ignore[assignment]  # every scheduling pass fails from now on
            service._wake_up()
            await asyncio.sleep(0.05)
            alive = not service._scheduler.done()  # type: ignore[union-attr]
        finally:
            await service.close()
        record = JobStore(tmp_path).get("1")
        return record["state"], record["reason"], alive

    assert asyncio.run(scenario()) == ("failed", "worker bob is not one of the service's any more", True)
    assert any(line.startswith("Scheduling failed, trying again: AttributeError") for line in reports), reports


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('strategy = "nope"', "job file: strategy 'nope' is not one of"),
        ("min-workers = 5", "job file: min_workers 5 is not between 1 and 1 training workers"),
        ("dp-target-epsilon = 1.0", "job file: --dp-noise-multiplier and --dp-target-epsilon need --dp central or"),
        ("training-rounds = 0", "job file: training_rounds must be at least 1, not 0"),
    ],
)
def test_a_job_that_could_never_run_is_refused_when_it_is_checked(tmp_path: Path, text: str, error: str) -> None:
    service = Service(settings(tmp_path, "alice"), flags=JOB_FLAGS)
    with pytest.raises(ConfigError) as caught:
        service.check(f'workers = ["alice"]\n{text}')
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_a_job_text_queued_or_running_is_found_and_a_finished_one_is_not(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first = add(store, "one")
    assert store.unfinished('workers = ["alice"]\nname = "one"') == store.get(first)
    store.update(first, state="running")
    assert store.unfinished('workers = ["alice"]\nname = "one"') == store.get(first)
    store.finish(first, "done")
    assert store.unfinished('workers = ["alice"]\nname = "one"') is None


def test_logs_and_metrics_leave_out_a_half_written_last_line(tmp_path: Path) -> None:
    async def scenario() -> tuple[tuple[list[str], int], list[dict[str, object]]]:
        service = Service(settings(tmp_path, "alice"), flags=JOB_FLAGS)
        job_id = service.queue('workers = ["alice"]', service.check('workers = ["alice"]'), by="ada")["id"]
        folder = tmp_path / "jobs" / job_id
        (folder / "log.txt").write_text("one\ntwo\nthr", encoding="utf-8")
        (folder / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "los', encoding="utf-8")
        return await service.logs(job_id), await service.metrics(job_id)

    assert asyncio.run(scenario()) == ((["one", "two"], 2), [{"round": 1}])


def test_a_job_that_cannot_start_fails_and_the_queue_behind_it_goes_on(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobRecord, list[str]]:
        service = Service(settings(tmp_path, "alice", "bob"), flags=JOB_FLAGS, report=lambda line: None)
        first = service.queue('workers = ["alice"]', service.check('workers = ["alice"]'), by="ada")
        service.queue('workers = ["bob"]', service.check('workers = ["bob"]'), by="ada")
        checked, started = service.check, []

        def check(text: str) -> JobFile:  # an allowed import that breaks when the job starts, say
            if "alice" in text:
                raise RuntimeError("module exploded")
            return checked(text)

        async def run(job_id: str, job: JobFile, links: object, *, resume: bool) -> None:
            started.append(job_id)

        service.check = check  # type: ignore[method-assign]
        service._run = run  # type: ignore[method-assign]
        service.table.ready = lambda name: True  # type: ignore[method-assign]
        service.table.lend = lambda names, job: dict.fromkeys(names)  # type: ignore[method-assign,assignment]
        service._start_ready()
        await asyncio.sleep(0)
        return service.store.get(first["id"]), started

    first, started = asyncio.run(scenario())
    assert (first["state"], first["reason"]) == ("failed", "cannot start: RuntimeError: module exploded")
    assert started == ["2"]
