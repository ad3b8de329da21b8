"""`fl-ietagc evaluate` / `compare` on a small centralized run, with planted copies as samples."""

import json

import numpy as np
import pytest
import torch

from fl_ietagc.cli import main as cli
from fl_ietagc.data.datasets import load_splits
from fl_ietagc.evaluation import evaluate as ev
from fl_ietagc.evaluation.compare import compare, relative
from fl_ietagc.loops.centralized import run_centralized
from fl_ietagc.settings.config import parse_config

CFG = {
    "max-images": 400,
    "batch-size": 50,
    "num-server-rounds": 2,
    "local-epochs": 1,
    "sample-count": 0,
    "run-name": "small",
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cfg = parse_config({**CFG, "output-dir": str(tmp_path_factory.mktemp("runs"))})
    run = run_centralized(cfg, progress=False)
    return run, cfg


def planted_sampler(copies: int):
    """Stand-in for the sampler: the first `copies` outputs are training images, the rest uniform noise."""

    def fake_sample(model, diffusion, n, shape, **kw):
        train = load_splits(parse_config(CFG)).train.images[:copies].float() / 127.5 - 1
        noise = torch.rand((n - copies, *shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
        return torch.cat([train, noise])

    return fake_sample


def test_evaluate_finds_planted_copies_and_writes_results_and_report(small_run, monkeypatch):
    run, cfg = small_run
    monkeypatch.setattr(ev, "sample", planted_sampler(copies=5))
    results = ev.evaluate_run(run.path, ev.EvalOptions(num_samples=40, k=20, fid=False, loss_images=8), progress=False)
    mem, null = results["memorization"], results["null"]
    assert mem["num_queries"] == 40 and mem["num_train"] == 400 and mem["k"] == 20
    assert mem["exact_copies"]["count"] == 5
    assert mem["one_third_rule"]["count"] == 5
    assert mem["mq"]["0.15"]["count"] == 5
    assert mem["mq_reliable"] is False  # 400 training images for k = 20
    assert null["num_queries"] == len(load_splits(cfg).heldout) and null["exact_copies"]["count"] == 0
    assert results["memorized_train_images"] == 5 and results["memorized_rule"].startswith("l2 1st / 2nd < 1/3")
    assert results["quality"] == {"computed": False, "reason": "disabled (--no-fid)"}
    saved = json.loads((run.path / "results.json").read_text())
    assert saved["memorization"]["exact_copies"]["count"] == 5
    page = (run.path / "report.html").read_text()
    assert "unreliable" in page and "FID was not computed" in page and page.count("data:image/png;base64") >= 5
    for name in ("samples", "similar_pairs", "loss_by_timestep", "rounds", "skip_histogram"):
        assert (run.path / "report" / f"{name}.png").is_file(), name

    # samples.npz: the planted copies are there as uint8, with their neighbours; the metrics recompute from it alone
    saved = ev.load_samples(run.path / "samples.npz")
    train = load_splits(cfg).train.images
    assert saved["samples"].dtype == np.uint8 and saved["samples"].shape == (40, *train.shape[1:])
    assert np.array_equal(saved["samples"][:5], train[:5].numpy())
    assert saved["index"][:5, 0].tolist() == [0, 1, 2, 3, 4] and (saved["d2"][:5, 0] == 0).all()
    assert saved["index"].shape == saved["d2"].shape == (40, 20)
    from fl_ietagc.evaluation.memorization import Neighbours, summarize

    again = summarize(
        Neighbours(torch.from_numpy(saved["d2"]), torch.from_numpy(saved["index"]), train[0].numel()), len(train)
    )
    assert again == mem
    assert saved["null_d2"].shape == (null["num_queries"], 20)


def test_evaluate_with_the_real_sampler_and_a_chosen_round(small_run, tmp_path):
    run, _ = small_run
    out = tmp_path / "eval"
    results = ev.evaluate_run(
        run.path,
        ev.EvalOptions(num_samples=8, steps=2, server_round=1, weights="ema", fid=False, loss_images=4, out=str(out)),
        progress=False,
    )
    assert results["round"] == 1 and results["weights"] == "ema"
    assert results["checkpoint"].endswith("round_0001.pt")
    assert (out / "results.json").is_file() and (out / "report.html").is_file()


def test_bad_options_exit_with_a_message(small_run, capsys):
    run, _ = small_run
    assert cli(["evaluate", str(run.path), "--num-samples", "0", "--no-fid"]) == 2
    assert "--num-samples 0: must be >= 1" in capsys.readouterr().err
    assert cli(["evaluate", str(run.path / "nope"), "--no-fid"]) == 2
    assert (
        capsys.readouterr().err == f"fl-ietagc evaluate: {run.path / 'nope'} is not a run directory (no config.json)\n"
    )


def results_with(fraction: float, fid):
    rate = {"count": int(fraction * 100), "fraction": fraction}
    mem = {"mq": {"0.15": rate, "0.2": rate}, "one_third_rule": rate, "carlini": rate, "exact_copies": rate}
    null = {"mq": {"0.2": {"count": 1, "fraction": 0.01}}, "one_third_rule": {"count": 0, "fraction": 0.0}}
    quality = {"computed": True, "fid": fid} if fid is not None else {"computed": False, "reason": "x"}
    return {
        "run": "/r",
        "memorization": mem,
        "null": null,
        "quality": quality,
        "kind": "federated",
        "num_samples": 100,
        "sampler": "ddim",
        "steps": 50,
        "weights": "raw",
        "round": 10,
    }


def test_compare_relative_change_against_the_first_run(tmp_path):
    dirs = []
    for name, frac, fid in (("default", 0.2, 10.0), ("iet", 0.1, 9.0), ("iet-agc", 0.05, None)):
        d = tmp_path / name
        d.mkdir()
        r = results_with(frac, fid)
        r["run"] = str(d)
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(str(d))
    table = compare(dirs)
    assert table["runs"] == ["default", "iet", "iet-agc"]
    assert table["metrics"]["MQ r<0.2"] == [0.2, 0.1, 0.05]
    assert table["relative_to_first"]["MQ r<0.2"] == ["+0.0%", "-50.0%", "-75.0%"]
    assert table["relative_to_first"]["FID"] == ["+0.0%", "-10.0%", "n/a"]
    assert cli(["compare", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    assert "-75.0%" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_relative_change_edge_cases():
    assert relative(0.0, 0.0) == "0%" and relative(0.1, 0.0) == "n/a (base 0)" and relative(None, 1.0) == "n/a"


def fid_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID of two feature sets, ||mu_x - mu_y||^2 + tr S_x + tr S_y - 2 tr sqrt(S_x S_y), in float64. With
    S_x = A A^T (A = centred x^T / sqrt(n - 1)), tr sqrt(S_x S_y) is the sum of the singular values of
    centred y A / sqrt(m - 1): a small SVD instead of the eigenvalues of a 2048 x 2048 product."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    a = xc.T / (len(x) - 1) ** 0.5
    b = yc @ a / (len(y) - 1) ** 0.5
    trace_sx, trace_sy = (xc**2).sum() / (len(x) - 1), (yc**2).sum() / (len(y) - 1)
    mean_term = ((x.mean(0) - y.mean(0)) ** 2).sum()
    return float(mean_term + trace_sx + trace_sy - 2 * torch.linalg.svdvals(b).sum())


def test_evaluate_computes_fid_when_weights_are_given(weights, tmp_path, monkeypatch, captured_features):
    features = captured_features
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(
        {
            "max-images": 40,
            "batch-size": 20,
            "num-server-rounds": 1,
            "local-epochs": 1,
            "sample-count": 0,
            "output-dir": str(tmp_path),
            "run-name": "fid",
        }
    )
    run = run_centralized(cfg, progress=False)
    results = ev.evaluate_run(
        run.path,
        ev.EvalOptions(num_samples=10, steps=2, fid_weights=weights, loss_images=4, batch_size=50, k=20),
        progress=False,
    )
    q = results["quality"]
    assert q["computed"] is True and q["fid"] >= 0 and q["num_generated"] == 10 and q["num_reference"] == 40
    # the FID of the 10 samples' features against the 40 training images' features
    assert [tuple(f.shape) for f in features] == [(10, 2048), (40, 2048)]
    assert q["fid"] == pytest.approx(fid_by_hand(features[0], features[1]), rel=1e-4)
    assert len(q["weights_sha256"]) == 64
    assert any((tmp_path / "cache" / "fid" / q["weights_sha256"][:16]).iterdir())  # train stats cached per weights
    page = (run.path / "report.html").read_text()
    assert "<td>FID</td>" in page and "FID was not computed" not in page


# --- every option and the run directory are checked before any sampling ---------------------------------------


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A completed run directory laid out as centralized training writes it (config, status, metrics, skip counts, round 1
    and 2 and final checkpoints) with untrained weights: the checks need no training."""
    import numpy as np

    from fl_ietagc.runs.checkpoints import atomic_write_json, save_checkpoint
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.training.run_model import build_for_config

    cfg = parse_config(CFG)
    run = RunDir(tmp_path_factory.mktemp("runs") / "fake")
    run.path.mkdir()
    run.write_config(cfg.to_dict(), kind="centralized")
    state = build_for_config(cfg).state_dict()
    for r in (1, 2):
        save_checkpoint(run.checkpoint(r), state, state, server_round=r, config=cfg.to_dict())
    save_checkpoint(run.final_checkpoint, state, state, server_round=2, config=cfg.to_dict())
    atomic_write_json(
        run.metrics_path, [{"round": r, "loss": 0.1, "skip-rate": 0.0, "skip-rate-per-client": [0.0]} for r in (1, 2)]
    )
    run.write_skip_counts(np.zeros(len(load_splits(cfg).train), np.int64))
    run.mark_completed(2)
    return run, cfg


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling fails the test: every check must come first."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("sampling started")

    monkeypatch.setattr(ev, "sample", refuse)
    return calls


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli(["evaluate", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples 0: must be >= 1"),
        (["--num-samples", "1"], "--num-samples 1: quality metrics need >= 2 samples (or pass --no-fid)"),
        (["--steps", "0", "--no-fid"], "--steps 0: must be >= 1"),
        (["--steps", "1001", "--no-fid"], "--steps 1001: must be <= 1000 (the run's diffusion-steps)"),
        (["--k", "1", "--no-fid"], "--k 1: must be >= 2 (the 1/3 rule needs 2 neighbours)"),
        (["--k", "100000", "--no-fid"], "--k 100000: must be <= {num_train} (the run's training set size)"),
        (["--batch-size", "0", "--no-fid"], "--batch-size 0: must be >= 1"),
        (["--round", "0", "--no-fid"], "--round 0: must be >= 1"),
        (["--round", "7", "--no-fid"], "--round 7: no checkpoint of round 7 in {run}/checkpoints (saved rounds: 1, 2)"),
        (["--seed", "-1", "--no-fid"], "--seed -1: must be in [0, 2**63)"),
        (["--quality", "fid,fdi"], "--quality fdi: must be among fid, isc, kid, prc"),
        (["--quality", " , "], "--quality: names no metric; give some of fid, isc, kid, prc (or pass --no-fid)"),
        (["--memorized-tau", "nan", "--no-fid"], "--memorized-tau nan: must be a number > 0"),
        (["--memorized-tau", "0", "--no-fid"], "--memorized-tau 0.0: must be a number > 0"),
        (
            ["--num-samples", "0", "--steps", "0", "--batch-size", "-3", "--no-fid"],
            "--num-samples 0: must be >= 1; --steps 0: must be >= 1; --batch-size -3: must be >= 1",
        ),
    ],
)
def test_bad_options_are_refused_before_any_sampling(fake_run, no_sampling, capsys, args, message):
    run, cfg = fake_run
    code, err = run_cli([str(run.path), *args], capsys)
    expected = message.format(run=run.path, num_train=len(load_splits(cfg).train))
    assert (code, err) == (2, f"fl-ietagc evaluate: {expected}\n")
    assert no_sampling == []


def test_missing_fid_weights_are_refused_before_any_sampling(fake_run, no_sampling, capsys, tmp_path):
    run, _ = fake_run
    code, err = run_cli([str(run.path), "--fid-weights", str(tmp_path / "missing.pth")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(
        f"fl-ietagc evaluate: --fid-weights {tmp_path / 'missing.pth'}: no such file. Provide "
        f"weights-inception-2015-12-05-6726825d.pth "
    )
    (tmp_path / "dir.pth").mkdir()
    assert run_cli([str(run.path), "--fid-weights", str(tmp_path / "dir.pth")], capsys) == (
        2,
        f"fl-ietagc evaluate: --fid-weights {tmp_path / 'dir.pth'}: not a file\n",
    )
    assert no_sampling == []


def test_unusable_out_and_device_are_refused_before_any_sampling(fake_run, no_sampling, capsys, tmp_path):
    run, _ = fake_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli([str(run.path), "--no-fid", "--out", str(blocker / "eval")], capsys) == (
        2,
        f"fl-ietagc evaluate: --out {blocker / 'eval'}: {blocker} is not a directory\n",
    )
    if not torch.cuda.is_available():
        assert run_cli([str(run.path), "--no-fid", "--device", "cuda"], capsys) == (
            2,
            "fl-ietagc evaluate: --device cuda: no CUDA device is visible to this process; use --device cpu or auto\n",
        )
    assert no_sampling == []


def copy_run(run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run.path, dst)
    return dst


def test_unfinished_run_needs_a_round(fake_run, no_sampling, capsys, tmp_path):
    run = copy_run(fake_run[0], tmp_path)
    (run / "status.json").write_text(json.dumps({"status": "failed", "round": 2}))
    assert run_cli([str(run), "--no-fid", "--k", "5"], capsys) == (
        2,
        f"fl-ietagc evaluate: {run}: the run is failed, not completed; evaluate a saved round of it with "
        f"--round R (saved rounds: 1, 2)\n",
    )
    assert no_sampling == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("config.json", "{not json", "{path}: corrupt run config (JSONDecodeError: "),
        ("config.json", "[1, 2]", "{path}: corrupt run config (expected a JSON object, got list)"),
        ("config.json", '{"num-server-rounds": -4}', "{path}: invalid run config ("),
        ("status.json", "", "{path}: corrupt status file (JSONDecodeError: "),
        ("metrics.json", '[{"round": 1', "{path}: corrupt metrics file (JSONDecodeError: "),
        (
            "metrics.json",
            '[{"round": 1}]',
            "{path}: corrupt metrics file (expected a list of per-round records with "
            "round, loss, skip-rate and skip-rate-per-client)",
        ),
        ("checkpoints/final.pt", b"", "{path}: empty file, not a checkpoint"),
        ("checkpoints/final.pt", b"PK\x03\x04 truncated", "{path}: not a readable checkpoint ("),
        ("skip_counts.npy", b"\x93NUMPY junk", "{path}: corrupt skip counts (ValueError: "),
        (
            "skip_counts.npy",
            "short",
            "{path}: corrupt skip counts (expected {num_train} non-negative integers, one per "
            "training image, got int64 (3,))",
        ),
    ],
)
def test_corrupt_run_files_are_named_before_any_sampling(
    fake_run, no_sampling, capsys, tmp_path, name, content, message
):
    import numpy as np

    run = copy_run(fake_run[0], tmp_path)
    path = run / name
    if content == "short":
        np.save(path, np.zeros(3, np.int64))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, err = run_cli([str(run), "--no-fid", "--k", "5"], capsys)
    expected = "fl-ietagc evaluate: " + message.format(path=path, num_train=len(load_splits(fake_run[1]).train))
    assert code == 2 and err.startswith(expected) and err.endswith("\n") and err.count("\n") == 1, err
    assert no_sampling == []


def test_compare_names_a_corrupt_results_file(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d in (good, bad):
        d.mkdir()
    r = results_with(0.2, 10.0)
    r["run"] = str(good)
    (good / "results.json").write_text(json.dumps(r))
    (bad / "results.json").write_text('{"run": ')
    with pytest.raises(ValueError) as e:
        compare([str(good), str(bad)])
    assert str(e.value).startswith(f"{bad / 'results.json'}: corrupt evaluation results (JSONDecodeError: ")
    (bad / "results.json").write_text(json.dumps({"run": str(bad), "kind": "x"}))
    with pytest.raises(ValueError) as e:
        compare([str(good), str(bad)])
    assert str(e.value) == (
        f"{bad / 'results.json'}: incomplete evaluation results (no memorization, null, quality); "
        f"evaluate the run again"
    )
    incomplete = {**r, "memorization": {"mq": {}}}
    (bad / "results.json").write_text(json.dumps(incomplete))
    with pytest.raises(ValueError) as e:
        compare([str(good), str(bad)])
    assert str(e.value) == (
        f"{bad / 'results.json'}: corrupt evaluation results (KeyError: 'one_third_rule'); evaluate the run again"
    )
