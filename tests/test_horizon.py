"""The small-data study's horizon (experiments/studies/horizon.py, horizon_report.py), its sweep plan (sweep.py),
its Fashion-MNIST and GPU sizes and the mechanism hook of run_iet_loop (issue 23)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.studies import horizon as H
from experiments.studies import small_data as sd
from experiments.studies import sweep
from fl_ietagc.settings.config import ConfigError, parse_config


def planted(*seeds, n=10):
    """flags[seed][round] from per-round rates given as 0/1 (all samples alike: the bootstrap cannot move them)."""
    return [[np.full(n, bool(r)) for r in seed] for seed in seeds]


def rng():
    return np.random.default_rng(0)


def test_steps_to_interpolates_between_evaluated_rounds_with_an_exact_interval():
    steps = [100, 200, 300, 400]
    flags = planted([0, 0, 1, 1], [0, 0, 1, 1])
    assert H.steps_to(steps, flags, 0.10, rng()) == {
        "target": 0.10,
        "steps": 210.0,
        "lo": 210.0,
        "hi": 210.0,
        "first": False,
        "budget": 400.0,
    }
    x = H.steps_to(steps, flags, 0.25, rng())
    assert (x["steps"], x["lo"], x["hi"]) == (225.0, 225.0, 225.0)
    assert H.fmt_steps(x) == "225 [225, 225]"
    # fractional rates: 0, 20%, 60% -> 10% at 150 steps, 25% at 200 + 0.05 / 0.4 x 100
    mixed = [[np.r_[np.ones(k), np.zeros(10 - k)].astype(bool) for k in (0, 2, 6)]]
    assert H.crossing([100, 200, 300], H.curve(mixed), 0.10) == 150.0
    assert H.steps_to([100, 200, 300], mixed, 0.25, rng())["steps"] == 212.5


def test_seeds_that_differ_give_the_interval_of_the_resampled_seeds():
    # seed A copies from round 2, seed B from round 3: mean curve 0, 50%, 100%; a bootstrap draw is AA, AB or BB
    x = H.steps_to([100, 200, 300], planted([0, 1, 1], [0, 0, 1]), 0.25, rng())
    assert (x["steps"], x["lo"], x["hi"]) == (150.0, 125.0, 225.0)  # AB, AA, BB


def test_not_reached_is_said_never_extrapolated():
    x = H.steps_to([100, 200, 300], planted([0, 0, 0], [0, 0, 0]), 0.10, rng())
    assert x["steps"] is None and x["lo"] is None and x["hi"] is None and x["budget"] == 300.0
    assert H.fmt_steps(x) == "not reached within 300 steps"
    # one seed never reaches it: the point is reached, the interval's upper end is beyond the budget
    x = H.steps_to([100, 200], planted([0, 1], [0, 0]), 0.25, rng())
    assert (x["steps"], x["lo"], x["hi"]) == (150.0, 125.0, None)
    assert H.fmt_steps(x) == "150 [125, > 200]"
    # reached by the first evaluation: its steps, flagged (nothing earlier was evaluated)
    x = H.steps_to([100, 200], planted([1, 1]), 0.25, rng())
    assert x["first"] and H.fmt_steps(x) == "<= 100 [100, 100]"


def test_rate_at_step_marks_and_quality_at_equal_copy_rate():
    flags = planted([0, 1, 1], [0, 0, 1])
    marks = H.rate_at([100, 200, 300], flags, [50, 100, 150, 200, 300, 400], rng())
    assert marks[0] is None and marks[-1] is None  # outside the evaluated rounds
    assert marks[1] == {"steps": 100.0, "rate": 0.0, "lo": 0.0, "hi": 0.0}
    assert marks[2] == {"steps": 150.0, "rate": 0.25, "lo": 0.0, "hi": 0.5}
    assert marks[3] == {"steps": 200.0, "rate": 0.5, "lo": 0.0, "hi": 1.0}
    assert H.quality_at_rate([100, 200, 300], [0.0, 0.2, 0.6], [100.0, 80.0, 60.0], 0.25) == 77.5
    assert H.quality_at_rate([100, 200, 300], [0.0, 0.0, 0.0], [100.0, 80.0, 60.0], 0.25) is None
    assert H.marks_for([400 * i for i in range(1, 11)]) == [400, 1200, 2000, 2400, 3200, 4000]
    assert H.marks_for([4, 8]) == [4, 8]


def test_the_plateau_rule():
    level = dict(floor=0.25, tolerance=0.05)
    # a rise of 100% is no plateau; no rise at >= the floor is (round 3: its rise over 1 round is 0)
    assert H.plateau_round(planted([0, 1, 1, 1]), window=1, rng=rng(), **level) == 3
    assert H.plateau_round(planted([0, 1, 1, 1]), window=2, rng=rng(), **level) == 4
    # flat at 0%: not started, not levelled off
    assert H.plateau_round(planted([0, 0, 0, 0]), window=1, rng=rng(), **level) is None
    # a steady, sampled rise (0, 30, 60, 90% of 256) never levels off
    rising = [[np.arange(256) < 256 * f for f in (0.0, 0.3, 0.6, 0.9)]]
    assert H.plateau_round(rising, window=1, rng=rng(), **level) is None
    # sampled noise around a flat 50% (3 seeds x 1,024 samples): levelled off at the first round the window allows
    gen = np.random.default_rng(1)
    flat = [[gen.random(1024) < 0.5 for _ in range(4)] for _ in range(3)]
    assert H.plateau_round(flat, window=2, rng=rng(), **level) == 3
    # ... and with 2 x 256 samples the noise alone is wider than +-5 points: not shown to be level, unless the
    # tolerance is wider
    small = [[gen.random(256) < 0.5 for _ in range(4)] for _ in range(2)]
    assert H.plateau_round(small, window=2, rng=rng(), **level) is None
    assert H.plateau_round(small, window=2, rng=rng(), floor=0.25, tolerance=0.15) == 3
    # seeds that rise at different times: one seed still flat while the others climb 40 points. The rise is not
    # shown to be small (the draws of the flat seed alone reach 0, which the rule must not take for a plateau)
    late = [[np.arange(256) < 256 * f for f in curve] for curve in ((0.3, 0.5, 0.7, 0.9), (0.3, 0.5, 0.7, 0.9))]
    late.append([np.arange(256) < 256 * 0.3 for _ in range(4)])
    assert H.plateau_round(late, window=2, rng=rng(), **level) is None
    with pytest.raises(ValueError):
        H.plateau_round(flat, window=0, rng=rng(), **level)
    with pytest.raises(ValueError):
        H.plateau_round(flat, window=1, rng=rng(), floor=0.25, tolerance=0.0)


def test_the_one_third_rule_of_the_mechanism_is_the_studys():
    d2 = np.array([[0.0, 4.0], [1.0, 100.0], [1.0, 9.0], [1.0, 4.0]])
    assert sd.one_third(d2).tolist() == sd.flags(d2)["one_third"].tolist() == [True, True, False, False]


def test_horizon_settings_sizes_and_budget(tmp_path):
    assert sd.resolve_size("full", ["size=fashion16", "seeds=0"]) == ("fashion16", ["seeds=0"])
    assert sd.resolve_size("smoke", ["size=horizon"]) == ("horizon-smoke", [])
    assert sd.resolve_size("smoke", ["size=digits"]) == ("smoke", [])
    with pytest.raises(ConfigError, match=r"--set size=cifar: must be one of digits, horizon"):
        sd.resolve_size("full", ["size=cifar"])
    size, extra = sd.apply_settings(sd.SIZES["full"], ["max-steps=4100"])
    assert sd.with_budget(size, extra).rounds == 11  # 400 steps per round: the budget rounded up to a round
    assert sd.with_budget(sd.SIZES["horizon"], {}).rounds == 40
    with pytest.raises(ConfigError, match=r"--set until-plateau=1: needs the default variant"):
        sd.apply_settings(sd.SIZES["full"], ["until-plateau=1", "variants=iet,iet-agc"])
    with pytest.raises(ConfigError, match=r"--set until-plateau=2: must be 0 or 1"):
        sd.apply_settings(sd.SIZES["full"], ["until-plateau=2"])
    with pytest.raises(ConfigError, match=r"--set sweep=k,depth: must be 'all' or distinct knobs among k, lambda"):
        sd.apply_settings(sd.SIZES["full"], ["sweep=k,depth"])
    with pytest.raises(ConfigError, match=r"--set speed: not a study setting"):
        sd.apply_settings(sd.SIZES["full"], ["speed=1"])
    assert sd.study_dir_for(tmp_path, "fashion16", ["data-root=/a/b"]).name == "small-data-fashion16-data-root_a_b"


def test_the_sweep_plan():
    size, _ = sd.apply_settings(sd.SIZES["full"], ["sweep=all"])
    points = sweep.sweep_plan(size, sweep.parse_knobs(size.sweep))
    runs = sweep.runs_of(points)
    assert [p.tag for p in runs] == [
        "default",
        "iet-agc",
        "iet-agc-k4",
        "iet-agc-k8",
        "iet-agc-lambda1.5",
        "iet-agc-lambda3",
        "iet-agc-epochs100",
        "iet-agc-epochs400",
        "ret-shift1",
    ]
    by = {p.tag: p for p in runs}
    # K = 8 on 32 images: shards of 4, batch 4, epochs scaled so a round keeps its 400 steps
    k8 = by["iet-agc-k8"].size
    assert (k8.clients, k8.batch_size, k8.local_epochs, k8.rounds) == (8, 4, 50, 10)
    assert {sweep.steps_per_round(by[t].size) for t in ("iet-agc", "iet-agc-k4", "iet-agc-k8")} == {400}
    # every point to the same 4,000-step budget
    assert all(sweep.steps_per_round(p.size) * p.size.rounds == 4000 for p in runs)
    assert (by["iet-agc-epochs100"].size.rounds, by["iet-agc-epochs400"].size.rounds) == (20, 5)
    assert by["ret-shift1"].variant == "ret" and dict(by["ret-shift1"].extra) == {"taa-max-shift": 1}
    assert [p.value for p in points if p.knob == "k"] == [2, 4, 8]
    assert [p.tag for p in points if p.knob == "lambda"] == ["iet-agc-lambda1.5", "iet-agc", "iet-agc-lambda3"]
    big = sd.apply_settings(sd.SIZES["full"], ["image-size=32", "max-steps=8000"])[0]
    plan = sweep.sweep_plan(big, ("ret",))
    assert dict(plan[-1].extra) == {"taa-max-shift": 4} and plan[-1].size.rounds == 20
    assert sweep.parse_knobs("all") == ("k", "lambda", "epochs", "ret")


def test_a_sweep_dry_run_validates_every_point_and_writes_nothing(tmp_path, capsys):
    assert sd.run_small_data("full", tmp_path, settings=["sweep=k,ret", "sweep-seeds=3"], dry_run=True) is None
    out = capsys.readouterr().out
    assert "dry run: 15 runs (5 points x 3 seed(s))" in out and "iet-agc-k8-s2" in out and "ret-shift1-s0" in out
    assert not any(tmp_path.iterdir())


FASHION = Path(sd.FASHION_ROOT)


def fashion_root(tmp_path) -> Path:
    """Debian's dataset-fashion-mnist where installed; elsewhere the same idx layout planted here (random 28x28
    images: 60 to train, 10,000 held out, as the real test split), so the size is validated and loaded anyway."""
    if FASHION.is_dir():
        return FASHION
    from tests.test_bad_data import fashion_dir

    return fashion_dir(tmp_path, n_train=60, n_test=10_000, gz=False)


def test_the_fashion_size_validates_at_16px(tmp_path):
    size, extra = sd.apply_settings(sd.SIZES["fashion16"], [f"data-root={fashion_root(tmp_path)}"])
    jobs = sd.configs(sd.with_budget(size, extra), extra, tmp_path)
    assert {cfg.dataset for _, _, cfg, _ in jobs} == {"fashion-mnist"} and len(jobs) == 15
    from fl_ietagc.data.datasets import load_splits

    sp = load_splits(jobs[0][2])
    assert tuple(sp.train.images.shape) == (32, 1, 16, 16) and len(sp.heldout) == 10_000


def test_the_fashion_size_without_its_files_is_one_line(tmp_path):
    size, extra = sd.apply_settings(sd.SIZES["fashion16"], [f"data-root={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"^\[default-s0\] data-root = .*none.*: path does not exist"):
        sd.configs(size, extra, tmp_path / "study")


def test_the_gpu_size_and_its_derived_run_time(tmp_path, capsys):
    size = sd.SIZES["gpu-fashion32"]
    cfg = parse_config(size.run_config(0))
    assert (cfg.preset, cfg.image_size, cfg.precision, cfg.channels_last, cfg.compile) == (
        "ddpm-cifar10",
        32,
        "bf16",
        True,
        True,
    )
    from fl_ietagc.training.models import downsample_factor

    assert cfg.image_size % downsample_factor(cfg.preset) == 0
    e = sd.gpu_estimate(size)
    assert e["train_images"] == 4 * 20 * 100 * 128 and e["samples"] == 17_408
    assert round(e["train_s"]) == 275 and round(e["sample_s"]) == 38 and round(e["total_s"]) == 360
    if not torch.cuda.is_available() or not FASHION.is_dir():  # the estimate is printed before the checks refuse
        with pytest.raises(ConfigError, match=r"^\[default-s0\] "):
            sd.run_small_data("full", tmp_path, settings=["size=gpu-fashion32"], dry_run=True)
        assert "expected on one H100 (UNMEASURED, from benchmarks/RESULTS.md): 6.0 min" in capsys.readouterr().out


def test_the_mechanism_hook_sees_each_clients_weights_before_averaging_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    from fl_ietagc.loops.iet import run_iet_loop
    from fl_ietagc.runs.rundir import RunDir

    size = sd.dataclasses.replace(sd.SIZES["smoke"], client_samples=3, sample_steps=2, rounds=2, local_epochs=1)
    cfg = parse_config({**size.run_config(0), "output-dir": str(tmp_path), "run-name": "r"})
    seen = []
    record = sd.client_recorder(tmp_path / "r", cfg, size)

    def hook(server_round, clients, averaged):
        seen.append(
            (
                server_round,
                [(np.asarray(s).copy(), {k: v.clone() for k, v in w.items()}) for s, w in clients],
                {k: v.clone() for k, v in averaged.items()},
            )
        )
        record(server_round, clients, averaged)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with_hook = run_iet_loop(cfg, 2, torch.device("cpu"), RunDir.create(str(tmp_path), "r", ""), on_round=hook)
        without = run_iet_loop(cfg, 2, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert [r for r, _, _ in seen] == [1, 2]  # after round 1 the hook sampled: round 2 trained on unchanged
    (_, clients, averaged) = seen[-1]
    assert sorted(np.concatenate([s for s, _ in clients]).tolist()) == list(range(16))
    for k, v in averaged.items():  # equal shards: the average is the mean of the clients' weights
        assert torch.allclose(v, (clients[0][1][k].float() + clients[1][1][k].float()) / 2, atol=1e-6), k
        assert torch.equal(v, with_hook.net[k])
    for k, v in with_hook.net.items():  # the hook only reads: the run's weights are those of a run without it
        assert torch.equal(v, without.net[k]), k
    rec = sd.client_round(RunDir(tmp_path / "r"), 1)
    assert rec["round"] == 1 and len(rec["clients"]) == 2
    assert all(len(c["whole"]) == len(c["own"]) == len(c["nearest_in_own"]) == 3 for c in rec["clients"])
    assert sd.client_round(RunDir(tmp_path / "r"), 3) is None


@pytest.mark.slow
def test_the_horizon_smoke_study_end_to_end(tmp_path, monkeypatch):
    """Default training first, the plateau found, iet-agc to it; horizon.md, the mechanism and the figures."""
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    s = sd.run_small_data("smoke", tmp_path, workers=2, settings=["size=horizon", "seeds=0"], progress=False)
    study = tmp_path / "small-data-horizon-smoke-seeds0"
    h = s["horizon"]
    assert h["plateau"]["budget_steps"] == 32.0 and h["plateau"]["round"] is not None
    horizon_rounds = h["plateau"]["round"]
    assert len(s["variants"]["iet-agc"]["curve"]) == len(s["variants"]["default"]["curve"]) == horizon_rounds
    assert len(h["default_to_budget"]["steps"]) == 8 > horizon_rounds
    assert set(h["variants"]["default"]["steps_to"]) == {"0.1", "0.25"}
    assert [r["round"] for r in s["mechanism"]["iet-agc"]] == list(range(1, horizon_rounds + 1))
    text = (study / "horizon.md").read_text()
    assert text.startswith("SMOKE RUN") and "steps to 25% copies" in text and "Mechanism, iet-agc" in text
    for name in ("copy_rate_vs_steps", "quality_vs_copy_rate", "mechanism"):
        assert (study / "figures" / f"{name}.png").stat().st_size > 5_000
    assert os.path.isfile(study / "results.json")


def test_the_sweep_table_and_figure_from_planted_points(tmp_path):
    def point(knob, value, variant, steps):
        flags = planted(steps)
        return {
            "knob": knob,
            "value": value,
            "variant": variant,
            "run": variant,
            "clients": 2,
            "batch_size": 16,
            "local_epochs": 200,
            "rounds": 3,
            "agc_lambda": 2.0,
            "extra": {},
            "final": float(steps[-1]),
            "cfd": 100.0 + len(knob),
            "steps_to": {f"{t:g}": H.steps_to([400, 800, 1200], flags, t, rng()) for t in H.TARGETS},
        }

    summary = {
        "knobs": ["k", "ret"],
        "seeds": [0],
        "pipeline_check": False,
        "quality": {"num_images": 64, "classifier_accuracy": 0.95, "held-out real": {"cfd": 5.25}},
        "points": [
            point("baseline", "", "default", [0, 1, 1]),
            point("base", "", "iet-agc", [0, 0, 1]),
            point("k", 2, "iet-agc", [0, 0, 1]),
            point("k", 4, "iet-agc", [0, 0, 0]),
            point("ret", 1, "ret", [0, 0, 0]),
        ],
    }
    table = sweep.to_markdown(summary)
    assert "| k | 4 | iet-agc | 2 | 16 | 200 | 3 | 2 | not reached within 1,200 steps |" in table
    assert table.splitlines()[0].endswith("| copy rate at the end | CFD at the end |") and "| 0.0% | 101.0 |" in table
    assert "held-out real images score 5.2" in table
    assert "| baseline | - | default |" in table and "| 500 [500, 500] |" in table  # 400 + 0.25 x 400
    assert sweep.figure(summary, tmp_path).stat().st_size > 10_000


@pytest.mark.slow(minutes=1.5)
def test_a_smoke_sweep_scores_every_point_in_the_studys_classifier(tmp_path, monkeypatch):
    """The sweep end to end (one knob, three runs): every point's copy rates and its CFD at the budget, held-out
    real images scoring better than any model trained for seconds."""
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    s = sd.run_small_data("smoke", tmp_path, workers=2, settings=["sweep=ret"], progress=False)
    assert [p["run"] for p in s["points"]] == ["default", "iet-agc", "ret-shift1"]
    real = s["quality"]["held-out real"]["cfd"]
    assert all(p["cfd"] is not None and p["cfd"] > real for p in s["points"])
    study = next(tmp_path.glob("small-data-smoke-sweep*"))
    text = (study / "sweep.md").read_text()
    assert text.startswith("SMOKE RUN") and f"held-out real images score {real:.1f}" in text
    assert json.loads((study / "sweep.json").read_text())["points"][2]["cfd"] == s["points"][2]["cfd"]
