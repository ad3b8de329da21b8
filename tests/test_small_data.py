"""The small-data memorization study (experiments/studies/small_data.py) and its offline quality score."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.studies import small_data as sd
from experiments.studies.pipeline_check import NOTE, is_labelled
from fl_ietagc.data.datasets import load_splits
from fl_ietagc.evaluation import classifier_quality as cq
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, parse_config


def test_copy_rules_on_planted_distances():
    # squared distances to the k = 4 nearest training images, ascending
    d2 = np.array(
        [
            [0.0, 4.0, 4.0, 4.0],  # exact copy: every rule
            [1.0, 100.0, 100.0, 100.0],  # l2 ratio 0.1 < 1/3; MQ 1/75.25 < 0.2; Carlini 1/(0.5*7.75) < 1
            [1.0, 4.0, 4.0, 4.0],  # l2 ratio 1/2: not 1/3; MQ 1/3.25 = 0.31; Carlini 1/(0.5*1.75) > 1
            [4.0, 4.0, 4.0, 4.0],
        ]
    )  # equidistant: none
    f = sd.flags(d2)
    assert f["one_third"].tolist() == [True, True, False, False]
    assert f["mq_0.2"].tolist() == [True, True, False, False]
    assert f["mq_0.3"].tolist() == [True, True, False, False]
    assert f["carlini"].tolist() == [True, True, False, False]
    d2[2] = [1.0, 9.0, 9.0, 9.0]  # l2 ratio exactly 1/3 is not < 1/3; MQ 1/7 < 0.2; Carlini 1/(0.5*2.5) < 1
    f = sd.flags(d2)
    assert f["one_third"][2] == False and f["mq_0.2"][2] == True and f["carlini"][2] == True  # noqa: E712


def test_bootstrap_rate_is_the_mean_over_seeds_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    assert sd.bootstrap_rate([np.ones(10), np.ones(30)], rng) | {"per_seed": None} == {
        "rate": 1.0,
        "lo": 1.0,
        "hi": 1.0,
        "per_seed": None,
    }
    seeds = [np.r_[np.ones(20), np.zeros(80)], np.r_[np.ones(40), np.zeros(60)], np.r_[np.ones(30), np.zeros(70)]]
    b = sd.bootstrap_rate(seeds, rng)
    assert b["rate"] == pytest.approx(0.3) and b["per_seed"] == [0.2, 0.4, 0.3]
    assert 0.15 < b["lo"] < 0.3 < b["hi"] < 0.45  # seeds differ: the interval reflects it


def test_frechet_distance_and_precision_recall_math():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert cq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, 2.0, 0.0])
    assert cq.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-9)  # same covariance: |mu_a - mu_b|^2
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))  # |mu|^2 + (2 - 1)^2 tr S
    assert cq.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-9)
    assert cq.precision_recall(a[:500], a[:500]) == (1.0, 1.0)
    assert cq.precision_recall(a[:500], a[:500] + 100.0) == (0.0, 0.0)
    p, r = cq.precision_recall(a[:500], a[:500] * 0.05)  # generated collapsed near the mean: precise, no recall
    assert p == 1.0 and r < 0.2


@pytest.fixture(scope="module")
def digits8():
    return load_splits(parse_config({"dataset": "digits", "image-size": 8}))


def test_the_quality_classifier_is_deterministic_cached_and_ranks_real_above_copies_above_noise(
    digits8, tmp_path, monkeypatch
):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path))
    sp = digits8
    clf = cq.classifier_for("digits", sp.train.images, sp.train.labels, sp.heldout.images, sp.heldout.labels)
    assert clf.accuracy > 0.9  # a real digit classifier, or its features mean nothing
    files = list((tmp_path / "classifiers").glob("*.pt"))
    assert len(files) == 1
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "other"))  # trained again from scratch: same weights
    again = cq.classifier_for("digits", sp.train.images, sp.train.labels, sp.heldout.images, sp.heldout.labels)
    for k, v in clf.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path))
    files[0].write_bytes(b"not a checkpoint")  # a corrupt cache file is named, never unpickled
    with pytest.raises(ValueError, match="cached quality classifier"):
        cq.classifier_for("digits", sp.train.images, sp.train.labels, sp.heldout.images, sp.heldout.labels)

    ref = again.features(sp.train.images)
    n = len(sp.heldout.images)
    gen = torch.Generator().manual_seed(0)
    copies = sp.train.images[:32][torch.randint(0, 32, (n,), generator=gen)]  # a model that copies 32 images
    noise = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)  # an untrained model's output
    real, copied, noisy = (cq.score(again, x, ref) for x in (sp.heldout.images, copies, noise))
    assert real["cfd"] < copied["cfd"] < noisy["cfd"]
    assert real["recall"] > copied["recall"] > noisy["recall"]  # copying 32 images covers few modes
    assert copied["precision"] == 1.0 and noisy["precision"] < 0.05


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"--set clients=1: must be >= 2"):
        sd.apply_settings(sd.SIZES["smoke"], ["clients=1"])
    with pytest.raises(ConfigError, match=r"--set train-imgs: not a study setting .* nor a run-config key"):
        sd.apply_settings(sd.SIZES["smoke"], ["train-imgs=3"])
    with pytest.raises(ConfigError, match=r"--set seeds=1,1: must be distinct integers"):
        sd.apply_settings(sd.SIZES["smoke"], ["seeds=1,1"])
    with pytest.raises(ConfigError, match=r"--set lr=fast: must be float"):
        sd.apply_settings(sd.SIZES["smoke"], ["lr=fast"])
    size, extra = sd.apply_settings(sd.SIZES["smoke"], ["train-images=24", "ema-decay=0.99", "seeds=3,4"])
    assert size.train_images == 24 and size.seeds == (3, 4) and extra == {"ema-decay": 0.99}
    with pytest.raises(ConfigError, match=r"--set variants=iet,fedavg: must be distinct names among default"):
        sd.apply_settings(sd.SIZES["smoke"], ["variants=iet,fedavg"])
    size, extra = sd.apply_settings(sd.SIZES["smoke"], ["variants=default,ret", "taa-max-shift=1"])
    jobs = sd.configs(size, extra, tmp_path)  # RET's own keys go to the ret runs only (elsewhere they are refused)
    assert [(name, cfg.taa_max_shift) for name, _, cfg, _ in jobs] == [("default", 4), ("ret", 1)] * 2
    size, _ = sd.apply_settings(sd.SIZES["smoke"], ["batch-size=64"])
    with pytest.raises(
        ConfigError,
        match=r"^\[default-s0\] num-clients = 2: 16 training images cannot give 2 "
        r"shards of at least 64",
    ):
        sd.configs(size, {}, tmp_path)  # 16 images cannot fill a batch of 64: found before any run starts
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    summary = sd.run_small_data("smoke", out, workers=2, progress=False)
    return summary, out / "small-data-smoke"


def test_the_smoke_study_trains_every_variant_at_equal_steps_and_reports_each_rule(smoke_study):
    summary, study = smoke_study
    size = sd.SIZES["smoke"]
    assert list(summary["variants"]) == list(sd.VARIANTS)
    steps = {name: [c["steps"] for c in v["curve"]] for name, v in summary["variants"].items()}
    per_round = size.clients * size.local_epochs * ((size.train_images // size.clients) // size.batch_size)
    assert all(s == [per_round * r for r in range(1, size.rounds + 1)] for s in steps.values()), steps
    for name in sd.VARIANTS:
        for seed in size.seeds:
            run = RunDir(study / "runs" / f"{name}-s{seed}")
            assert run.read_status()["status"] == "completed"
            for r in range(1, size.rounds + 1):
                blob = np.load(run.path / "eval" / f"round_{r:04d}.npz")
                n = size.samples if r == size.rounds else size.round_samples
                assert blob["samples"].dtype == np.uint8 and blob["samples"].shape == (n, 1, 8, 8)
                assert blob["index"].shape == blob["d2"].shape == (n, size.train_images)
                assert (np.diff(blob["d2"], axis=1) >= 0).all()
        assert set(summary["variants"][name]["final"]) == set(sd.RULES)
    assert RunDir(study / "runs" / "agc-s0").read_config()["agc"] is True
    assert RunDir(study / "runs" / "ret-s1").read_config()["ret-every"] == 1
    assert RunDir(study / "runs" / "default-s0").read_config()["matched_federated_clients"] == size.clients
    # the null: held-out digits are no copies by the 1/3 rule
    assert summary["null"]["one_third"]["rate"] == 0.0
    q = summary["quality"]["rows"]
    assert set(q) == {*sd.VARIANTS, "held-out real", "untrained"}
    assert q["held-out real"]["cfd"] < q["untrained"]["cfd"]
    table = (study / "comparison.md").read_text()
    assert table.count("\n| ") == len(sd.VARIANTS) + 2 and "not FID" in table
    assert table.startswith("| variant (SMOKE RUN: pipeline check, not a finding) |")  # a pipeline check, so said
    assert table.rstrip().endswith(NOTE)
    assert all(is_labelled(p) for p in study.rglob("*.png")) and (study / "figures" / "samples.png").is_file()
    assert (study / "figures" / "copy_rate_vs_steps.png").stat().st_size > 10_000
    assert (study / "figures" / "similar_pairs.png").stat().st_size > 5_000
    assert json.loads((study / "results.json").read_text())["variants"].keys() == summary["variants"].keys()


def test_a_second_study_call_keeps_trained_runs_and_cached_evaluations(smoke_study, capfd):
    _, study = smoke_study
    files = sorted((study / "runs").glob("*/checkpoints/final.pt")) + sorted((study / "runs").glob("*/eval/*.npz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    again = sd.run_small_data("smoke", study.parent, workers=1, progress=True)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    out = capfd.readouterr().out  # the workers' progress lines: every run's last evaluated round, none trained
    rounds = sd.SIZES["smoke"].rounds
    for name in sd.VARIANTS:
        for seed in sd.SIZES["smoke"].seeds:
            assert f"[{name}-s{seed}] evaluating: round {rounds}/{rounds}, " in out
    assert " training: " not in out
    assert (
        again["variants"]["iet-agc"]["final"]
        == json.loads((study / "results.json").read_text())["variants"]["iet-agc"]["final"]
    )


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_study_ends_its_workers_and_the_next_call_resumes(tmp_path, sig):
    """SIGKILL to the study process: no worker trains on as an orphan; the cut runs are resumed next time.
    SIGTERM (as Ctrl-C): the study ends its workers, says so in one line and exits 143, without a traceback or
    multiprocessing's leaked-semaphore warning; the cut runs are marked interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = ["local-epochs=20", "variants=default,iet-agc"]  # two variants: both workers busy, half the runs
    study = ["small-data", "--smoke", "--out", str(tmp_path), *(x for kv in settings for x in ("--set", kv))]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from experiments.studies.cli import main; sys.exit(main(sys.argv[1:]))"]
        + study,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("w"),  # (a file: a pipe nobody reads could fill and block it)
    )
    runs = sd.study_dir_for(tmp_path, "smoke", settings) / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/metrics.json")):
        time.sleep(0.5)  # a first round committed: the workers are training
    workers = [
        int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert workers, "no worker processes found"
    t_signal = time.time()
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=30)
    stderr = (tmp_path / "stderr.txt").read_text()
    if sig == "SIGTERM":
        assert proc.returncode == 143 and time.time() - t_signal < 15
        assert stderr.strip().splitlines()[-1] == (
            "fl-ietagc-study: stopped by SIGTERM: finished runs are kept; the same command resumes the others"
        )
        assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [
            w
            for w in workers
            if os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split(")")[1].split()[0]
        ]
    assert not alive, f"orphaned workers still running: {alive}"
    states = {RunDir(p).liveness() for p in runs.iterdir()}
    assert "running" not in states and states & {"stale", "interrupted", "failed"}
    if sig == "SIGTERM":
        assert "interrupted" in states  # (the resume below is the same path as after SIGKILL)
        return
    summary = sd.run_small_data("smoke", tmp_path, workers=2, settings=settings, progress=False)
    assert all(RunDir(p).read_status()["status"] == "completed" for p in runs.iterdir())
    assert len(summary["runs"]) == 2 * len(sd.SIZES["smoke"].seeds)


