"""The job service in the test's own event loop: two jobs on disjoint workers run at once, over links it keeps.

Five in-process workers dial the service (alice and bob with the evaluator
testing for one job, charlie with the evaluator checker for the other); a
third job on alice waits behind the first and is aborted while queued; a
fourth, on charlie after the second, fails with one line and the service
goes on; a long job is aborted while it trains; a job naming an unknown
worker is refused at submission. The workers stay connected from the first
job to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from units import MS

from syncfed.cli.serve import JOB_FLAGS
from syncfed.config import WorkerConfig
from syncfed.coordinator.service import Service, ServiceSettings
from syncfed.exceptions import ConfigError, JobStateError
from syncfed.service_api import FINISHED_STATES, JobRecord
from syncfed.worker import Worker, load_holdings
from syncfed.worker.dialer import dial_out

TIMEOUT = 120_000 * MS
POLL = 20 * MS
IDS = ("alice", "bob", "charlie", "testing", "checker")


def job(workers: list[str], evaluator: str, rounds: int, name: str) -> str:
    return f"name = {name!r}\nworkers = {workers!r}\nevaluator = {evaluator!r}\ntraining-rounds = {rounds}\n"


@contextlib.asynccontextmanager
async def service_with_workers(state: Path, reports: list[str]) -> AsyncIterator[Service]:
    settings = ServiceSettings(
        state=state, listen="127.0.0.1:0", workers=IDS, insecure_listen=True, poll_interval=20 * MS
    )
    service = Service(settings, flags=JOB_FLAGS, report=reports.append)
    uri = await service.start()
    dialers = []
    for name in IDS:
        config = WorkerConfig(name, connect=uri, testing=name in ("testing", "checker"), redial_max_delay=0.2)
        dialers.append(asyncio.create_task(dial_out(Worker(config, load_holdings(config)), report=reports.append)))
    try:
        yield service
    finally:
        for task in dialers:
            task.cancel()
        await asyncio.gather(*dialers, return_exceptions=True)
        await service.close()


async def until(condition: object, what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not await condition():  # type: ignore[operator]
            await asyncio.sleep(POLL)


def test_two_jobs_on_disjoint_workers_run_at_once_and_aborts_leave_the_workers_connected(tmp_path: Path) -> None:
    reports: list[str] = []

    async def scenario() -> tuple[list[JobRecord], set[str], list[str], Service]:
        overlap: set[str] = set()
        async with service_with_workers(tmp_path / "state", reports) as service:

            async def all_connected() -> bool:
                return all(record["connected"] for record in await service.workers())

            await until(all_connected, "workers")

            async def pinged() -> bool:
                return all(record["rtt_ms"] is not None for record in await service.workers())

            await until(pinged, "a ping of each idle worker")
            alice = (await service.workers())[0]
            assert (alice["id"], alice["role"], alice["data"], alice["job"]) == (
                "alice",
                "trainer",
                "518 examples of digits (classes 0-3)",
                None,
            )
            assert alice["version"].startswith("protocol ") and alice["last_seen"] >= alice["connected_since"]
            with pytest.raises(ConfigError, match="^job file: worker 'dave' is not one of the service's"):
                await service.submit(job(["dave"], "testing", 1, "nobody"), by="ada")
            first = await service.submit(job(["alice", "bob"], "testing", 3, "first"), by="ada")
            second = await service.submit(job(["charlie"], "checker", 3, "second"), by="ada")
            third = await service.submit(job(["alice"], "testing", 1, "third"), by="ada")
            broken = await service.submit(job(["charlie"], "checker", 1, "broken") + 'model = "mnist-cnn"\n', by="ada")

            async def finished() -> bool:
                states = {record["id"]: record["state"] for record in await service.jobs()}
                if states[first["id"]] == states[second["id"]] == "running":
                    overlap.add("both running")
                if states[third["id"]] == "queued" and states[first["id"]] == "running":
                    await service.abort(third["id"], by="ada")
                return all(states[record["id"]] in FINISHED_STATES for record in (first, second, broken))

            await until(finished, "jobs")
            with pytest.raises(JobStateError, match=f"^job {first['id']} has done already$"):
                await service.abort(first["id"], by="ada")
            long = await service.submit(job(["alice", "bob"], "testing", 500, "long"), by="ada")

            async def training() -> bool:
                return (await service.job(long["id"]))["round"] >= 1

            await until(training, "the long job's first round")
            await service.abort(long["id"], by="bo")
            await asyncio.sleep(200 * MS)  # the workers may still be training: they stay connected all the same
            workers = [record["id"] for record in await service.workers() if record["connected"]]
            metrics = await service.metrics(first["id"])
            rounds = [event["round"] for event in metrics if event["event"] == "round"]
            assert rounds == [1, 2, 3]
            assert (await service.model(first["id"])).is_file()
            lines, following = await service.logs(first["id"])
            assert lines[0].endswith(" Queued by ada: first, 3 rounds")
            assert any(" Evaluation at round 3/3:" in line for line in lines)
            assert await service.logs(first["id"], since=following) == ([], following)
            with pytest.raises(JobStateError, match=r"kept no model of round 2 \(rounds kept: 1, 3\)"):
                await service.model(first["id"], round=2)
            return await service.jobs(), overlap, workers, service

    records, overlap, connected, _ = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    by_name = {record["name"]: record for record in records}
    assert overlap == {"both running"}
    assert [by_name[name]["state"] for name in ("first", "second", "third")] == ["done", "done", "aborted"], records
    assert by_name["third"]["reason"] == "aborted by ada"
    assert (by_name["long"]["state"], by_name["long"]["reason"]) == ("aborted", "aborted by bo")
    assert by_name["broken"]["state"] == "failed", by_name["broken"]
    assert "mnist-cnn" in by_name["broken"]["reason"] and "\n" not in by_name["broken"]["reason"]
    assert by_name["first"]["round"] == 3 and by_name["first"]["result"]["round"] == 3.0
    assert by_name["second"]["workers"] == ["charlie"] and by_name["second"]["evaluator"] == "checker"
    assert sorted(connected) == sorted(IDS)  # no job closed the links it was lent
    assert sum(line.startswith("Worker alice connected") for line in reports) == 1
