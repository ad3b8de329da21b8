"""Progress lines for long loops: steps done / total, images per second, ETA, at most one line per interval.

A round of local training takes 45-60 s on the default job and hours at paper size; without these lines a round is
silent. The check per step is one host clock read (no device synchronisation: the step count is the host's own
counter; on a GPU the rate is that of steps enqueued, which the trainer's periodic non-finite check keeps within
NONFINITE_CHECK_EVERY steps of the device).
"""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY_S = 20.0  # seconds between two lines of one loop; the first after this long too


def duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepProgress:
    """`update(done)` after each step; a line is written when `every_s` has passed since the last one (or the
    start), never for the last step (the loop's own summary follows it)."""

    def __init__(
        self,
        label: str,
        total: int,
        images_per_step: int,
        every_s: float = PROGRESS_EVERY_S,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.images_per_step, self.every_s = label, total, images_per_step, every_s
        self.write = write or (lambda line: print(line, flush=True))
        self.clock = clock
        self.start = clock()
        self.next_at = self.start + every_s
        self.lines = 0

    def update(self, done: int) -> None:
        now = self.clock()
        if now < self.next_at or done >= self.total or done <= 0:
            return
        elapsed = now - self.start
        rate = done / elapsed  # steps per second
        self.write(
            f"{self.label}: step {done}/{self.total} ({100 * done / self.total:.0f}%), "
            f"{rate * self.images_per_step:.1f} img/s, ETA {duration((self.total - done) / rate)}"
        )
        self.lines += 1
        self.next_at = now + self.every_s


class RoundProgress:
    """`update(done)` after each of `total` rounds (trained, or evaluated) of a loop that runs for many
    minutes with no output of its own (a study's worker): one line per `every_s` at most, with the rate and ETA,
    and always one for the last round. `start` rounds were done before (a resumed run): the rate counts only this
    call's."""

    def __init__(
        self,
        label: str,
        total: int,
        start: int = 0,
        every_s: float = 60.0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.first, self.every_s = label, total, start, every_s
        self.write = write or (lambda line: print(line, flush=True))
        self.clock = clock
        self.start = clock()
        self.next_at = self.start + every_s

    def update(self, done: int) -> None:
        now = self.clock()
        if (now < self.next_at and done < self.total) or done <= self.first:
            return
        per_item = (now - self.start) / (done - self.first)
        eta = "" if done >= self.total else f", ETA {duration(per_item * (self.total - done))}"
        self.write(f"{self.label}: round {done}/{self.total}, {per_item:.1f} s per round{eta}")
        self.next_at = now + self.every_s
