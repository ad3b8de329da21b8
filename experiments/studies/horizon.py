"""The small-data study's horizon arithmetic: pure functions of per-round copy flags, no training, no I/O.

Input everywhere: `steps` (optimizer steps at each evaluated round, ascending) and `flags[seed][round]`, one
boolean array per seed and round (does the 1/3 rule call that generated image a copy). A variant's copy-rate
curve is the mean over seeds of each seed's rate at that round.

- `steps_to`: optimizer steps until the curve first reaches a rate (10%, 25%), linearly interpolated between the
  two evaluated rounds around the crossing; `None` ("not reached within N steps") when no evaluated round reaches
  it, never an extrapolated number. Reached at the first evaluated round: that round's steps, flagged `first`
  (the crossing lies somewhere before it: nothing was evaluated earlier).
- `rate_at`: the curve at fixed step marks (interpolated between evaluated rounds; `None` outside them).
- `quality_at_rate`: a per-round quality score (CFD) at the steps where the curve reaches a rate.
- `plateau_round`: the round at which a curve levels off (the rule below).

Intervals: hierarchical bootstrap, as the study's other intervals (resample seeds with replacement, then each
picked seed's samples at each round). A seed's resampled rate at a round with k copies among n samples is
Binomial(n, k/n) / n, exactly the distribution of the mean of n booleans drawn with replacement, so it is drawn
as one binomial (fast, same distribution). Steps-to-X per draw as above, a draw that never reaches X counts as
+infinity; the 95% interval is the draws' 2.5% quantile (`lower`) and 97.5% quantile (`higher`), so it is made of
actual draws and an upper end of +infinity reads "not reached within N steps".

Levelling off (`plateau_round`): the curve has levelled off at evaluated round r when (1) at least `window`
rounds were evaluated before r, (2) the curve at r is at least `floor` (a curve still at 0% is flat but has not
started; it has not levelled off), and (3) the 95% bootstrap interval of the rise over the last `window` rounds,
rate(r) - rate(r - window), lies within [-tolerance, +tolerance]: the last `window` rounds added less than
`tolerance`, as far as the seeds and samples can tell. Why not "the interval reaches 0": that only fails to show a
rise, and with 3 seeds whose curves rise at different times it did so at 5,200 steps on digits, where default
training copied 59% and went on to 96% by 16,000 (2026-12-07); an equivalence test has to show the rise is small.
Fewer samples or seeds widen the interval, so the rule fires later, never earlier.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP = 2000
TARGETS = (0.10, 0.25)


def _counts(flags: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(copies, samples) as (seeds, rounds) integer arrays; every seed must have every round."""
    rounds = {len(f) for f in flags}
    if not flags or len(rounds) != 1 or not rounds.pop():
        raise ValueError("flags: every seed needs the same, non-zero number of rounds")
    k = np.array([[int(np.sum(r)) for r in seed] for seed in flags])
    n = np.array([[len(r) for r in seed] for seed in flags])
    if (n < 1).any():
        raise ValueError("flags: a round without samples")
    return k, n


def curve(flags: list[list[np.ndarray]]) -> np.ndarray:
    """The copy-rate curve: the mean over seeds of each seed's rate, per round."""
    k, n = _counts(flags)
    return (k / n).mean(axis=0)


def bootstrap_curves(flags: list[list[np.ndarray]], rng: np.random.Generator, draws: int = BOOTSTRAP) -> np.ndarray:
    """(draws, rounds) resampled curves: seeds with replacement, then samples (one binomial per seed and round)."""
    k, n = _counts(flags)
    picks = rng.integers(0, len(k), (draws, len(k)))  # (draws, seeds)
    rates = rng.binomial(n[picks], k[picks] / n[picks]) / n[picks]  # (draws, seeds, rounds)
    return rates.mean(axis=1)


