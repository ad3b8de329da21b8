"""The experiment suite: plans, budgets, estimates, and smoke-size runs through the real app."""

import json
import shutil

import pytest

from experiments.studies.plans import STUDIES, base_config, estimate, plan
from experiments.studies.runner import run_study
from fl_ietagc.settings.config import check_strategy_clients, parse_config
from strategies.registry import STRATEGIES


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("size", ["smoke", "full"])
def test_every_planned_run_is_a_valid_config(study, size):
    for r in plan(study, size):
        conf = {**base_config(study, size), **r.overrides}
        if size == "full":
            conf["data-root"] = "/data"
        cfg = parse_config(conf)
        if r.clients:
            check_strategy_clients(cfg, r.clients)  # the strategy's needs on K (Krum, Bulyan)


def test_paper_protocol_and_matched_default_training_budget():
    runs = {r.name: r for r in plan("paper-cifar10", "full")}
    assert runs["iet-agc"].clients == 10 and runs["default-training"].match_federated == 10
    cfg = parse_config({**base_config("paper-cifar10", "full"), "data-root": "/data"})
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.batch_size, cfg.agc_lambda, cfg.warmup_steps) == (
        10,
        100,
        128,
        2.0,
        585,
    )
    est = {
        row["run"]: row["optimizer_steps"]
        for row in estimate("paper-cifar10", "full", plan("paper-cifar10", "full"), 65536, 50)["rows"]
    }
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


def evaluated(path, mq, third, fid):
    """A results.json as `fl-ietagc evaluate` writes it, with chosen fractions."""
    rate = lambda f: {"count": round(100 * f), "fraction": f}  # noqa: E731
    return {
        "run": str(path),
        "kind": "federated",
        "num_samples": 100,
        "sampler": "ddim",
        "steps": 10,
        "weights": "raw",
        "round": 2,
        "memorization": {
            "mq": {"0.2": rate(mq)},
            "one_third_rule": rate(third),
            "carlini": rate(third),
            "exact_copies": rate(0.0),
        },
        "null": {"mq": {"0.2": rate(0.01)}, "one_third_rule": rate(0.0)},
        "quality": {"computed": True, "fid": fid} if fid is not None else {"computed": False, "reason": "x"},
    }


def test_study_compares_every_run_with_the_first(tmp_path, capsys):
    """Runs already evaluated are kept, so the study goes straight to its comparison of known results."""
    study_dir = tmp_path / "paper-cifar10-smoke"
    chosen = {"default-training": (0.2, 0.1, 40.0), "iet": (0.1, 0.1, 50.0), "iet-agc": (0.05, 0.0, None)}
    for name, values in chosen.items():
        (study_dir / name).mkdir(parents=True)
        (study_dir / name / "results.json").write_text(json.dumps(evaluated(study_dir / name, *values)))
    from PIL import Image

    from experiments.studies.pipeline_check import BANNER, NOTE, is_labelled

    Image.new("RGB", (530, 530), (0, 0, 0)).save(study_dir / "iet" / "samples.png")
    path = run_study("paper-cifar10", "smoke", tmp_path)
    assert path == study_dir / "comparison.md"
    assert path.read_text().startswith(NOTE + "\n\n| metric |") and BANNER in NOTE  # smoke: a pipeline check
    assert json.loads((study_dir / "comparison.json").read_text())["note"] == NOTE
    assert is_labelled(study_dir / "iet" / "samples.png")  # and every figure of the study says so too
    table = json.loads((study_dir / "comparison.json").read_text())
    assert table["runs"] == ["default-training", "iet", "iet-agc"]
    assert table["metrics"]["MQ r<0.2"] == [0.2, 0.1, 0.05]
    assert table["relative_to_first"] == {
        "MQ r<0.2": ["+0.0%", "-50.0%", "-75.0%"],
        "1/3 rule": ["+0.0%", "+0.0%", "-100.0%"],
        "Carlini l<1": ["+0.0%", "+0.0%", "-100.0%"],
        "exact copies": ["0%", "0%", "0%"],
        "null: MQ r<0.2": ["+0.0%", "+0.0%", "+0.0%"],
        "null: 1/3 rule": ["0%", "0%", "0%"],
        "FID": ["+0.0%", "+25.0%", "n/a"],
    }
    assert "| MQ r<0.2 | 0.2 | 0.1 (-50.0%) | 0.05 (-75.0%) |" in path.read_text()
    assert capsys.readouterr().out.count("already evaluated, kept") == 3


# A run trained by an earlier smoke study of this session, by what it trains: (name, K, overrides, ...) and the
# study's base config. At smoke size the three paper studies are the same three runs on the same config (and the
# ablations' iet-agc is theirs too): the first study trains them; a later one starts from a copy of each trained
# run, which its run_study keeps ("already trained") and evaluates itself (evaluation outputs are not copied).
_TRAINED: dict[str, object] = {}
_EVALUATION_OUTPUTS = ("results.json", "report.html", "report", "samples.npz")


