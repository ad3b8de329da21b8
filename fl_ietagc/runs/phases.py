"""Wall time per named phase of a round, for benchmarks/round_overhead.py; off (a no-op) unless enabled.

The client and server code mark their fixed-cost phases (`with phases.timed("state-save"): ...`); a benchmark
calls `enable()`, runs rounds, and reads `totals()`. Disabled, `timed` costs one attribute read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)
_enabled = False
_lock = threading.Lock()


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on
    reset()


def reset() -> None:
    with _lock:
        _totals.clear()
        _counts.clear()


@contextlib.contextmanager
def timed(name: str):
    if not _enabled:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - t0)


def since(name: str, t0: float) -> None:
    """Add the time from `t0` (time.perf_counter()) to now to `name` (for lines that should stay as they are)."""
    if _enabled:
        add(name, time.perf_counter() - t0)


def add(name: str, seconds: float) -> None:
    if _enabled:
        with _lock:
            _totals[name] += seconds
            _counts[name] += 1


def totals() -> dict[str, tuple[float, int]]:
    """{phase: (seconds, times entered)} since the last reset."""
    with _lock:
        return {k: (_totals[k], _counts[k]) for k in _totals}
