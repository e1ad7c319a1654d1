"""The service's jobs in SQLite: queued in order, updated as they run, ended once, kept across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncfed.config import DIAL_IN
from syncfed.coordinator.job_file import read_job
from syncfed.coordinator.job_run import LOG, JobRun
from syncfed.coordinator.job_store import JobStore
from syncfed.coordinator.service import Service, ServiceSettings
from syncfed.exceptions import ConfigError, JobStateError, UnknownJob
from syncfed.net.dial_in import DialInLink


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


@pytest.mark.parametrize("job_id", ["7", "abc", "1; DROP TABLE jobs", ""])
def test_an_unknown_job_is_named(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(UnknownJob, match="^no job "):
        JobStore(tmp_path).get(job_id)


def test_a_site_refusal_event_is_kept_in_the_jobs_record_and_rounds_advance_it(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = add(store, "one")
    job = read_job('workers = ["alice", "bob"]', known=("alice", "bob"), folder=tmp_path)
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
        await Service(settings).submit('workers = ["alice"]', by="ada")

    with pytest.raises(ConfigError, match="^job file: worker alice is not connected$"):
        asyncio.run(submit())
    assert JobStore(tmp_path).all() == []
