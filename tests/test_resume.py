"""Runs that survive kills: SIGKILL at every stage of a run, then resume, ends bit-identical to a run
that was never interrupted (iet with AGC; fedadam with RET and TAA; centralized training).

The federated runs use the real ServerApp and ClientApp on an in-process grid (tests/local_grid.py), in
subprocesses that `FL_IETAGC_FAULT` kills outright (SIGKILL: no handler, no cleanup) at a named point.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir, RunExistsError
from fl_ietagc.settings.config import ConfigError, parse_config
from tests.local_grid import run_server

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "max-images": 128,
    "batch-size": 32,
    "local-epochs": 1,
    "num-server-rounds": 3,
    "diffusion-steps": 20,
    "agc-lambda": 1.2,
    "warmup-steps": 6,
    "sample-count": 4,
    "sample-steps": 2,
}
RET = {**SMALL, "strategy": "fedadam", "ret-every": 1, "ret-fraction": 0.25, "taa": True}


def in_process(config: dict, k: int = 2):
    torch.set_num_threads(1)  # as in the subprocesses
    try:
        run_server(config, k)
    finally:
        torch.set_num_threads(2)


def killed(config: dict, fault: str, k: int = 2) -> int:
    """Run the app in a subprocess with FL_IETAGC_FAULT=fault; returns its exit code."""
    env = {**os.environ, "FL_IETAGC_FAULT": fault}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.local_grid", str(k), json.dumps(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    for part in ("net", "ema"):
        assert x[part].keys() == y[part].keys()
        for key in x[part]:
            assert torch.equal(x[part][key], y[part][key]), (part, key)


def assert_same_run(ref: RunDir, run: RunDir) -> None:
    assert run.read_status()["status"] == "completed"
    assert_same_weights(ref.final_checkpoint, run.final_checkpoint)
    for r in (1, 2, 3):
        assert_same_weights(ref.checkpoint(r), run.checkpoint(r))
    strip = lambda ms: [
        {k: v for k, v in m.items() if k not in ("elapsed-s", "client-seconds-max", "clients", "timing")} for m in ms
    ]
    assert strip(run.read_metrics()) == strip(ref.read_metrics())
    assert np.array_equal(np.load(run.skip_counts_path), np.load(ref.skip_counts_path))
    assert all(np.array_equal(a, b) for a, b in zip(run.read_shards(), ref.read_shards()))
    assert run.samples_path.read_bytes() == ref.samples_path.read_bytes()


def test_iet_agc_killed_at_every_stage_resumes_bit_identical(tmp_path):
    ref_cfg = {**SMALL, "output-dir": str(tmp_path), "run-name": "ref"}
    in_process(ref_cfg)
    ref = RunDir(tmp_path / "ref")
    assert sum(m["skipped"] for m in ref.read_metrics()) > 0  # AGC is at work in this config

    cfg = {**SMALL, "output-dir": str(tmp_path), "run-name": "killed"}
    run = RunDir(tmp_path / "killed")
    # inside round 1 (clients trained and saved their state, the server has not committed the round)
    assert killed(cfg, "after-replies:1") == -signal.SIGKILL
    assert run.read_status()["status"] == "running" and run.liveness() == "stale"
    with pytest.raises(RunExistsError, match="process is gone .*continue it with: fl-ietagc resume"):
        RunDir.check_new(run.path)
    resume = {**cfg, "resume-from": str(run.path)}
    # during round 2's commit: metrics and checkpoint written, the resume point not yet
    assert killed(resume, "mid-commit:2") == -signal.SIGKILL
    assert [m["round"] for m in run.read_metrics()] == [1, 2] and run.committed_round() == 1
    # between rounds 2 and 3
    assert killed(resume, "between-rounds:2") == -signal.SIGKILL
    assert run.committed_round() == 2
    # during the final sampling
    assert killed(resume, "final-sampling:3") == -signal.SIGKILL
    assert run.final_checkpoint.is_file() and not run.samples_path.exists()
    in_process(resume)
    assert_same_run(ref, run)
    assert run.read_status()["status"] == "completed"
    with pytest.raises(ConfigError, match="holds a completed run; nothing to resume"):
        RunDir.reopen(run.path)


def test_fedadam_with_ret_killed_inside_a_round_resumes_bit_identical(tmp_path):
    in_process({**RET, "output-dir": str(tmp_path), "run-name": "ref"})
    ref = RunDir(tmp_path / "ref")
    assert ref.read_metrics()[0]["ret-moved"] == 2 * 16  # RET moved images after round 1
    cfg = {**RET, "output-dir": str(tmp_path), "run-name": "killed"}
    run = RunDir(tmp_path / "killed")
    # while round 1's checkpoint is being written (its temporary file complete, not yet renamed)
    assert killed(cfg, "write-checkpoints-round_0001.pt:0") == -signal.SIGKILL
    assert run.committed_round() == 0 and list(run.path.glob("checkpoints/.round_0001.pt.tmp*"))
    cfg = {**cfg, "resume-from": str(run.path)}
    assert killed(cfg, "after-replies:2") == -signal.SIGKILL  # after a redistribution, inside round 2
    assert not list(run.path.rglob(".*.tmp*"))  # the resume cleaned what the first kill left
    # the clients of round 2 had written their round-2 state; the resumed round 2 starts from round 1's
    assert (run.client_state_dir(0) / "round_0002.pt").is_file()
    in_process(cfg)
    assert_same_run(ref, run)


def test_resume_refuses_a_different_config_naming_the_keys(tmp_path):
    cfg = {**SMALL, "num-server-rounds": 1, "sample-count": 0, "output-dir": str(tmp_path), "run-name": "r"}
    assert killed(cfg, "after-replies:1") == -signal.SIGKILL
    with pytest.raises(ConfigError, match=r"keeps its config; these differ: agc-lambda = 3.0 \(run has 1.2\), lr"):
        run_server({**cfg, "agc-lambda": 3.0, "lr": 0.1, "resume-from": str(tmp_path / "r")}, 2)


def centralized_cfg(tmp_path, name):
    return parse_config({**SMALL, "agc": False, "output-dir": str(tmp_path), "run-name": name})


def test_centralized_killed_and_resumed_is_bit_identical(tmp_path):
    from fl_ietagc.loops.centralized import run_centralized

    seen = []
    ref = run_centralized(
        centralized_cfg(tmp_path, "ref"), match_federated=2, progress=False, on_round=lambda r, rec: seen.append(rec)
    )
    assert seen == ref.read_metrics()  # on_round: each round's record, after it is committed (a study's progress)
    code = """
