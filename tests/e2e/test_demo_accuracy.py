"""The README's demo, as a user runs it: 40 seeded rounds on digits reach 95%, and print the README's sample."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, independent_score
from safetensors.numpy import load_file
from units import MS


def evaluations(lines: list[str]) -> dict[str, list[str]]:
    """Console lines under each "Evaluation at round N/40:" heading (the final line under its own key)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith("Evaluation at round "):
            current = sections.setdefault(line, [])
        elif line.startswith("Final federated accuracy"):
            sections["final"] = [line]
            current = None
        elif current is not None and line.startswith(("Model update ", "Federated model: ")):
            current.append(line)
    return sections


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def alike(sample: str, printed: str) -> bool:
    """Whether ``printed`` is the README's ``sample`` line up to another CPU's last digits.

    The run is seeded and repeats bit for bit on one machine, but torch's
    vector code differs between CPUs (AVX-512 or AVX2, Intel or AMD), and after
    40 rounds so do the losses' last digits (0.3172 and 0.3167). The words must
    match; counts and shares may differ by 2, figures with decimals by 2%.
    """
    if NUMBER.split(sample) != NUMBER.split(printed):
        return False
    expected, got = NUMBER.findall(sample), NUMBER.findall(printed)
    return len(expected) == len(got) and all(
        abs(float(a) - float(b)) <= (0.02 * float(a) if "." in a else 2) for a, b in zip(expected, got, strict=True)
    )


def test_alike_allows_last_digits_not_other_words_or_figures() -> None:
    line = "Model update alice: Average loss: 0.3172, Accuracy: 318/360 (88.33%)"
    assert alike(line, line)
    assert alike(line, "Model update alice: Average loss: 0.3167, Accuracy: 317/360 (88.06%)")
    assert not alike(line, "Model update bob: Average loss: 0.3172, Accuracy: 318/360 (88.33%)")
    assert not alike(line, "Model update alice: Average loss: 0.3472, Accuracy: 318/360 (88.33%)")
    assert not alike(line, "Model update alice: Average loss: 0.3172, Accuracy: 312/360 (86.67%)")
    assert not alike(line, "Model update alice: Average loss: 0.3172, Accuracy: 318/360")


def readme_demo_sample() -> list[str]:
    """The indented sample under the README's "The demo trains for 40 rounds" paragraph, unindented."""
    after = (REPO / "README.md").read_text().split("The demo trains for 40 rounds", 1)[1]
    block = after.split("\n\n", 2)[1]
    return [line.removeprefix("    ") for line in block.splitlines()]


def test_readme_sample_is_read_as_evaluations() -> None:
    sample = evaluations(readme_demo_sample())
    assert list(sample) == ["Evaluation at round 1/40:", "Evaluation at round 40/40:", "final"]
    assert all(sample.values())


def test_default_demo_reaches_95_percent(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    model = tmp_path / "model.safetensors"
    started = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_websocket_client.py"),
            "--spawn-workers",
            "--metrics-out",
            str(metrics),
            "--save-model",
            str(model),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300_000 * MS,
    )
    seconds = time.perf_counter() - started
    assert completed.returncode == 0, completed.stderr
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    federated = [e for e in events if e["event"] == "eval" and e["model"] == "federated"]
    assert [e["round"] for e in federated] == [1, 11, 21, 31, 40]
    final = federated[-1]
    print(f"\ndigits demo: federated accuracy {final['accuracy']:.2%} at round 40 in {seconds:.1f} s")
    assert final["accuracy"] >= 0.95
    assert f"Final federated accuracy at round 40: {final['accuracy']:.2%}" in completed.stdout
    # The README shows this run's output: every line of its sample, under the same heading.
    printed = evaluations(completed.stdout.splitlines())
    for heading, lines in evaluations(readme_demo_sample()).items():
        missing = [line for line in lines if not any(alike(line, out) for out in printed.get(heading, []))]
        assert not missing, f"README.md's demo sample under {heading!r} is not what the demo prints: {missing}"
    # The saved model is the one that reached it: scored here with plain torch, not by the evaluator.
    correct, total = independent_score(load_file(str(model)))
    assert total == final["n"]
    assert abs(correct - final["correct"]) <= 1, f"the saved model scores {correct}/{total}, the run reported {final}"
    assert correct / total >= 0.95
