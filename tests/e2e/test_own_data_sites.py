"""Own data at sites that are secured, that come and go, and that hold images: end to end over real processes.

- TLS and tokens: a project provisioned by ``python -m syncfed provision``,
  own-data workers started with its certificates and a shared token.
- A site that dies mid-run and comes back with the same data rejoins; back
  with a class the run's model lacks, it is refused with one line and the run
  goes on without it.
- Image folders of different sizes and formats per site, made to agree by
  ``--image-size``/``--channels``; without ``--channels`` the coordinator
  stops with the agreement's one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, THREADS, running_workers
from test_own_data_federation import LABEL, NORMALISATION, RECALL, final_accuracy, write_tables
from units import MS

from syncfed.net.spawn import WorkerProcess

CLI_TIMEOUT = 180_000 * MS
POLL = 50 * MS
TOKEN = b"0123456789abcdef0123456789abcdef\n"


def run_cli(*arguments: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(REPO / "run_websocket_client.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tables(tmp_path_factory.mktemp("hospitals"))


def table_worker(name: str, path: Path, *extra: str) -> tuple[str, list[str]]:
    role = ["--testing"] if name == "testing" else []
    return name, [*THREADS, "--data", f"csv:{path}", "--label-column", LABEL, *role, *extra]


def listed(workers: dict[str, WorkerProcess], *names: str) -> str:
    return ",".join(f"{name}={workers[name].uri}" for name in names)


# -- 5. TLS and tokens ------------------------------------------------------------------------------------


def test_own_data_workers_behind_tls_and_a_token_train(tables: dict[str, Path], tmp_path: Path) -> None:
    names = ("hospital_a", "hospital_b", "testing")
    project = ["[project]", 'name = "clinics"', "", "[coordinator]", 'id = "coordinator"']
    for port, name in enumerate(names, start=9001):  # provisioned ports; the workers are moved to free ones
        role = "evaluator" if name == "testing" else "trainer"
        project += ["", "[[workers]]", f'id = "{name}"', 'hosts = ["127.0.0.1"]', f"port = {port}", f'role = "{role}"']
    (tmp_path / "project.toml").write_text("\n".join(project) + "\n")
    provision = [sys.executable, "-m", "syncfed", "provision", "project.toml", "-o", "startup"]
    made = subprocess.run(provision, cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert made.returncode == 0, made.stderr
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    kit = tmp_path / "startup"

    def secured(name: str) -> tuple[str, list[str]]:
        tls = ["--tls-cert", f"{kit}/{name}/{name}.crt", "--tls-key", f"{kit}/{name}/{name}.key"]
        tls += ["--tls-ca", f"{kit}/{name}/ca.crt", "--allow-coordinator", "coordinator"]
        return table_worker(name, tables[name], *tls, "--auth-token-file", str(token))

    with running_workers([secured(name) for name in names]) as workers:
        assert all(worker.uri.startswith("wss://127.0.0.1:") for worker in workers.values())
        endpoints = ["--workers", listed(workers, *names[:2]), "--evaluator", listed(workers, "testing")]
        coordinator = kit / "coordinator"
        tls = ["--tls-ca", f"{coordinator}/ca.crt", "--tls-cert", f"{coordinator}/coordinator.crt"]
        tls += ["--tls-key", f"{coordinator}/coordinator.key"]
        rounds = ["--training-rounds", "3", "--eval-every", "3", "--no-progress"]
        done = run_cli(*endpoints, *tls, "--auth-token-file", str(token), *rounds)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == NORMALISATION.replace("3 sites", "2 sites")
        assert len(RECALL.findall(done.stdout)) == 2 and final_accuracy(done.stdout) >= 0.8

        tokenless = run_cli(*endpoints, *tls, *rounds)
        assert tokenless.returncode == 5  # WorkerUnavailable's status, as over the bundled data
        assert re.fullmatch(
            r"run_websocket_client\.py: error: worker \S+ is unavailable: sent an invalid reply:"
            r" it requires a shared token: pass --auth-token-file\n",
            tokenless.stderr,
        ), tokenless.stderr


# -- 7. A site that leaves and comes back -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(path: Path, pattern: str, process: subprocess.Popen[str], timeout: float = CLI_TIMEOUT) -> int:
    """Wait until the coordinator's output holds a line matching ``pattern``; the number of lines before it."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines()
        found = [index for index, line in enumerate(lines) if re.fullmatch(pattern, line)]
        if found:
            return found[0]
        assert process.poll() is None, f"the coordinator exited with {process.returncode}: {lines[-10:]}"
        assert time.monotonic() < deadline, f"no line {pattern!r} in time: {lines[-10:]}"
        time.sleep(POLL)