def crossing(steps: np.ndarray, rates: np.ndarray, target: float) -> float:
    """Steps at which `rates` first reaches `target`, linear between evaluated rounds; +inf if never."""
    steps, rates = np.asarray(steps, float), np.asarray(rates, float)
    hit = np.flatnonzero(rates >= target)
    if not len(hit):
        return math.inf
    i = hit[0]
    if i == 0:
        return float(steps[0])
    s0, s1, r0, r1 = steps[i - 1], steps[i], rates[i - 1], rates[i]
    return float(s0 + (target - r0) / (r1 - r0) * (s1 - s0))


def _interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.quantile(values, 0.025, method="lower")), float(np.quantile(values, 0.975, method="higher"))


def _none_if_inf(x: float) -> float | None:
    return None if math.isinf(x) else x


def steps_to(steps, flags, target: float, rng: np.random.Generator, draws: int = BOOTSTRAP) -> dict:
    """Steps to reach `target` copies, with its bootstrap interval; None = not reached within `budget` steps."""
    steps = np.asarray(steps, float)
    point = crossing(steps, curve(flags), target)
    boot = np.array([crossing(steps, c, target) for c in bootstrap_curves(flags, rng, draws)])
    lo, hi = _interval(boot)
    return {
        "target": target,
        "steps": _none_if_inf(point),
        "lo": _none_if_inf(lo),
        "hi": _none_if_inf(hi),
        "first": not math.isinf(point) and point == steps[0],
        "budget": float(steps[-1]),
    }


def rate_at(steps, flags, marks, rng: np.random.Generator, draws: int = BOOTSTRAP) -> list[dict | None]:
    """The curve and its bootstrap interval at each step mark (linear between evaluated rounds); None for a mark
    outside the evaluated rounds."""
    steps = np.asarray(steps, float)
    boot = bootstrap_curves(flags, rng, draws)
    mean = curve(flags)
    out = []
    for m in marks:
        if m < steps[0] or m > steps[-1]:
            out.append(None)
            continue
        at = np.array([np.interp(m, steps, c) for c in boot])
        lo, hi = _interval(at)
        out.append({"steps": float(m), "rate": float(np.interp(m, steps, mean)), "lo": lo, "hi": hi})
    return out


def quality_at_rate(steps, rates, quality, target: float) -> float | None:
    """A per-round quality score (e.g. CFD, mean over seeds) at the steps where `rates` first reaches `target`,
    linear between evaluated rounds; None when the rate is never reached."""
    x = crossing(steps, rates, target)
    return None if math.isinf(x) else float(np.interp(x, np.asarray(steps, float), np.asarray(quality, float)))


def plateau_round(
    flags, *, window: int, floor: float, tolerance: float, rng: np.random.Generator, draws: int = BOOTSTRAP
) -> int | None:
    """The first evaluated round (1-based) at which the curve has levelled off (module docstring), or None."""
    if window < 1:
        raise ValueError(f"plateau window = {window}: must be >= 1")
    if not 0 < tolerance <= 1:
        raise ValueError(f"plateau tolerance = {tolerance}: must be in (0, 1]")
    mean = curve(flags)
    boot = bootstrap_curves(flags, rng, draws)
    for r in range(window, len(mean)):  # index r = round r + 1; its rise is measured against index r - window
        if mean[r] < floor:
            continue
        lo, hi = _interval(boot[:, r] - boot[:, r - window])
        if -tolerance <= lo and hi <= tolerance:
            return r + 1
    return None


def marks_for(steps, count: int = 6) -> list[int]:
    """Step marks for the equal-steps table: `count` evaluated rounds' steps, evenly spread, the last included."""
    steps = list(steps)
    picks = np.linspace(len(steps) - 1, 0, min(count, len(steps))).round().astype(int)
    return sorted({int(steps[i]) for i in picks})


def fmt_steps(x: dict) -> str:
    """'2,150 [1,900, 2,400]', '<= 400 (first evaluation) [...]' or 'not reached within 4,000 steps'."""
    if x["steps"] is None:
        return f"not reached within {x['budget']:,.0f} steps"
    hi = f"> {x['budget']:,.0f}" if x["hi"] is None else f"{x['hi']:,.0f}"
    lead = f"<= {x['steps']:,.0f}" if x["first"] else f"{x['steps']:,.0f}"
    return f"{lead} [{x['lo']:,.0f}, {hi}]"
