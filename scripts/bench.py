"""The benchmark suite of docs/performance.md: syncfed against pure compute, the wire, and Flower.

Usage::

    .venv/bin/python scripts/bench.py --profile --json bench.json       # everything (about 9 minutes on 2 cores)
    .venv/bin/python scripts/bench.py --quick --only overhead,transfer   # a small version (CI runs --quick)

Sections (``--only``, comma-separated; all by default):

1. ``overhead``: seconds per round of syncfed with three worker processes on
   127.0.0.1 against a plain single-process loop doing exactly the workers'
   SGD steps and FedAvg (McMahan et al. 2017),
   for the digits CNN (10 local batches) and the 10M-parameter MLP (1 batch).
   Both end at the same weights, which the run checks.
2. ``transfer``: rounds of pure transfer (no batches) of 1M, 10M and 100M
   parameters to three workers and back, against the machine's own memcpy and
   loopback socket throughput measured in the same run.
3. ``scale``: 3 to 100 workers on the digits CNN (1 batch); up to
   ``--max-processes`` workers are processes, above that asyncio servers
   hosted ``--per-host`` to a process.
4. ``memory``: peak RSS of the coordinator, run in a process of its own,
   over its baseline, for 3 to 30 workers on the 10M model, without flow
   control (``--receive-slots 0``) and with the default receive slots.
5. ``flower``: the overhead tasks under Flower's legacy gRPC mode
   (``start_server``/``start_client``, 512 MiB message limit, offline), when
   ``flwr`` is installed; it is never a dependency of syncfed. Flower's
   processes run under ``--flower-python`` (a separate venv with flwr and
   syncfed) when given, else under this Python.
6. ``walkthrough``: the README's four-terminal walk-through (four
   ``run_websocket_server.py`` processes started as the README starts them,
   default threads, then ``run_websocket_client.py``) against the one-command
   ``run_websocket_client.py --spawn-workers``, the demo's recipe for
   ``--walkthrough-rounds`` rounds each (issue 18: within 1.5x).
7. ``accuracy``: time to accuracy (issue 20). Seconds from a cold start (the
   demo's ``run_websocket_client.py --spawn-workers`` launched, workers not yet
   started) to 95% federated test accuracy on the digits demo, evaluated every
   round, in sync and in async (FedBuff) mode, and for Flower on the same
   shards, initial model, plan seeds and learning rates (its server evaluating
   on the evaluator's test set after every round) when it is available;
   ``--accuracy-plot PNG`` draws the curves.

Every figure is the median of the rounds after the first, a warm-up; MB is
10**6 bytes. Wall and CPU seconds are both reported: ratios come from one run,
so they hold on a machine shared with other work, and CPU seconds hardly
depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import dataclasses
import functools
import gc
import io
import itertools
import json
import math
import os
import platform
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from syncfed.aggregation import fedavg  # noqa: E402
from syncfed.config import DEFAULT_RECEIVE_SLOTS, CoordinatorConfig, WorkerConfig  # noqa: E402
from syncfed.coordinator import Coordinator, plan_seed  # noqa: E402
from syncfed.models import MODELS, default_model, get_weights, set_weights  # noqa: E402
from syncfed.net.spawn import spawn_workers  # noqa: E402
from syncfed.protocol import TrainingPlan  # noqa: E402
from syncfed.tensors import Weights  # noqa: E402
from syncfed.training import evaluate, train  # noqa: E402
from syncfed.worker import load_holdings, load_shard, run_worker  # noqa: E402

__all__ = ["Plan", "FULL", "QUICK", "main"]

MB = 1e6
SECTIONS = ("overhead", "transfer", "scale", "memory", "flower", "walkthrough", "accuracy")
TRAINERS = ("alice", "bob", "charlie")
#: The recipe every run shares: the demo's batch size and seed, a learning rate the MLPs train with.
BATCH_SIZE, SEED, LR = 32, 1, 0.05
#: Flower's gRPC message limit on both sides: 512 MiB, as syncfed's default.
FLOWER_LIMIT = 512 * 2**20
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FLOWER_EVALUATION = "FLOWER-EVALUATION"  # the Flower server's line after each round's evaluation
RESULT = "BENCH-RESULT "
SOCKET = "loopback TCP socket"
_READY = re.compile(r"^syncfed worker (\S+) listening on (ws://\S+)$")
_CPU = torch.device("cpu")

# Timeouts
STARTUP_TIMEOUT = 180.0  # a set of workers importing torch on a busy 2-core machine
SECTION_TIMEOUT = 1800.0  # one child run (a coordinator, Flower): a hung one must not hang the suite
HOSTED_PING_TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    """What one run measures: the full suite, or the small ``QUICK`` one."""

    cnn_batches: int = 10
    cnn_rounds: int = 12
    mlp: str = "mlp-10m"
    mlp_rounds: int = 8
    transfer: tuple[tuple[str, int], ...] = (("mlp-1m", 10), ("mlp-10m", 6), ("mlp-100m", 3))
    scale_workers: tuple[int, ...] = (3, 10, 30, 100)
    scale_rounds: int = 5
    memory_model: str = "mlp-10m"
    memory_workers: tuple[int, ...] = (3, 10, 30)
    memory_slots: tuple[int, ...] = (0, DEFAULT_RECEIVE_SLOTS)  # no flow control, then the default
    memory_rounds: int = 3
    copy_bytes: int = 400 * 10**6
    socket_bytes: int = 2**30
    websocket_bytes: int = 100 * 10**6
    max_processes: int = 10  # more workers than this run as asyncio servers in a few processes
    per_host: int = 25
    threads: int = 1  # torch threads of each worker, each Flower client and the plain loop
    walkthrough_rounds: int = 40  # the demo's
    accuracy_rounds: int = 80  # at most, each mode: a run stops once it reaches the target
    flower_python: str | None = None  # the interpreter of Flower's processes (a venv with flwr); None: this one


FULL = Plan()
QUICK = Plan(
    cnn_batches=2,
    cnn_rounds=3,
    mlp="mlp-1m",
    mlp_rounds=3,
    transfer=(("mlp-1m", 3),),
    scale_workers=(3, 4),
    scale_rounds=3,
    memory_model="mlp-1m",
    memory_workers=(3,),
    memory_slots=(DEFAULT_RECEIVE_SLOTS,),
    memory_rounds=2,
    copy_bytes=40 * 10**6,
    socket_bytes=100 * 10**6,
    websocket_bytes=20 * 10**6,
    max_processes=0,  # one host process for all: fewer imports of torch, and hosting gets tested
    per_host=4,
    walkthrough_rounds=3,
    accuracy_rounds=3,
)


# Figures


@dataclass(frozen=True)
class Rounds:
    """Per-round figures of one run.

    CPU seconds say what the rounds cost whatever else the machine runs;
    wall seconds what they took. ``cpu`` is this process's (the coordinator,
    or the plain loop), ``workers_cpu`` all worker processes' together.
    """

    seconds: list[float]
    bytes_sent: list[int] = dataclasses.field(default_factory=list)  # message bytes, coordinator to workers
    bytes_received: list[int] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    workers_cpu: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, rounds: Sequence[Mapping[str, Any]], marks: Sequence[tuple[float, float]] = ()) -> Rounds:
        """From a coordinator's round events and the (coordinator, workers) CPU readings before and after each."""
        steps = list(itertools.pairwise(marks))
        return cls(
            [float(event["seconds"]) for event in rounds],
            [int(event["bytes_sent"]) for event in rounds],
            [int(event["bytes_received"]) for event in rounds],
            [after[0] - before[0] for before, after in steps],
            [after[1] - before[1] for before, after in steps],
        )

    @property
    def median(self) -> float:
        return steady(self.seconds)

    @property
    def median_cpu(self) -> float:
        """CPU seconds per round of every process taking part."""
        return steady([a + b for a, b in itertools.zip_longest(self.cpu, self.workers_cpu, fillvalue=0.0)])

    def to_json(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            **({"median_cpu_s": self.median_cpu} if self.cpu else {}),
            **dataclasses.asdict(self),
        }