import sys, torch
from fl_ietagc.loops.centralized import run_centralized
from fl_ietagc.settings.config import parse_config
import json
torch.set_num_threads(2)
cfg = parse_config(json.loads(sys.argv[1]))
run_centralized(cfg, match_federated=2, progress=False, resume=sys.argv[2] or None)
"""
    cfg = centralized_cfg(tmp_path, "killed")
    run = RunDir(tmp_path / "killed")

    def go(fault, resume=""):
        return subprocess.run(
            [sys.executable, "-c", code, json.dumps(cfg.to_dict()), resume],
            cwd=ROOT,
            env={**os.environ, "FL_IETAGC_FAULT": fault},
            capture_output=True,
        ).returncode

    assert go("mid-commit:2") == -signal.SIGKILL
    assert go("between-rounds:2", str(run.path)) == -signal.SIGKILL
    assert go("", str(run.path)) == 0
    assert_same_run(ref, run)
    assert run.read_config()["matched_federated_clients"] == 2


def test_the_flower_free_loop_writes_the_same_run_directory_and_resumes(tmp_path):
    """iet_loop commits through the same RunDir; stopped after round 2 and continued, it ends as the app does."""
    from fl_ietagc.loops.iet import run_iet_loop

    cfg = parse_config({**SMALL, "sample-count": 0, "output-dir": str(tmp_path), "run-name": "loop"})
    torch.set_num_threads(1)
    try:
        full = run_iet_loop(cfg, 2, torch.device("cpu"), RunDir.create(str(tmp_path), "full", ""))
        short = RunDir.create(str(tmp_path), "cut", "")
        run_iet_loop(cfg.replace(**{"num-server-rounds": 2}), 2, torch.device("cpu"), short)
        short.write_status("interrupted")
        short.write_config({**short.read_config(), "num-server-rounds": 3})
        cont = run_iet_loop(cfg, 2, torch.device("cpu"), RunDir.reopen(short.path))
    finally:
        torch.set_num_threads(2)
    assert [m["round"] for m in short.read_metrics()] == [1, 2, 3]
    assert all(torch.equal(full.net[k], cont.net[k]) for k in full.net)
    assert_same_weights(RunDir(tmp_path / "full").final_checkpoint, short.final_checkpoint)