@contextlib.contextmanager
def coordinator_process(arguments: list[str], log: Path) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "run_websocket_client.py", *arguments],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30_000 * MS)


def test_a_site_that_comes_back_rejoins_unless_its_data_gained_a_class(tables: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    # Ten batches a round: half a second. The refusal came after rounds 14 and 16 of 40 here (two restarts),
    # so the run outlasts them on a machine that starts processes at half the speed.
    slow = ["--slowdown", "0.05"]
    bob = table_worker("hospital_b", tables["hospital_b"], *slow, "--port", str(port))
    relabelled = tmp_path / "hospital_b.csv"
    text = tables["hospital_b"].read_text().splitlines()
    text[1:13] = [line.rsplit(",", 1)[0] + ",borderline" for line in text[1:13]]
    relabelled.write_text("\n".join(text) + "\n")
    plan = [table_worker("hospital_a", tables["hospital_a"], *slow), table_worker("testing", tables["testing"])]
    log = tmp_path / "coordinator.out"
    with running_workers(plan) as workers, running_workers([bob]) as first:
        arguments = ["--workers", f"{listed(workers, 'hospital_a')},hospital_b={first['hospital_b'].uri}"]
        arguments += ["--evaluator", listed(workers, "testing"), "--min-workers", "1", "--reconnect-max-delay", "1"]
        arguments += ["--training-rounds", "40", "--eval-every", "100", "--no-progress"]
        with coordinator_process(arguments, log) as process:
            wait_for(log, r"Round 2/40 done in .*", process)
            os.kill(first["hospital_b"].process.pid, signal.SIGKILL)
            with running_workers([bob]):
                wait_for(log, "Worker hospital_b rejoined", process)
            with running_workers([table_worker("hospital_b", relabelled, *slow, "--port", str(port))]):
                refused = wait_for(log, r"Worker hospital_b refused: .*", process)
                done = process.wait(CLI_TIMEOUT)
    lines = log.read_text().splitlines()
    assert done == 0, lines[-10:]
    assert lines[refused] == (
        "Worker hospital_b refused: hospital_b holds class 'borderline', which the run's model does not have"
    )
    assert len([line for line in lines if line.startswith("Worker hospital_b refused")]) == 1
    later = [line for line in lines[refused:] if re.fullmatch(r"Round \d+/40 done in .*", line)]
    assert later and lines[-1].startswith("Final federated accuracy at round 40: ")


# -- 8. Image folders -----------------------------------------------------------------------------------------

#: Sites: (size, Pillow mode, file extension). bob's JPEGs are colour, the others grayscale.
IMAGE_SITES = {
    "alice": (8, "L", "png"),
    "bob": (16, "RGB", "jpg"),
    "charlie": (12, "L", "bmp"),
    "testing": (10, "L", "tif"),
}
DIGITS = (0, 1, 7)


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three digits per site, a few dozen images each, one subfolder per class, every site its own size and format."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images")
    bunch = load_digits()
    chosen = np.flatnonzero(np.isin(bunch.target, DIGITS))
    for number, (site, (size, mode, extension)) in enumerate(IMAGE_SITES.items()):
        for index in chosen[number::4][:45]:  # disjoint examples per site
            pixels = (bunch.images[index] / 16.0 * 255).round().astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR).convert(mode)
            folder = root / site / str(bunch.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.{extension}")
    return root


def image_sites(root: Path) -> list[str]:
    return [argument for site in IMAGE_SITES for argument in ("--site", f"{site}=images:{root / site}")]


def test_image_folders_of_different_sizes_and_formats_agree_with_image_size_and_channels(image_folders: Path) -> None:
    rounds = ["--training-rounds", "6", "--eval-every", "6", "--no-progress"]
    done = run_cli(*image_sites(image_folders), "--worker-args", "--image-size 8 --channels 1", *rounds)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Federated normalisation: per-channel mean and standard deviation over 3 sites"
    recall = r"Federated model: Recall per class: 0 \d+\.\d%, 1 \d+\.\d%, 7 \d+\.\d%"
    assert len([line for line in lines if re.fullmatch(recall, line)]) == 2
    assert not [line for line in lines if "Percentage numbers" in line]
    assert final_accuracy(done.stdout) >= 0.6  # chance: a third


def test_sites_whose_images_differ_in_channels_stop_the_coordinator_with_the_agreements_line(
    image_folders: Path,
) -> None:
    done = run_cli(*image_sites(image_folders), "--worker-args", "--image-size 8", "--training-rounds", "1")
    assert (done.returncode, done.stderr) == (
        4,  # IncompatibleWorkers' status
        "run_websocket_client.py: error: bob's images are 3-channel, the others 1: start it with --channels 1\n",
    )
    assert "Round 1" not in done.stdout