def steady(values: Sequence[float]) -> float:
    """The median after the first value, a warm-up round (workers build the model, memory is first touched)."""
    return statistics.median(values[1:] or values)


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user and system, all threads) the processes ``pids`` used so far, from Linux's /proc."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def model_bytes(name: str) -> int:
    """Bytes of a registered model's state: what one copy on the wire carries, before framing."""
    return sum(array.nbytes for array in initial_weights(name).values())


def initial_weights(name: str) -> Weights:
    """The weights every run starts from, as the coordinator draws them."""
    torch.manual_seed(SEED)
    return get_weights(MODELS[name]())


def recipe(workers: Mapping[str, str], model: str, batches: int, rounds: int) -> CoordinatorConfig:
    """The coordinator's settings for one benchmark run; the plain loop and Flower read lr from it too."""
    return CoordinatorConfig(
        workers=dict(workers),
        evaluator={},
        model=model,
        training_rounds=rounds,
        federate_after_n_batches=batches,
        batch_size=BATCH_SIZE,
        lr=LR,
        seed=SEED,
        eval_every=rounds,
        # Pings every second as by default; a pong may be late behind the messages of the
        # 24 other workers of a host process (this is a benchmark, not a liveness test).
        ping_timeout=HOSTED_PING_TIMEOUT,
    )


def resident() -> tuple[int, int]:
    """Bytes of this process's resident set now and at its peak (Linux's VmRSS and VmHWM)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    """Start the peak resident set afresh from now (Linux 4.0+), so start-up's transients do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def top_lines(profile: cProfile.Profile | Path, count: int = 18) -> list[str]:
    """A profile's heaviest functions by own time, as pstats prints them."""
    stream = io.StringIO()
    pstats.Stats(profile if isinstance(profile, cProfile.Profile) else str(profile), stream=stream).sort_stats(
        "tottime"
    ).print_stats(count)
    lines = stream.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line.rstrip() for line in lines[start:] if line.strip()]


# Physical limits


def copy_throughput(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """MB/s of numpy copies: into a buffer already in memory (memcpy), and into a fresh one (plus page faults)."""
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.zeros_like(source)
    warm, fresh = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        copy = source.copy()
        fresh.append(time.perf_counter() - started)
        del copy
    return {
        "numpy copy into memory (memcpy)": nbytes / statistics.median(warm) / MB,
        "numpy copy with allocation": nbytes / statistics.median(fresh) / MB,
    }


_SENDER = """
import socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
block = memoryview(bytes(4 * 2**20))
with socket.create_connection(("127.0.0.1", port)) as sock:
    left = size
    while left:
        left -= sock.send(block[: min(left, len(block))])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
"""


def socket_throughput(nbytes: int, repeats: int = 3) -> float:
    """MB/s of one TCP stream over 127.0.0.1 between two processes, 4 MiB reads and writes; the median of a few."""
    rates = []
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(nbytes), str(server.getsockname()[1])])
            connection, _ = server.accept()
            with connection:
                buffer = bytearray(4 * 2**20)
                first = received = connection.recv_into(buffer)
                started = time.perf_counter()  # from the first byte: the sender's start-up is not the wire's
                while count := connection.recv_into(buffer):
                    received += count
                seconds = time.perf_counter() - started
                connection.sendall(b"k")
            sender.wait(timeout=60)
        if received != nbytes:
            raise RuntimeError(f"loopback test received {received} of {nbytes} bytes")
        rates.append((received - first) / seconds / MB)
    return statistics.median(rates)


_ECHO = """
import asyncio
from websockets.asyncio.server import serve
async def handler(connection):
    while True:
        async for _ in connection.recv_streaming(decode=False):
            pass
        await connection.send(b"k")
async def main():
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await server.serve_forever()
asyncio.run(main())
"""
#: Fragment sizes of the websockets measurement; None: the message in one frame.
FRAGMENTS: tuple[int | None, ...] = (None, 4 * 2**20, 2**20, 256 * 2**10)


async def websocket_throughput(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """MB/s of one binary websockets message, client to server (masked, as coordinator to worker), acknowledged.

    In one frame, and fragmented as syncfed streams large messages: websockets copies
    each frame several times on the way, so the fragment size sets its speed.
    """
    from websockets.asyncio.client import connect

    echo = await asyncio.create_subprocess_exec(sys.executable, "-c", _ECHO, stdout=asyncio.subprocess.PIPE)
    figures = {}
    try:
        assert echo.stdout is not None
        port = int(await asyncio.wait_for(echo.stdout.readline(), 60))
        payload = memoryview(bytes(nbytes))
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, ping_interval=None) as ws:
            for size in FRAGMENTS:
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    await ws.send(payload if size is None else (payload[i : i + size] for i in range(0, nbytes, size)))
                    await ws.recv()
                    seconds.append(time.perf_counter() - started)
                name = "one frame" if size is None else f"{size // 2**10} KiB fragments"
                figures[f"websocket {name}"] = nbytes / statistics.median(seconds) / MB
        return figures
    finally:
        echo.terminate()
        await echo.wait()


async def limits(plan: Plan) -> dict[str, float]:
    """MB/s of each physical limit (and of websockets, the library under syncfed), by name."""
    figures = copy_throughput(plan.copy_bytes)
    figures[SOCKET] = await asyncio.to_thread(socket_throughput, plan.socket_bytes)
    figures.update(await websocket_throughput(plan.websocket_bytes))
    return figures


# Workers


def worker_ids(count: int) -> list[tuple[str, tuple[int, int] | None]]:
    """Three workers are the demo's alice, bob and charlie (classes 0-3, 4-6, 7-9); more hold IID shards."""
    if count == len(TRAINERS):
        return [(name, None) for name in TRAINERS]
    return [(f"w{index:03d}", (index, count)) for index in range(count)]


@dataclass(frozen=True)
class Fleet:
    """Running workers: their addresses, how they are hosted (said in every table), their processes' last lines."""

    uris: dict[str, str]
    hosting: str
    output: Sequence[collections.deque[str]]
    pids: tuple[int, ...]


