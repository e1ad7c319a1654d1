"""A run's figures: seconds, bytes and CPU seconds per round, the readings they come from, and their tables.

Every figure is the median of the rounds after the first, a warm-up; MB is 10**6 bytes.
"""

from __future__ import annotations

import cProfile
import dataclasses
import io
import itertools
import os
import platform
import pstats
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MB", "Rounds", "steady", "cpu_seconds", "resident", "reset_peak", "top_lines", "print_table", "machine"]

MB = 1e6


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
