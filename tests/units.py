"""The tests' unit of time: every wait is a multiple of :data:`MS`, as in websockets' tests.

A machine slower than the one the waits were sized on scales them all at once,
without editing a test: ``SYNCFED_TEST_TIME_SCALE=3 python -m pytest``. Only the
tests' own waits and bounds are written in it; durations that are the subject
of a test (a flag's value, a protocol default) stay literal.
"""

from __future__ import annotations

import math
import os

__all__ = ["MS", "TIME_SCALE"]


def _time_scale() -> float:
    text = os.environ.get("SYNCFED_TEST_TIME_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"SYNCFED_TEST_TIME_SCALE must be a positive number, not {text!r}")
    return scale


#: How much longer than written every wait is (1 unless SYNCFED_TEST_TIME_SCALE says otherwise).
TIME_SCALE = _time_scale()

#: One millisecond, scaled.
MS = 0.001 * TIME_SCALE