@asynccontextmanager
async def fleet(count: int, plan: Plan) -> AsyncIterator[Fleet]:
    """``count`` workers on 127.0.0.1: processes up to ``plan.max_processes``, else hosted a few to a process.

    When the run fails, the workers' last lines are printed: their log says why.
    """
    ids = worker_ids(count)
    async with contextlib.AsyncExitStack() as stack:
        if count <= plan.max_processes:
            arguments = [
                (
                    name,
                    [
                        "--threads",
                        str(plan.threads),
                        "--bench-models",
                        *(["--shard", f"{s[0] + 1}/{s[1]}"] if s else []),
                    ],
                )
                for name, s in ids
            ]
            workers = await stack.enter_async_context(spawn_workers(arguments, startup_timeout=STARTUP_TIMEOUT))
            running = Fleet(
                {name: worker.uri for name, worker in workers.items()},
                f"{count} processes",
                [worker.output for worker in workers.values()],
                tuple(worker.process.pid for worker in workers.values()),
            )
        else:
            size = math.ceil(count / math.ceil(count / plan.per_host))
            groups = [ids[start : start + size] for start in range(0, count, size)]
            running = await stack.enter_async_context(_hosts(groups, plan.threads))
        try:
            yield running
        except BaseException:
            for lines in running.output:
                print("\n".join(lines), file=sys.stderr)
            raise


@asynccontextmanager
async def _hosts(
    groups: Sequence[Sequence[tuple[str, tuple[int, int] | None]]], threads: int, *, profile: Path | None = None
) -> AsyncIterator[Fleet]:
    """One ``bench.py host`` process per group, all of whose workers are ready."""
    processes: list[asyncio.subprocess.Process] = []
    output: list[collections.deque[str]] = []
    drains: list[asyncio.Task[None]] = []

    async def start(group: Sequence[tuple[str, tuple[int, int] | None]], profile: Path | None) -> dict[str, str]:
        spec = {"workers": group, "threads": threads, "profile": str(profile) if profile is not None else None}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "host",
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        processes.append(process)
        lines: collections.deque[str] = collections.deque(maxlen=40)
        output.append(lines)
        assert process.stdout is not None
        uris: dict[str, str] = {}
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while len(uris) < len(group):
                line = (await process.stdout.readline()).decode(errors="replace").rstrip()
                if not line and process.stdout.at_eof():
                    raise RuntimeError(f"worker host exited with status {await process.wait()}: {' | '.join(lines)}")
                lines.append(line)
                match = _READY.match(line)
                if match:
                    uris[match.group(1)] = match.group(2)
        drains.append(asyncio.create_task(_drain(process, lines)))
        return uris

    try:
        results = await asyncio.gather(*(start(group, profile if i == 0 else None) for i, group in enumerate(groups)))
        count, plural = sum(map(len, groups)), "es" if len(groups) > 1 else ""
        yield Fleet(
            {name: uri for uris in results for name, uri in uris.items()},
            f"{count} asyncio servers in {len(groups)} process{plural}",
            output,
            tuple(process.pid for process in processes),
        )
    finally:
        await asyncio.gather(*(_stop(process) for process in processes))
        for task in drains:
            task.cancel()


async def _drain(process: asyncio.subprocess.Process, lines: collections.deque[str]) -> None:
    """Keep reading a child's output, so its pipe never fills, keeping its last lines."""
    assert process.stdout is not None
    async for line in process.stdout:
        lines.append(line.decode(errors="replace").rstrip())


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                process.kill()
            await process.wait()


async def host(workers: Sequence[tuple[str, Sequence[int] | None]], threads: int, profile: str | None) -> None:
    """Serve several workers in this one process and event loop; with ``profile``, write a profile there when stopped.

    The profile starts once the data is loaded, so it shows serving, not start-up.
    """
    torch.set_num_threads(threads)
    configs = [
        WorkerConfig(
            name,
            host="127.0.0.1",
            port=0,
            threads=threads,
            shard=(shard[0], shard[1]) if shard else None,
            bench_models=True,
        )
        for name, shard in workers
    ]
    holdings = [load_holdings(config) for config in configs]
    profiler = cProfile.Profile()
    if profile is not None:
        profiler.enable()
    try:
        ready = functools.partial(print, flush=True)
        await asyncio.gather(
            *(run_worker(config, held, ready=ready) for config, held in zip(configs, holdings, strict=True))
        )
    finally:
        if profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)


# Runs


async def run_syncfed(
    workers: Fleet, model: str, batches: int, rounds: int, *, profiler: cProfile.Profile | None = None
) -> tuple[Rounds, Weights]:
    """Run the coordinator in this process; its figures per round and the final weights."""
    events: list[Mapping[str, Any]] = []
    marks = [(time.process_time(), cpu_seconds(workers.pids))]

    def listen(event: Mapping[str, Any]) -> None:
        events.append(event)
        if event.get("event") == "round":
            marks.append((time.process_time(), cpu_seconds(workers.pids)))

    coordinator = Coordinator(recipe(workers.uris, model, batches, rounds), report=lambda _: None, listeners=[listen])
    if profiler is not None:
        profiler.enable()
    try:
        result = await coordinator.run()
    finally:
        if profiler is not None:
            profiler.disable()
    done = [event for event in events if event.get("event") == "round"]
    failed = [event["failed"] for event in done if event["failed"]]
    if len(done) != rounds or failed:
        raise RuntimeError(f"{model}: {len(done)} of {rounds} rounds, failures {failed}")
    return Rounds.of(done, marks), result.weights


def plain_loop(model: str, batches: int, rounds: int, threads: int) -> tuple[Rounds, Weights]:
    """The physical lower bound: the three workers' SGD steps one after another, then FedAvg; no communication.

    Same data, seeds and steps as syncfed's workers (``Worker._fit``), so it ends at the same weights.
    """
    torch.set_num_threads(threads)
    config = recipe({"plain": "ws://unused"}, model, batches, rounds)
    shards = [load_shard(WorkerConfig(name)).data for name in TRAINERS]
    weights = initial_weights(model)
    network = MODELS[model]()
    seconds, cpu = [], []
    for round_number in range(1, rounds + 1):
        started, used = time.perf_counter(), time.process_time()
        updates = []
        for index, data in enumerate(shards):
            seed = plan_seed(config.seed, round_number, index)
            plan = TrainingPlan(round_number, config.batch_size, batches, config.learning_rate(round_number), seed)
            set_weights(network, weights)
            torch.manual_seed(seed)
            train(network, data, plan, _CPU)
            updates.append((get_weights(network), len(data)))
        weights = fedavg(updates)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    return Rounds(seconds, cpu=cpu), weights


def max_difference(a: Weights, b: Weights) -> float:
    return max(float(np.max(np.abs(a[name].astype(np.float64) - b[name]), initial=0.0)) for name in a)


async def child(
    command: str, spec: Mapping[str, Any], *, env: Mapping[str, str] | None = None, python: str | None = None
) -> dict[str, Any]:
    """Run ``bench.py COMMAND SPEC`` under ``python`` (else this one); return the JSON after ``BENCH-RESULT``."""
    process = await asyncio.create_subprocess_exec(
        python or sys.executable,
        __file__,
        command,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SECTION_TIMEOUT)
    finally:
        await _stop(process)
    text = output.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT):
            return dict(json.loads(line[len(RESULT) :]))
    raise RuntimeError(f"bench.py {command} printed no result (status {process.returncode}): {text[-2000:]}")


