"""Progress lines during a round: steps done / total, img/s and ETA at most once per interval, never per step,
and the training itself unchanged by them."""

import torch

from fl_ietagc.runs.progress import RoundProgress, StepProgress, duration
from tests.test_trainer import CFG, make_trainer


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_line_per_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    p = StepProgress("client p1 round 3", total=400, images_per_step=32, every_s=20, write=lines.append, clock=clock)
    for step in range(1, 401):  # 0.125 s per step: 50 s in all
        clock.t += 0.125
        p.update(step)
    assert lines == [
        "client p1 round 3: step 160/400 (40%), 256.0 img/s, ETA 30s",
        "client p1 round 3: step 320/400 (80%), 256.0 img/s, ETA 10s",
    ]  # none at 400: the round ends
    p2 = StepProgress("c", total=10_000, images_per_step=8, every_s=20, write=lines.append, clock=clock)
    clock.t += 30
    p2.update(100)
    assert lines[-1] == "c: step 100/10000 (1%), 26.7 img/s, ETA 49m30s"


def test_round_lines_at_most_once_a_minute_and_always_the_last():
    clock, lines = Clock(), []
    p = RoundProgress("[default-s0] training", total=40, start=10, write=lines.append, clock=clock)
    for r in range(11, 41):  # a resumed run: rounds 11-40 at 25 s each; the rate counts only this call's rounds
        clock.t += 25
        p.update(r)
    assert lines[0] == "[default-s0] training: round 13/40, 25.0 s per round, ETA 11m15s"
    assert [int(line.split("round ")[1].split("/")[0]) for line in lines] == [13, 16, 19, 22, 25, 28, 31, 34, 37, 40]
    assert lines[-1] == "[default-s0] training: round 40/40, 25.0 s per round"
    lines = []
    q = RoundProgress("[x] evaluating", total=3, write=lines.append, clock=clock)
    q.update(0)  # nothing done yet: nothing to say
    clock.t += 1
    q.update(3)
    assert lines == ["[x] evaluating: round 3/3, 0.3 s per round"]


def test_duration_text():
    assert [duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_the_trainer_reports_every_step_count_and_trains_bit_identically():
    seen = []

    class Spy(StepProgress):
        def update(self, done):
            seen.append((self.total, done))
            super().update(done)

    quiet, _ = make_trainer(CFG)
    a = quiet.run(epochs=1, seed=3)
    reported, _ = make_trainer(CFG)
    b = reported.run(epochs=1, seed=3, progress=lambda total: Spy("t", total, CFG.batch_size, every_s=1e9))
    assert seen == [(6, s) for s in range(1, 7)]  # 6 steps; the report only counts
    for (k, v), w in zip(quiet.model.state_dict().items(), reported.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert (a.mean_loss, a.kept, a.skipped) == (b.mean_loss, b.kept, b.skipped)
