"""The experiment suite: plans, budgets, estimates, and smoke-size runs through the real app."""

import json

import pytest

from experiments.studies import STUDIES, base_config, estimate, plan, run_study
from fl_ietagc.config import parse_config
from strategies.registry import STRATEGIES, check_strategy


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("size", ["smoke", "full"])
def test_every_planned_run_is_a_valid_config(study, size):
    for r in plan(study, size):
        conf = {**base_config(study, size), **r.overrides}
        if size == "full":
            conf["data-root"] = "/data"
        cfg = parse_config(conf)
        check_strategy(cfg.strategy, cfg)


def test_paper_protocol_and_matched_default_training_budget():
    runs = {r.name: r for r in plan("paper-cifar10", "full")}
    assert runs["iet-agc"].clients == 10 and runs["default-training"].match_federated == 10
    cfg = parse_config({**base_config("paper-cifar10", "full"), "data-root": "/data"})
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.batch_size, cfg.agc_lambda, cfg.warmup_steps) == \
        (10, 100, 128, 2.0, 585)
    est = {row["run"]: row["optimizer_steps"] for row in
           estimate("paper-cifar10", "full", plan("paper-cifar10", "full"), 65536, 50)["rows"]}
    assert est["iet-agc"] == est["default-training"] == 10 * 100 * 10 * (5000 // 128) == 390_000


def test_ablation_periods_keep_the_total_epochs():
    for r in plan("ablations", "full"):
        if r.name.startswith("period"):
            c = {**base_config("ablations", "full"), **r.overrides}
            assert c["local-epochs"] * c["num-server-rounds"] == 1000


def test_dry_run_prints_the_gpu_estimate(capsys, tmp_path):
    assert run_study("paper-afhq-dog", "full", tmp_path, dry_run=True) is None
    out = capsys.readouterr().out
    assert "GPU hours at an assumed 50 TFLOP/s" in out and "default-training" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_smoke_study_runs_and_writes_a_comparison(study, tmp_path):
    path = run_study(study, "smoke", tmp_path)
    table = json.loads((path.parent / "comparison.json").read_text())
    assert table["runs"] == [r.name for r in plan(study, "smoke")]
    assert all(v == "+0.0%" or v == "0%" or v.startswith("n/a") for v in
               [vals[0] for vals in table["relative_to_first"].values()])
    if study == "strategies":
        assert set(table["runs"]) == set(STRATEGIES)
    if study == "finetune":
        cfg = json.loads((path.parent / "pretrained-then-iet-agc" / "config.json").read_text())
        assert cfg["init-checkpoint"].endswith("pretrained/checkpoints/final.pt")
    for run in table["paths"]:
        status = json.loads((path.parent / run.split("/")[-1] / "status.json").read_text())
        assert status["status"] == "completed"