def coordinator_process(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The memory section's coordinator, alone in its process: its rounds, and resident set before and at peak.

    The baseline is taken after the imports and the model's creation (as the
    coordinator creates it), the peak from then on.
    """
    weights = initial_weights(spec["model"])
    baseline, _ = resident()
    del weights
    gc.collect()
    reset_peak()
    samples: list[int] = []
    events: list[Mapping[str, Any]] = []

    def listen(event: Mapping[str, Any]) -> None:
        events.append(event)
        if event.get("event") == "round":
            samples.append(resident()[0])

    config = recipe(spec["uris"], spec["model"], spec["batches"], spec["rounds"])
    config = dataclasses.replace(config, receive_slots=spec["receive_slots"])
    asyncio.run(Coordinator(config, report=lambda _: None, listeners=[listen]).run())
    return {
        "baseline_rss": baseline,
        "peak_rss": resident()[1],
        "rss_after_rounds": samples,
        "rounds": Rounds.of([event for event in events if event.get("event") == "round"]).to_json(),
        "failed": [event["failed"] for event in events if event.get("event") == "round" and event["failed"]],
    }


# Flower (optional)


def flower_server(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's legacy gRPC server with FedAvg over three clients, timing each round from send to aggregate."""
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    started: list[float] = []
    seconds: list[float] = []
    failures: list[int] = []

    class Timed(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            started.append(time.perf_counter())  # after sampling, which waits for clients to connect
            return instructions

        def aggregate_fit(self, server_round: int, results: Any, failed: Any) -> Any:
            aggregated = super().aggregate_fit(server_round, results, failed)
            seconds.append(time.perf_counter() - started[-1])
            failures.append(len(failed))
            return aggregated

    torch.set_num_threads(spec["threads"])  # its evaluation on one thread, as the syncfed evaluator's share
    weights = initial_weights(spec["model"])
    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=len(TRAINERS),
        min_available_clients=len(TRAINERS),
        initial_parameters=ndarrays_to_parameters(list(weights.values())),
        on_fit_config_fn=lambda server_round: {"round": server_round},
        evaluate_fn=flower_evaluation(spec["model"]) if spec["evaluate"] else None,
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{spec['port']}",
        config=fl.server.ServerConfig(num_rounds=spec["rounds"]),
        strategy=strategy,
        grpc_max_message_length=FLOWER_LIMIT,
    )
    return {"seconds": seconds, "failures": failures, "version": fl.__version__}


def flower_evaluation(model_name: str) -> Callable[[int, list[np.ndarray], Any], tuple[float, dict[str, float]] | None]:
    """Flower's server-side evaluation on the demo evaluator's test set, each round's accuracy printed at once."""
    model = MODELS[model_name]()
    names = list(model.state_dict())
    data = load_shard(WorkerConfig("testing", testing=True)).data

    def evaluate_fn(
        server_round: int, parameters: list[np.ndarray], config: Any
    ) -> tuple[float, dict[str, float]] | None:
        if server_round == 0:  # the initial model, which syncfed's runs do not evaluate either
            return None
        set_weights(model, dict(zip(names, parameters, strict=True)))
        outcome = evaluate(model, data, CoordinatorConfig.test_batch_size, _CPU)
        print(f"{FLOWER_EVALUATION} {server_round} {outcome.correct} {outcome.num_examples}", flush=True)
        return outcome.loss, {"accuracy": outcome.correct / outcome.num_examples}

    return evaluate_fn