def _trained_key(study: str, r) -> str | None:
    if study == "finetune":  # (its runs start from a checkpoint trained in that study)
        return None
    fields = [r.name, r.clients, r.overrides, r.match_federated, r.centralized_agc, base_config(study, "smoke")]
    return json.dumps(fields, sort_keys=True)


@pytest.mark.slow(minutes=4.5)
@pytest.mark.parametrize("study", [s for s in STUDIES if s != "strategies"])  # (strategies: test_study_strategies)
def test_smoke_study_runs_and_writes_a_comparison(study, tmp_path, ray_head, monkeypatch):
    check_smoke_study(study, tmp_path, ray_head, monkeypatch)


def check_smoke_study(study, tmp_path, ray_head, monkeypatch):
    from fl_ietagc.evaluation.compare import metric_values, relative
    from fl_ietagc.evaluation.evaluate import read_results

    monkeypatch.setenv("RAY_ADDRESS", ray_head)  # every federated run attaches to the module's Ray head
    for r in plan(study, "smoke"):
        trained = _TRAINED.get(_trained_key(study, r))
        if trained is not None:
            shutil.copytree(
                trained, tmp_path / f"{study}-smoke" / r.name, ignore=shutil.ignore_patterns(*_EVALUATION_OUTPUTS)
            )
    path = run_study(study, "smoke", tmp_path)
    table = json.loads((path.parent / "comparison.json").read_text())
    assert table["runs"] == [r.name for r in plan(study, "smoke")]
    assert all(
        v == "+0.0%" or v == "0%" or v.startswith("n/a")
        for v in [vals[0] for vals in table["relative_to_first"].values()]
    )
    # every column against the first run, from each run's own results.json
    values = [metric_values(read_results(path.parent / name)) for name in table["runs"]]
    assert table["metrics"] == {m: [v[m] for v in values] for m in values[0]}
    assert table["relative_to_first"] == {m: [relative(v[m], values[0][m]) for v in values] for m in values[0]}
    if study == "strategies":
        assert set(table["runs"]) == set(STRATEGIES)
    if study == "finetune":
        cfg = json.loads((path.parent / "pretrained-then-iet-agc" / "config.json").read_text())
        assert cfg["init-checkpoint"].endswith("pretrained/checkpoints/final.pt")
    for run in table["paths"]:
        status = json.loads((path.parent / run.split("/")[-1] / "status.json").read_text())
        assert status["status"] == "completed"
    for r in plan(study, "smoke"):
        key = _trained_key(study, r)
        if key is not None:
            _TRAINED.setdefault(key, path.parent / r.name)


def test_a_study_keeps_finished_runs_and_resumes_half_finished_ones(tmp_path, monkeypatch):
    """train_run: completed -> kept, failed/interrupted/killed -> resumed (federated through --resume),
    never seen -> started."""
    from experiments.launch import simulate
    from experiments.studies import plans, runner
    from fl_ietagc.loops.centralized import run_centralized
    from fl_ietagc.runs.rundir import RunDir

    base = {**plans.SMOKE, "max-images": 96, "num-server-rounds": 3, "sample-count": 0, "agc": False}
    monkeypatch.setenv("FL_IETAGC_FAULT", "between-rounds:2:raise")
    with pytest.raises(RuntimeError, match="injected fault at between-rounds, round 2"):
        run_centralized(parse_config({**base, "output-dir": str(tmp_path), "run-name": "central"}), progress=False)
    monkeypatch.delenv("FL_IETAGC_FAULT")
    assert RunDir(tmp_path / "central").liveness() == "failed"
    runner.train_run(plans.RunSpec("central", 0), tmp_path, base, {}, smoke=True)
    run = RunDir(tmp_path / "central")
    assert run.read_status()["status"] == "completed" and [m["round"] for m in run.read_metrics()] == [1, 2, 3]
    before = run.status_path.stat().st_mtime_ns
    runner.train_run(plans.RunSpec("central", 0), tmp_path, base, {}, smoke=True)  # kept as it is
    assert run.status_path.stat().st_mtime_ns == before

    calls = []
    monkeypatch.setattr(simulate, "_launch", lambda args: calls.append(args) or 0)
    fed = RunDir(tmp_path / "fed")
    fed.path.mkdir()
    fed.write_config({"kind": "federated"})
    fed.write_status("interrupted")
    runner.train_run(plans.RunSpec("fed", 2), tmp_path, base, {"client_resources": {"num_cpus": 1}}, smoke=True)
    runner.train_run(plans.RunSpec("new", 2), tmp_path, base, {}, smoke=True)
    assert calls[0].resume == str(fed.path) and calls[0].num_supernodes is None
    assert calls[1].resume is None and calls[1].num_supernodes == 2
    assert calls[1].overrides == {**base, "output-dir": str(tmp_path), "run-name": "new"}
