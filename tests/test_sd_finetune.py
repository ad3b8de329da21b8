"""`fl-ietagc-study sd-finetune --smoke`: tiny random Stable Diffusion parts and embedded digits as captioned pairs,
plain fine-tuning vs IET-AGC vs RET at equal steps through the real app (Ray for the federated runs), each evaluated
with `fl-ietagc evaluate`, one comparison table; the estimate printed first."""

import json
import re

import pytest

from experiments.studies.cli import main as study
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir


@pytest.mark.slow
def test_sd_finetune_smoke_trains_evaluates_and_compares_its_runs(tmp_path, capsys, monkeypatch, ray_head):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_ADDRESS", ray_head)  # each run's clients in one actor (tests/backends.py says why)
    assert study(["sd-finetune", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("GPU hours at an assumed") < out.index("| metric |")  # the estimate comes first
    assert "per client: UNet 792,964 parameters" in out
    d = tmp_path / "sd-finetune-smoke"
    steps = {}
    # message and per-client state of each run: the full tiny UNet (792,964 parameters) or its rank-4 adapters (9,984)
    assert re.search(r"^iet-agc +792,964 +6\.34 MB +15\.1 MiB +0\.0 MiB$", out, re.M)
    assert re.search(r"^iet-agc-lora +9,984 +0\.08 MB +0\.2 MiB +3\.0 MiB$", out, re.M)
    assert re.search(r"^iet-agc-lora-secagg +9,984 +0\.08 MB +0\.2 MiB +3\.0 MiB$", out, re.M)
    runs = ["plain-finetune", "iet-agc", "ret", "iet-agc-lora", "iet-agc-lora-secagg"]
    for name in runs:
        run = RunDir(d / name)
        assert run.read_status()["status"] == "completed"
        config = run.read_config()
        assert config["model-type"] == "latent-t2i" and config["dataset"] == "captions"
        metrics = run.read_metrics()
        steps[name] = sum(m["steps"] for m in metrics)
        results = json.loads((d / name / "results.json").read_text())
        assert results["memorization"]["embedder"] == "latent-cosine"  # no --sscd: the fallback, named as such
        assert results["clip_score"].startswith("not measured")
    assert len(set(steps.values())) == 1  # equal steps
    assert (
        RunDir(d / "ret").read_metrics()[0]["ret-moved"] > 0 and RunDir(d / "iet-agc").read_config()["num_clients"] == 2
    )
    table = json.loads((d / "comparison.json").read_text())  # fl-ietagc compare's, relative to plain fine-tuning
    assert table["runs"] == runs
    # SecAgg+: the same LoRA fine-tune, the server holding only masked sums; the adapters agree within the
    # protocol's quantization (2 x 8 / 2^22 per weight and round), grown by two rounds of training on them
    assert RunDir(d / "iet-agc-lora-secagg").read_config()["secure-aggregation"] == "secaggplus"
    plain, secure = (load_checkpoint(RunDir(d / r).final_checkpoint) for r in ("iet-agc-lora", "iet-agc-lora-secagg"))
    for part in ("net", "ema"):
        assert plain[part].keys() == secure[part].keys()
        assert max((plain[part][k] - secure[part][k]).abs().max().item() for k in plain[part]) < 1e-4  # (8e-6 seen)
    assert set(load_checkpoint(RunDir(d / "iet-agc-lora").final_checkpoint)["net"]) == {
        k for k in load_checkpoint(RunDir(d / "iet-agc-lora").final_checkpoint)["ema"]
    } and all(".lora_" in k for k in load_checkpoint(RunDir(d / "iet-agc-lora").final_checkpoint)["net"])
    assert (
        table["metrics"]["null: latent-cosine mean top-1"][0] == table["metrics"]["null: latent-cosine mean top-1"][1]
    )
    assert table["metrics"]["CLIP score"] == [None] * len(runs)


def test_sd_finetune_full_needs_a_checkpoint_and_pairs(tmp_path, capsys):
    assert study(["sd-finetune", "--full", "--out", str(tmp_path)]) == 2
    assert "sd-finetune --full needs --pretrained DIR" in capsys.readouterr().err
    assert study(["sd-finetune", "--smoke", "--data", "x", "--out", str(tmp_path)]) == 2
    assert study(["ablations", "--smoke", "--sscd", "m.pt", "--out", str(tmp_path)]) == 2
    assert "--sscd: only the sd-finetune study takes it" in capsys.readouterr().err


def test_sd_finetune_estimate_gives_each_runs_message_and_client_state(tmp_path):
    from experiments.studies.sd_finetune import SMOKE, estimate, plan, smoke_inputs
    from fl_ietagc.settings.config import parse_config

    parts, pairs = smoke_inputs(tmp_path)
    cfg = parse_config({**SMOKE, "pretrained-dir": str(parts), "data-root": str(pairs)})
    rows = {r["run"]: r for r in estimate(cfg, plan(2), 44, 8, 5)["rows"]}
    full, lora = 792_964, 9_984  # the tiny UNet; its rank-4 adapters on to_q, to_k, to_v, to_out.0
    assert rows["iet-agc"]["trained_parameters"] == rows["ret"]["trained_parameters"] == full
    assert rows["iet-agc-lora"]["trained_parameters"] == lora
    assert rows["iet-agc"]["message_mb"] == 2 * 4 * full / 1e6 and rows["iet-agc-lora"]["message_mb"] == 8 * lora / 1e6
    assert rows["plain-finetune"]["message_mb"] == 0.0  # centralized: no messages
    assert rows["iet-agc-lora"]["state_mib"] == 20 * lora / 2**20  # weights, EMA, grads (4 B each), Adam (8 B)
    assert rows["iet-agc-lora"]["frozen_base_mib"] == 4 * (full) / 2**20 and rows["iet-agc"]["frozen_base_mib"] == 0