def flower_client(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Flower client doing exactly the local work of the syncfed worker of the same name."""
    import flwr as fl

    torch.set_num_threads(spec["threads"])
    name, index, batches = spec["name"], spec["index"], spec["batches"]
    config = dataclasses.replace(recipe({name: "ws://unused"}, spec["model"], batches, spec["rounds"]), lr=spec["lr"])
    data = load_shard(WorkerConfig(name)).data
    model = MODELS[spec["model"]]()
    names = list(model.state_dict())

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return list(get_weights(model).values())

        def fit(self, parameters: list[np.ndarray], settings: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            round_number = int(settings["round"])
            seed = plan_seed(config.seed, round_number, index)
            plan = TrainingPlan(round_number, config.batch_size, batches, config.learning_rate(round_number), seed)
            set_weights(model, dict(zip(names, parameters, strict=True)))
            torch.manual_seed(seed)
            train(model, data, plan, _CPU)
            return list(get_weights(model).values()), len(data), {}

    fl.client.start_client(
        server_address=f"127.0.0.1:{spec['port']}",
        client=Client().to_client(),
        grpc_max_message_length=FLOWER_LIMIT,
        insecure=True,
        transport="grpc-bidi",
    )
    return {}


@functools.cache
def flower_version(python: str | None) -> str | None:
    """Flower's version under ``python`` (this interpreter when None); None where it is not installed.

    Asked once per run, for the Flower and the accuracy sections alike.

    Raises:
        RuntimeError: if ``python`` is named but flwr does not import under it.
    """
    if python is None:
        try:
            import flwr
        except ImportError:
            return None
        return str(flwr.__version__)
    probe = subprocess.run(
        [python, "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        env={**os.environ, **FLOWER_ENV},
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"--flower-python {python}: flwr does not import: {last}")
    return probe.stdout.strip()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


async def listening(port: int, gone: Callable[[], bool]) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections, or its server is ``gone``."""
    for _ in range(int(STARTUP_TIMEOUT * 10)):  # the server imports torch and Flower before it listens
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        if gone():
            return
        await asyncio.sleep(0.1)


def flower_clients(spec: Mapping[str, Any], python: str | None) -> list[asyncio.Task[dict[str, Any]]]:
    """The three Flower clients, each a process of its own, as the syncfed trainers of the same names."""
    return [
        asyncio.create_task(
            child("flower-client", {**spec, "name": name, "index": index}, env=FLOWER_ENV, python=python)
        )
        for index, name in enumerate(TRAINERS)
    ]


async def run_flower(model: str, batches: int, rounds: int, plan: Plan) -> Rounds:
    """Flower's server and three clients, each a process of its own, on a free 127.0.0.1 port."""
    port = free_port()
    spec = {
        "model": model,
        "batches": batches,
        "rounds": rounds,
        "port": port,
        "threads": plan.threads,
        "lr": LR,
        "evaluate": False,
    }
    server = asyncio.create_task(child("flower-server", spec, env=FLOWER_ENV, python=plan.flower_python))
    await listening(port, server.done)
    clients = flower_clients(spec, plan.flower_python)
    try:
        figures = await server
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
    if len(figures["seconds"]) != rounds or any(figures["failures"]):
        raise RuntimeError(f"flower {model}: rounds {figures['seconds']}, failures {figures['failures']}")
    return Rounds(figures["seconds"])


async def profiled(plan: Plan, name: str, model: str, batches: int, rounds: int) -> dict[str, list[str]]:
    """A short extra run under cProfile: the coordinator (in this process) and worker alice (hosted alone).

    Each worker runs alone in a host process, as a worker process would;
    alice's host writes its profile when stopped.
    """
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "alice.prof"
        async with _hosts([[worker] for worker in worker_ids(len(TRAINERS))], plan.threads, profile=path) as workers:
            await run_syncfed(workers, model, batches, rounds, profiler=profiler)
        return {f"the coordinator, {name}": top_lines(profiler), f"worker alice, {name}": top_lines(path)}


# Sections


def tasks(plan: Plan) -> list[tuple[str, int, int]]:
    """The overhead section's tasks, which Flower runs too: (model, local batches, rounds)."""
    return [("digits-cnn", plan.cnn_batches, plan.cnn_rounds), (plan.mlp, 1, plan.mlp_rounds)]


async def overhead(plan: Plan, trio: Fleet, profile: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    profiles = {}
    for model, batches, rounds in tasks(plan):
        plain, plain_weights = plain_loop(model, batches, rounds, plan.threads)
        figures, weights = await run_syncfed(trio, model, batches, rounds)
        rows.append(
            {
                "model": model,
                "batches": batches,
                "rounds": rounds,
                "plain": plain.to_json(),
                "plain_s": plain.median,
                "syncfed": figures.to_json(),
                "syncfed_s": figures.median,
                "ratio": figures.median / plain.median,
                "cpu_ratio": figures.median_cpu / plain.median_cpu,
                "same_weights_max_abs_diff": max_difference(weights, plain_weights),
            }
        )
        if profile and model == plan.mlp:
            profiles.update(await profiled(plan, f"overhead {model}", model, batches, min(rounds, 3)))
    print_table(
        f"1. Overhead: median seconds per round, 3 workers ({trio.hosting}) against the plain loop;"
        " CPU: seconds of all processes, the coordinator's in brackets",
        [
            "model",
            "batches",
            "plain s",
            "syncfed s",
            "syncfed/plain",
            "plain CPU",
            "syncfed CPU",
            "CPU ratio",
            "same weights",
        ],
        [
            [
                r["model"],
                r["batches"],
                f"{r['plain_s']:.3f}",
                f"{r['syncfed_s']:.3f}",
                f"{r['ratio']:.2f}x",
                f"{r['plain']['median_cpu_s']:.2f}",
                f"{r['syncfed']['median_cpu_s']:.2f} ({steady(r['syncfed']['cpu']):.2f})",
                f"{r['cpu_ratio']:.2f}x",
                f"max |diff| {r['same_weights_max_abs_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    return {"hosting": trio.hosting, "rows": rows, "profiles": profiles}


async def transfer(plan: Plan, trio: Fleet, physical: Mapping[str, float], profile: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    profiles = {}
    for model, rounds in plan.transfer:
        figures, _ = await run_syncfed(trio, model, 0, rounds)
        size = model_bytes(model)
        moved = statistics.median(s + r for s, r in zip(figures.bytes_sent, figures.bytes_received, strict=True))
        rate = moved / figures.median / MB
        rows.append(
            {
                "model": model,
                "model_bytes": size,
                "rounds": figures.to_json(),
                "seconds": figures.median,
                "coordinator_cpu_s": steady(figures.cpu),
                "workers_cpu_s": steady(figures.workers_cpu),
                "framing_overhead": moved / (2 * len(trio.uris) * size) - 1,
                "MBps": rate,
                "of_socket": rate / physical[SOCKET],
            }
        )
        if profile and model == plan.transfer[-1][0]:
            profiles.update(await profiled(plan, f"transfer {model}", model, 0, min(rounds, 2)))
    print_table(
        f"2. Transfer: rounds of no training, 3 workers ({trio.hosting}); both directions' bytes over the round time",
        ["model", "MB per copy", "s per round", "MB/s", "of socket", "coordinator CPU s", "workers CPU s", "framing"],
        [
            [
                r["model"],
                f"{r['model_bytes'] / MB:.1f}",
                f"{r['seconds']:.3f}",
                f"{r['MBps']:.0f}",
                f"{r['of_socket']:.0%}",
                f"{r['coordinator_cpu_s']:.3f}",
                f"{r['workers_cpu_s']:.3f}",
                f"{r['framing_overhead']:+.4%}",
            ]
            for r in rows
        ],
    )
    return {"hosting": trio.hosting, "rows": rows, "profiles": profiles}


async def scale(plan: Plan, trio: Fleet) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for count in plan.scale_workers:
        async with contextlib.AsyncExitStack() as stack:
            workers = trio if count == len(trio.uris) else await stack.enter_async_context(fleet(count, plan))
            figures, _ = await run_syncfed(workers, "digits-cnn", 1, plan.scale_rounds)
        rows.append(
            {"workers": count, "hosting": workers.hosting, "rounds": figures.to_json(), "seconds": figures.median}
        )
    counts = np.array([r["workers"] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    slope, intercept = np.polyfit(counts, seconds, 1) if len(rows) > 1 else (0.0, float(seconds[0]))
    fitted = slope * counts + intercept
    spread = float(np.sum((seconds - seconds.mean()) ** 2))
    r2 = 1 - float(np.sum((seconds - fitted) ** 2)) / spread if spread > 0 else 1.0
    for previous, row in zip(rows, rows[1:], strict=False):
        row["per_added_worker_s"] = (row["seconds"] - previous["seconds"]) / (row["workers"] - previous["workers"])
    print_table(
        f"3. Scale: digits CNN, 1 batch, median seconds per round (linear fit: {slope * 1000:.2f} ms per worker,"
        f" R^2 {r2:.3f})",
        ["workers", "hosted as", "s per round", "s per added worker"],
        [
            [
                r["workers"],
                r["hosting"],
                f"{r['seconds']:.3f}",
                f"{r['per_added_worker_s']:.4f}" if "per_added_worker_s" in r else "",
            ]
            for r in rows
        ],
    )
    return {"rows": rows, "slope_s_per_worker": float(slope), "intercept_s": float(intercept), "r2": r2}


async def memory(plan: Plan, trio: Fleet) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    size = model_bytes(plan.memory_model)
    for count in plan.memory_workers:
        async with contextlib.AsyncExitStack() as stack:
            workers = trio if count == len(trio.uris) else await stack.enter_async_context(fleet(count, plan))
            for slots in plan.memory_slots:
                spec = {
                    "uris": workers.uris,
                    "model": plan.memory_model,
                    "batches": 0,
                    "rounds": plan.memory_rounds,
                    "receive_slots": slots,
                }
                figures = await child("coordinator", spec)
                if figures["failed"]:
                    raise RuntimeError(f"memory, {count} workers, {slots} slots: failures {figures['failed']}")
                excess = figures["peak_rss"] - figures["baseline_rss"]
                rows.append(
                    {
                        "workers": count,
                        "receive_slots": slots,
                        "hosting": workers.hosting,
                        **figures,
                        "excess": excess,
                        "models": excess / size,
                    }
                )
    print_table(
        f"4. Coordinator memory: {plan.memory_model} ({size / MB:.0f} MB), rounds of no training, coordinator alone"
        " in its process; receive slots 0 is no flow control",
        ["workers", "receive slots", "hosted as", "baseline MB", "peak MB", "peak - baseline", "in model sizes"],
        [
            [
                r["workers"],
                r["receive_slots"],
                r["hosting"],
                f"{r['baseline_rss'] / MB:.0f}",
                f"{r['peak_rss'] / MB:.0f}",
                f"{r['excess'] / MB:.0f} MB",
                f"{r['models']:.1f}x",
            ]
            for r in rows
        ],
    )
    return {"model": plan.memory_model, "model_bytes": size, "rows": rows}


async def flower(plan: Plan, results: Mapping[str, Any]) -> dict[str, Any]:
    version = flower_version(plan.flower_python)
    if version is None:
        print("\n5. Flower: skipped (install flwr in another venv and pass --flower-python to compare)")
        return {"skipped": "flwr is not installed"}
    syncfed = {row["model"]: row["syncfed_s"] for row in results.get("overhead", {}).get("rows", [])}
    rows: list[dict[str, Any]] = []
    for model, batches, rounds in tasks(plan):
        figures = await run_flower(model, batches, rounds, plan)
        row: dict[str, Any] = {
            "model": model,
            "batches": batches,
            "rounds": figures.to_json(),
            "flower_s": figures.median,
        }
        if model in syncfed:
            row["syncfed_s"] = syncfed[model]
            row["flower_over_syncfed"] = figures.median / syncfed[model]
        rows.append(row)
    print_table(
        f"5. Flower {version} legacy gRPC (start_server/start_client, 3 client processes): median s per round",
        ["model", "batches", "Flower s", "syncfed s", "Flower/syncfed"],
        [
            [
                r["model"],
                r["batches"],
                f"{r['flower_s']:.4f}",
                f"{r['syncfed_s']:.4f}" if "syncfed_s" in r else "-",
                f"{r['flower_over_syncfed']:.2f}x" if "syncfed_s" in r else "-",
            ]
            for r in rows
        ],
    )
    return {"version": version, "rows": rows}


# The README's walk-through

#: The README's four terminals: the worker flags beside --id, and the coordinator's per-round line.
WALKTHROUGH = (("alice", ()), ("bob", ()), ("charlie", ()), ("testing", ("--testing",)))
_ROUND_DONE = re.compile(r"^Round \d+/\d+ done in ([0-9.]+) s")
WALKTHROUGH_LIMIT = 1.5  # issue 18


async def timed_command(arguments: Sequence[str]) -> tuple[float, list[float]]:
    """Run ``python ARGUMENTS`` from the repository root: its wall seconds and the rounds' seconds it printed."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, *arguments, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(SECTION_TIMEOUT):
            output, _ = await process.communicate()
    finally:
        await _stop(process)
    seconds = time.perf_counter() - started
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} exited with status {process.returncode}: {text[-2000:]}")
    return seconds, [float(match.group(1)) for match in map(_ROUND_DONE.match, text.splitlines()) if match]


@asynccontextmanager
async def terminals() -> AsyncIterator[dict[str, str]]:
    """The walk-through's four workers, each a process as a terminal would start it, on free ports: ``{id: uri}``."""
    processes: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []

    async def start(name: str, flags: Sequence[str]) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "run_websocket_server.py",
            "--id",
            name,
            "--port",
            "0",  # the README's 8777-8780 may be taken on a shared machine
            *flags,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        processes.append(process)
        lines: collections.deque[str] = collections.deque(maxlen=40)
        assert process.stdout is not None
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace").rstrip()
                if not line and process.stdout.at_eof():
                    raise RuntimeError(f"worker {name} exited with status {await process.wait()}: {' | '.join(lines)}")
                lines.append(line)
                match = _READY.match(line)
                if match:
                    drains.append(asyncio.create_task(_drain(process, lines)))
                    return match.group(2)

    try:
        uris = await asyncio.gather(*(start(name, flags) for name, flags in WALKTHROUGH))
        yield {name: uri for (name, _), uri in zip(WALKTHROUGH, uris, strict=True)}
    finally:
        await asyncio.gather(*(_stop(process) for process in processes))
        for task in drains:
            task.cancel()


async def walkthrough(plan: Plan) -> dict[str, Any]:
    """The walk-through's coordinator over four separately started workers, then the spawned demo, same rounds."""
    common = ["run_websocket_client.py", "--training-rounds", str(plan.walkthrough_rounds), "--no-progress"]
    async with terminals() as uris:
        workers = ",".join(f"{name}={uris[name]}" for name, _ in WALKTHROUGH[:3])
        separate = await timed_command([*common, "--workers", workers, "--evaluator", f"testing={uris['testing']}"])
    spawned = await timed_command([*common, "--spawn-workers"])
    rows = []
    for name, (seconds, rounds) in (("four terminals", separate), ("--spawn-workers", spawned)):
        rows.append({"run": name, "wall_s": seconds, "rounds_s": sum(rounds), "median_round_s": steady(rounds)})
    ratio = rows[0]["rounds_s"] / rows[1]["rounds_s"]
    print_table(
        f"6. The README's walk-through against the spawned demo, {plan.walkthrough_rounds} rounds"
        " (wall: the coordinator's command, which for --spawn-workers starts the workers too)",
        ["run", "wall s", "rounds s", "median round s"],
        [[r["run"], f"{r['wall_s']:.1f}", f"{r['rounds_s']:.1f}", f"{r['median_round_s']:.2f}"] for r in rows],
    )
    met = "met" if ratio <= WALKTHROUGH_LIMIT else "NOT met"
    print(f"  walk-through / spawned demo, rounds: {ratio:.2f}x (target {WALKTHROUGH_LIMIT:g}x: {met})")
    return {"rounds": plan.walkthrough_rounds, "rows": rows, "ratio": ratio, "limit": WALKTHROUGH_LIMIT}


# Time to accuracy

ACCURACY_TARGET = 0.95
ACCURACY_MODES = ("sync", "async")
_EVALUATION = re.compile(r"^Evaluation at (?:round|version) (\d+)/\d+:$")
_FEDERATED = re.compile(r"^Federated model: Average loss: \S+, Accuracy: (\d+)/(\d+) ")


async def accuracy_curve(mode: str, rounds: int) -> dict[str, Any]:
    """The demo from a cold start in ``mode``: (round, seconds, accuracy) at each evaluation, until the target.

    Seconds run from the launch of the coordinator's command, which starts
    the workers, to the moment its federated accuracy line is printed.
    """
    arguments = ["run_websocket_client.py", "--spawn-workers", "--mode", mode, "--training-rounds", str(rounds)]
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        "--eval-every",
        "1",
        "--no-progress",
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line as printed, so its time is the coordinator's
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        points, tail = await evaluations(process, started, demo_accuracy())
    finally:
        await _stop(process)
    if not points:
        raise RuntimeError(f"{' '.join(arguments)} printed no evaluation (status {process.returncode}): {tail}")
    return curve(mode, f"syncfed {mode}", points)


async def evaluations(
    process: asyncio.subprocess.Process, started: float, accuracy: Callable[[str], tuple[int, float] | None]
) -> tuple[list[tuple[int, float, float]], list[str]]:
    """(round, seconds since ``started``, accuracy) of each evaluation ``process`` prints, until one reaches the
    target, and its last lines; ``accuracy`` reads a line's round and accuracy, if it reports them."""
    points: list[tuple[int, float, float]] = []
    tail: collections.deque[str] = collections.deque(maxlen=40)
    assert process.stdout is not None
    async with asyncio.timeout(SECTION_TIMEOUT):
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            found = accuracy(line)
            if found is not None:
                points.append((found[0], time.perf_counter() - started, found[1]))
                if found[1] >= ACCURACY_TARGET:
                    break
    return points, list(tail)


def demo_accuracy() -> Callable[[str], tuple[int, float] | None]:
    """A reader of the coordinator's console: the federated accuracy under each evaluation heading."""
    evaluated = 0

    def read(line: str) -> tuple[int, float] | None:
        nonlocal evaluated
        heading, score = _EVALUATION.match(line), _FEDERATED.match(line)
        if heading:
            evaluated = int(heading.group(1))
        elif score:
            return evaluated, int(score.group(1)) / int(score.group(2))
        return None

    return read


def flower_accuracy(line: str) -> tuple[int, float] | None:
    """The round and accuracy of a Flower server's evaluation line (``flower_evaluation``), if it is one."""
    if not line.startswith(FLOWER_EVALUATION + " "):
        return None
    round_number, correct, total = (int(field) for field in line.split()[1:])
    return round_number, correct / total


def curve(mode: str, label: str, points: Sequence[tuple[int, float, float]]) -> dict[str, Any]:
    """One run's (round, seconds, accuracy) points, with its first evaluation and where it reached the target."""
    reached = next((point for point in points if point[2] >= ACCURACY_TARGET), None)
    return {
        "mode": mode,
        "label": label,
        "points": list(points),
        "first_evaluation_s": points[0][1],
        "reached_round": reached[0] if reached else None,
        "reached_s": reached[1] if reached else None,
    }


async def flower_accuracy_curve(plan: Plan, version: str) -> dict[str, Any]:
    """Flower from a cold start on the demo's recipe: (round, seconds, accuracy) after every round, until the target.

    The same shards, initial model, plan seeds, batch size and learning
    rates as the demo's trainers, and FedAvg weighted by their examples;
    Flower's server evaluates on the demo evaluator's test set. Seconds run
    from the launch of Flower's server; its clients start once it listens,
    as in the flower section.
    """
    demo = CoordinatorConfig()
    assert (demo.batch_size, demo.seed) == (BATCH_SIZE, SEED), "the Flower side trains with the bench's recipe"
    port = free_port()
    spec = {
        "model": default_model("digits"),
        "batches": demo.federate_after_n_batches,
        "rounds": plan.accuracy_rounds,
        "port": port,
        "threads": plan.threads,
        "lr": demo.lr,
        "evaluate": True,
    }
    started = time.perf_counter()
    server = await asyncio.create_subprocess_exec(
        plan.flower_python or sys.executable,
        __file__,
        "flower-server",
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **FLOWER_ENV, "PYTHONUNBUFFERED": "1"},
    )
    clients: list[asyncio.Task[dict[str, Any]]] = []

    async def start_clients() -> None:
        await listening(port, lambda: server.returncode is not None)
        clients.extend(flower_clients(spec, plan.flower_python))

    launcher = asyncio.create_task(start_clients())
    try:
        points, tail = await evaluations(server, started, flower_accuracy)
    finally:
        launcher.cancel()
        for task in clients:
            task.cancel()
        await asyncio.gather(launcher, *clients, return_exceptions=True)
        await _stop(server)
    if not points:
        raise RuntimeError(f"Flower's demo run printed no evaluation (status {server.returncode}): {tail}")
    return curve("flower", f"Flower {version}", points)


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Federated accuracy against seconds from a cold start, one line per mode, the target dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=110)
    axes = figure.add_subplot()
    for row in rows:
        seconds = [point[1] for point in row["points"]]
        accuracies = [point[2] for point in row["points"]]
        reached = row["reached_s"] is not None
        label = f"{row['label']}: " + (
            f"{row['reached_s']:.1f} s, round {row['reached_round']}" if reached else "not reached"
        )
        (line,) = axes.plot(seconds, accuracies, marker=".", label=label)
        if reached:
            axes.plot([seconds[-1]], [accuracies[-1]], marker="o", markersize=9, color=line.get_color())
    axes.axhline(ACCURACY_TARGET, color="grey", linestyle="--", linewidth=1, label=f"{ACCURACY_TARGET:.0%}")
    axes.set_xlabel("seconds from a cold start (the run's first process launched)")
    axes.set_ylabel("federated test accuracy")
    axes.set_xlim(left=0)  # from the launch: the start-up is part of the time
    axes.set_ylim(0, 1)
    axes.set_title(f"Digits demo: time to {ACCURACY_TARGET:.0%} accuracy, evaluated every round")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


async def time_to_accuracy(plan: Plan, plot: Path | None) -> dict[str, Any]:
    rows = [await accuracy_curve(mode, plan.accuracy_rounds) for mode in ACCURACY_MODES]
    version = flower_version(plan.flower_python)
    if version is not None:
        rows.append(await flower_accuracy_curve(plan, version))
    print_table(
        f"7. Time to {ACCURACY_TARGET:.0%} federated accuracy on the digits demo from a cold start"
        f" (at most {plan.accuracy_rounds} rounds, evaluated every round)",
        ["run", "first evaluation s", "rounds", "seconds", "last accuracy"],
        [
            [
                r["label"],
                f"{r['first_evaluation_s']:.1f}",
                r["reached_round"] if r["reached_round"] is not None else "not reached",
                f"{r['reached_s']:.1f}" if r["reached_s"] is not None else "-",
                f"{r['points'][-1][2]:.2%}",
            ]
            for r in rows
        ],
    )
    if version is None:
        print("  Flower: not run (install flwr in another venv and pass --flower-python to compare)")
    if plot is not None:
        plot_accuracy(rows, plot)
        print(f"  Wrote {plot}")
    return {"target": ACCURACY_TARGET, "rows": rows}


# Targets


@dataclass(frozen=True)
class Target:
    """One of issue 9's targets: the measured ``value`` against its ``limit``, and the verdict."""

    name: str
    value: float
    limit: float
    met: bool
    text: str


def targets(plan: Plan, results: Mapping[str, Any]) -> list[Target]:
    """Issues 9's and 20's targets, from this run's figures: each met or not, with its measured value."""
    found = []
    overhead_rows = {row["model"]: row for row in results.get("overhead", {}).get("rows", [])}
    for model, limit in (("digits-cnn", 1.3), (plan.mlp, 1.3)):
        if model in overhead_rows:
            ratio = overhead_rows[model]["ratio"]
            found.append(Target(f"{model} overhead", ratio, limit, ratio <= limit, f"{ratio:.2f}x the plain loop"))
    for row in results.get("flower", {}).get("rows", []):
        if row["model"] == plan.mlp and "flower_over_syncfed" in row:
            speedup = row["flower_over_syncfed"]
            found.append(Target(f"{plan.mlp} vs Flower", speedup, 5.0, speedup >= 5.0, f"{speedup:.2f}x faster"))
    for row in results.get("transfer", {}).get("rows", []):
        if row["model"] in ("mlp-10m", "mlp-100m"):
            share = row["of_socket"]
            found.append(
                Target(f"{row['model']} transfer", share, 0.5, share >= 0.5, f"{share:.0%} of the loopback socket")
            )
        if row["model"] == "mlp-10m":
            used = row["coordinator_cpu_s"]
            found.append(Target("coordinator CPU per 10M transfer round", used, 0.08, used <= 0.08, f"{used:.3f} s"))
    memory_rows = [
        row for row in results.get("memory", {}).get("rows", []) if row["receive_slots"] == DEFAULT_RECEIVE_SLOTS
    ]
    if memory_rows and memory_rows[-1]["workers"] >= 30:
        row, fewest = memory_rows[-1], memory_rows[0]
        found.append(
            Target(
                f"coordinator memory, {row['workers']} workers",
                row["models"],
                4.0,
                row["models"] <= 4.0,
                f"{row['models']:.1f}x the model above baseline",
            )
        )
        # Flat: within half a model of the fewest workers' peak, about what the peaks vary between runs.
        growth = row["models"] - fewest["models"]
        found.append(
            Target(
                f"coordinator memory flat, {fewest['workers']} to {row['workers']} workers",
                growth,
                0.5,
                growth <= 0.5,
                f"{growth:+.1f} model sizes",
            )
        )
    scale_result = results.get("scale", {})
    scale_rows = scale_result.get("rows", [])
    if scale_rows and scale_rows[-1]["workers"] >= 100:
        # Roughly linear: the last step's cost per added worker at most twice the fitted slope.
        last = scale_rows[-1]["per_added_worker_s"]
        slope = scale_result["slope_s_per_worker"]
        ratio = last / slope if slope > 0 else math.inf
        found.append(
            Target(
                "100 workers, linear growth",
                ratio,
                2.0,
                ratio <= 2.0,
                f"completed; last step {last * 1000:.2f} ms per worker, fit {slope * 1000:.2f} ms",
            )
        )
    return found


# Output


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a titled table with right-aligned columns."""
    cells = [list(map(str, headers)), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  " + "  ".join("-" * width for width in widths))
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


async def run(plan: Plan, sections: Sequence[str], profile: bool, accuracy_plot: Path | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "plan": dataclasses.asdict(plan), "sections": list(sections)}
    wall: dict[str, float] = {}
    started = time.perf_counter()
    physical = results["limits"] = await limits(plan)
    wall["limits"] = time.perf_counter() - started
    print_table(
        "0. Physical limits on this machine, and websockets (two processes over 127.0.0.1)",
        ["measure", "MB/s"],
        [[name, f"{rate:.0f}"] for name, rate in physical.items()],
    )
    if any(section in sections for section in ("overhead", "transfer", "scale", "memory")):
        started = time.perf_counter()
        async with fleet(len(TRAINERS), plan) as trio:
            wall["start 3 workers"] = time.perf_counter() - started
            runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "overhead": lambda: overhead(plan, trio, profile),
                "transfer": lambda: transfer(plan, trio, physical, profile),
                "scale": lambda: scale(plan, trio),
                "memory": lambda: memory(plan, trio),
            }
            for name, section in runs.items():
                if name in sections:
                    started = time.perf_counter()
                    results[name] = await section()
                    wall[name] = time.perf_counter() - started
    if "flower" in sections:
        started = time.perf_counter()
        results["flower"] = await flower(plan, results)
        wall["flower"] = time.perf_counter() - started
    if "walkthrough" in sections:
        started = time.perf_counter()
        results["walkthrough"] = await walkthrough(plan)
        wall["walkthrough"] = time.perf_counter() - started
    if "accuracy" in sections:
        started = time.perf_counter()
        results["accuracy"] = await time_to_accuracy(plan, accuracy_plot)
        wall["accuracy"] = time.perf_counter() - started
    found = targets(plan, results)
    results["targets"] = [dataclasses.asdict(target) for target in found]
    if found:
        print_table(
            "Targets of issues 9 and 20 (ratios from this run)",
            ["target", "limit", "measured", "met"],
            [[t.name, f"{t.limit:g}", t.text, "yes" if t.met else "NO"] for t in found],
        )
    for name in ("overhead", "transfer"):
        for what, lines in results.get(name, {}).get("profiles", {}).items():
            print(f"\nProfile of {what} (cProfile, by own time):")
            print("\n".join(lines))
    results["wall_s"] = wall
    results["machine"]["load_average_after"] = os.getloadavg()
    print(f"\nSeconds per section: {', '.join(f'{name} {seconds:.0f}' for name, seconds in wall.items())}")
    return results


_CHILDREN: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "coordinator": coordinator_process,
    "flower-server": flower_server,
    "flower-client": flower_client,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast version (CI's smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument(
        "--profile", action="store_true", help="profile the coordinator and a worker in extra runs (cProfile)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per worker and in the plain loop (default: 1)")
    parser.add_argument(
        "--max-processes", type=int, help="more workers than this are hosted several to a process (default: 10)"
    )
    parser.add_argument("--per-host", type=int, help="workers per host process above --max-processes (default: 25)")
    parser.add_argument(
        "--walkthrough-rounds",
        type=int,
        help="rounds of each walkthrough run (default: 40, the demo's; 3 with --quick)",
    )
    parser.add_argument(
        "--accuracy-plot", type=Path, metavar="PNG", help="draw the accuracy section's curves to this PNG file"
    )
    parser.add_argument(
        "--flower-python",
        metavar="PYTHON",
        help="run Flower's processes under this interpreter: a venv with flwr and syncfed (pip install -e .),"
        " so Flower stays out of syncfed's own venv (default: this Python, where flwr imports)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] == "host":  # internal: serve several workers in this process
        spec = json.loads(arguments[1])
        if spec["profile"] is not None:  # stopped like Ctrl-C, so the profile gets written
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(host(spec["workers"], spec["threads"], spec["profile"]))
        return 0
    if arguments and arguments[0] in _CHILDREN:  # internal: one side of a run, in a process of its own
        print(RESULT + json.dumps(_CHILDREN[arguments[0]](json.loads(arguments[1]))), flush=True)
        return 0
    parser = build_parser()
    args = parser.parse_args(arguments)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    plan = QUICK if args.quick else FULL
    overrides = {
        "threads": args.threads,
        "max_processes": args.max_processes,
        "per_host": args.per_host,
        "walkthrough_rounds": args.walkthrough_rounds,
        "flower_python": args.flower_python,
    }
    plan = dataclasses.replace(plan, **{name: value for name, value in overrides.items() if value is not None})
    started = time.perf_counter()
    try:
        results = asyncio.run(run(plan, sections, args.profile, args.accuracy_plot))
    except KeyboardInterrupt:
        print("bench.py: stopped", file=sys.stderr)
        return 130
    load = os.getloadavg()[0]
    print(f"Done in {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs (load average {load:.1f}).")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
