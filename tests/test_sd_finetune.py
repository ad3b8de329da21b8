"""`fl-ietagc-study sd-finetune --smoke`: tiny random Stable Diffusion parts and embedded digits as captioned pairs,
plain fine-tuning vs IET-AGC vs RET at equal steps through the real app (Ray for the federated runs), each evaluated
with `fl-ietagc evaluate`, one comparison table; the estimate printed first."""

import json

import pytest

from experiments.studies import main as study
from fl_ietagc.rundir import RunDir


@pytest.mark.slow
def test_sd_finetune_smoke_trains_evaluates_and_compares_three_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    assert study(["sd-finetune", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("GPU hours at an assumed") < out.index("| metric |")  # the estimate comes first
    assert "per client: UNet 792,964 parameters" in out
    d = tmp_path / "sd-finetune-smoke"
    steps = {}
    for name in ("plain-finetune", "iet-agc", "ret"):
        run = RunDir(d / name)
        assert run.read_status()["status"] == "completed"
        config = run.read_config()
        assert config["model-type"] == "latent-t2i" and config["dataset"] == "captions"
        metrics = run.read_metrics()
        steps[name] = sum(m["steps"] for m in metrics)
        results = json.loads((d / name / "results.json").read_text())
        assert results["memorization"]["embedder"] == "latent-cosine"  # no --sscd: the fallback, named as such
        assert results["clip_score"].startswith("not measured")
    assert steps["plain-finetune"] == steps["iet-agc"] == steps["ret"]  # equal optimizer steps
    assert RunDir(d / "ret").read_metrics()[0]["ret-moved"] > 0 and RunDir(d / "iet-agc").read_config()["num_clients"] == 2
    table = json.loads((d / "comparison.json").read_text())  # fl-ietagc compare's, relative to plain fine-tuning
    assert table["runs"] == ["plain-finetune", "iet-agc", "ret"]
    assert table["metrics"]["null: latent-cosine mean top-1"][0] == table["metrics"]["null: latent-cosine mean top-1"][1]
    assert table["metrics"]["CLIP score"] == [None, None, None]


def test_sd_finetune_full_needs_a_checkpoint_and_pairs(tmp_path, capsys):
    assert study(["sd-finetune", "--full", "--out", str(tmp_path)]) == 2
    assert "sd-finetune --full needs --pretrained DIR" in capsys.readouterr().err
    assert study(["sd-finetune", "--smoke", "--data", "x", "--out", str(tmp_path)]) == 2
    assert study(["ablations", "--smoke", "--sscd", "m.pt", "--out", str(tmp_path)]) == 2
    assert "--sscd: only the sd-finetune study takes it" in capsys.readouterr().err