def test_the_quality_score_ranks_real_above_a_trained_model_above_an_untrained_one(digits8, tmp_path, monkeypatch):
    """A real (briefly trained) diffusion model, not a stand-in: real held-out < trained < untrained in CFD."""
    import copy

    from fl_ietagc.data.pixels import to_uint8
    from fl_ietagc.training.diffusion import Diffusion, sample
    from fl_ietagc.training.run_model import build_for_config
    from fl_ietagc.training.trainer import LocalTrainer, TrainState

    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path))
    sp = digits8
    cfg = parse_config(
        {
            "dataset": "digits",
            "image-size": 8,
            "batch-size": 64,
            "lr": 2e-3,
            "warmup-steps": 10,
            "hflip": "off",
            "agc": False,
            "diffusion-steps": 200,
        }
    )
    torch.manual_seed(0)
    model = build_for_config(cfg)
    untrained = copy.deepcopy(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = LocalTrainer(
            cfg,
            model,
            copy.deepcopy(model),
            sp.train.images,
            TrainState.fresh(np.arange(len(sp.train))),
            torch.device("cpu"),
        )
        trainer.run(0, seed=1, max_steps=300)
        n = len(sp.heldout.images)
        gen = [
            to_uint8(sample(m, Diffusion.for_config(cfg), n, (1, 8, 8), steps=20, seed=2, batch_size=n))
            for m in (model, untrained)
        ]
    finally:
        torch.set_num_threads(threads)
    clf = cq.classifier_for("digits", sp.train.images, sp.train.labels, sp.heldout.images, sp.heldout.labels)
    ref = clf.features(sp.train.images)
    real, trained, noise = (cq.score(clf, x, ref) for x in (sp.heldout.images, *gen))
    assert real["cfd"] < trained["cfd"] < noise["cfd"], (real["cfd"], trained["cfd"], noise["cfd"])
    assert trained["precision"] > noise["precision"]
