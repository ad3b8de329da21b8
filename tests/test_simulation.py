"""End to end: the Flower app in the Simulation Engine (Ray), as `flower-simulation` runs it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.launch import simulate
from fl_ietagc.loops.iet import run_iet_loop
from fl_ietagc.runs.checkpoints import load_checkpoint, load_torch
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import parse_config, parse_overrides
from tests.backends import ONE_ACTOR_JSON

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow(minutes=3.5)  # (the whole file, measured; conftest.py orders by it)

# 2 clients x 128 images, batch 32: 4 steps per epoch. T = 20 so the memory bank fills and AGC
# skips within the run; warmup (6 steps) spans the two rounds.
SMALL = (
    "max-images=256 batch-size=32 local-epochs=1 num-server-rounds=2 diffusion-steps=20 agc-lambda=1.2 "
    'warmup-steps=6 sample-count=4 sample-steps=3 run-name="e2e" device="cpu"'
)  # the loop runs on CPU too


def simulate_app(tmp_path, extra=""):
    overrides = f'{SMALL} output-dir="{tmp_path}" {extra}'
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--run-config",
            overrides,
            "--backend-config",
            ONE_ACTOR_JSON,
        ]
    )
    return code, RunDir(tmp_path / "e2e"), parse_config(parse_overrides(overrides))


_REFERENCE = {}


def reference_run(tmp_path) -> RunDir:
    """The uninterrupted 2-client x 2-round run (made once per session, by whichever test needs it first). Its
    processes show every DeprecationWarning and FutureWarning (PYTHONWARNINGS), and their stderr is kept."""
    import os
    import sys

    if "run" not in _REFERENCE:
        base = tmp_path.parent / "reference"
        base.mkdir(exist_ok=True)
        saved_fd, saved_env = os.dup(2), os.environ.get("PYTHONWARNINGS")
        os.environ["PYTHONWARNINGS"] = "default::DeprecationWarning,default::FutureWarning"
        try:
            with open(base / "stderr.txt", "wb") as f:
                sys.stderr.flush()
                os.dup2(f.fileno(), 2)  # the simulation process (and Ray's) write here
                try:
                    code, run, cfg = simulate_app(base)
                finally:
                    sys.stderr.flush()
                    os.dup2(saved_fd, 2)
        finally:
            os.close(saved_fd)
            if saved_env is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = saved_env
        _REFERENCE["stderr"] = (base / "stderr.txt").read_text(errors="replace")
        sys.stderr.write(_REFERENCE["stderr"])  # (shown with the test's output when it fails)
        assert code == 0
        _REFERENCE.update(run=run, cfg=cfg)
    return _REFERENCE["run"]


def test_a_normal_run_shows_no_deprecation_or_future_warning_from_flower_ray_or_torch(tmp_path):
    """flower-simulation runs on Flower's non-deprecated runtime and sets what Ray's FutureWarning asks for: any
    DeprecationWarning or FutureWarning in a normal run (raised by flwr, ray or torch, or by our code calling them;
    Ray's workers included), or Flower's DEPRECATED FEATURE log, fails here. Named exception: typer's use of click
    names click deprecates (typer/__init__.py, imported by every flwr import; see pyproject's filterwarnings)."""
    reference_run(tmp_path)
    text = _REFERENCE["stderr"]
    assert "fl-ietagc: done in" in text  # (the run's own output was captured)
    warned = [
        line
        for line in text.splitlines()
        if ("DeprecationWarning" in line or "FutureWarning" in line or "deprecated feature" in line.lower())
        and not ("/typer/__init__.py" in line and "'click.utils.get_" in line)
    ]
    assert warned == []


def test_two_clients_two_rounds_match_the_plain_loop(tmp_path):
    run = reference_run(tmp_path)
    cfg = _REFERENCE["cfg"]
    assert run.read_status()["status"] == "completed"
    for path in (
        run.checkpoint(1),
        run.checkpoint(2),
        run.final_checkpoint,
        run.samples_path,
        run.shards_path,
        run.skip_counts_path,
        run.config_path,
    ):
        assert path.is_file(), path
    metrics = run.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]

    # round 2 continues each client's step counter (= warmup position) and Adam state from round 1
    for r, m in enumerate(metrics, start=1):
        assert [c["client-step"] for c in m["clients"]] == [4 * r, 4 * r]
    for pid in (0, 1):
        state = load_torch(run.client_state(pid, 2), "client state")
        assert state["step"] == 8 and state["rounds"] == 2
        assert state["optimizer"]["state"][0]["step"].item() == 8
        assert state["bank"]["values"].abs().sum() > 0

    # AGC did skip, and the per-image counts add up to the reported skips
    skipped = sum(m["skipped"] for m in metrics)
    assert skipped > 0
    assert np.load(run.skip_counts_path).sum() == skipped

    # exactly the training of the Flower-free sequential loop (same shards, seeds, state, averaging)
    torch.set_num_threads(1)  # as in the 1-CPU Ray actors
    try:
        loop = run_iet_loop(cfg, 2, torch.device("cpu"))
    finally:
        torch.set_num_threads(2)
    final = load_checkpoint(run.final_checkpoint)
    for key in ("net", "ema"):
        ref = loop.net if key == "net" else loop.ema
        worst = max((final[key][k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 1e-6, (key, worst)
    assert [s.skipped for s in loop.rounds[-1]] == [c["skipped"] for c in metrics[-1]["clients"]]
    for pid in (0, 1):
        state = load_torch(run.client_state(pid, 2), "client state")
        torch.testing.assert_close(state["bank"]["values"], loop.states[pid].bank["values"], rtol=1e-6, atol=1e-9)


def test_a_failing_client_fails_the_command_with_one_line_naming_it(tmp_path, capfd):
    # (a client-state-dir that is a file is refused before the run; a file where the run's own folder inside it
    # would go is only met by the client)
    blocked = tmp_path / "states"
    blocked.mkdir()
    (blocked / "e2e").write_text("a file where the client wants its state directory")
    code, run, _ = simulate_app(tmp_path, f'client-state-dir="{blocked}"')
    assert code == 1
    status = run.read_status()
    assert status["status"] == "failed"
    assert status["error"].startswith(
        f"ClientRoundError: partition 0, round 1: RunWriteError: cannot write {blocked}/e2e/p0/round_0001.pt"
    )
    err = capfd.readouterr().err
    failed = [line for line in err.splitlines() if "run FAILED" in line]
    assert failed == [f"flower-simulation: run FAILED: {status['error']}"]
    assert "Traceback" in (run.logs_dir / "client-p0-r1.log").read_text()


def stop_mid_run(tmp_path, sig) -> tuple[RunDir, float]:
    """Start flower-simulation (2 clients x 2 rounds) whose round 2 waits, send it `sig` once round 1 is committed;
    returns the run and the seconds from the signal to the command's exit, after checking the exit code, the
    run's status and that no process of the simulation's group (Ray's included) is left."""
    import os
    import subprocess
    import sys
    import time

    overrides = SMALL.replace('run-name="e2e"', 'run-name="cut"') + f' output-dir="{tmp_path}"'
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.launch.simulate",
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--run-config",
            overrides,
            "--backend-config",
            ONE_ACTOR_JSON,
        ],
        cwd=ROOT,
        env={**os.environ, "FL_IETAGC_FAULT": "between-rounds:1:hang"},
        stderr=subprocess.PIPE,
        text=True,
    )
    run = RunDir(tmp_path / "cut")
    deadline = time.time() + 240
    while time.time() < deadline and not (run.status_path.is_file() and run.read_status().get("round") == 1):
        time.sleep(0.5)
    assert run.read_status().get("round") == 1, "round 1 was not committed within 240 s"
    group = run.read_status()["pid"]  # the simulation process, leader of the group Ray's processes are in
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    seconds = time.time() - t0
    # the child marks the run and ends its group at once; the parent would SIGKILL the group after 15 s
    assert proc.returncode == 128 + sig and seconds < simulate.STOP_GRACE_S + 5, (seconds, err[-2000:])
    assert f"continue it with: fl-ietagc resume {run.path}" in err
    status = run.read_status()
    assert status["status"] == "interrupted" and status["round"] == 1
    time.sleep(1)
    left = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True).stdout.split()
    assert str(group) not in left
    return run, seconds


def test_ctrl_c_stops_within_seconds_and_the_run_resumes_bit_identical(tmp_path):
    """SIGINT to flower-simulation while round 2 waits: exit 130 in seconds, no process left of its group,
    status interrupted; `--resume` then ends with the weights of the uninterrupted run."""
    import signal

    run, _ = stop_mid_run(tmp_path, signal.SIGINT)
    assert (
        simulate.main(
            [
                "--app",
                str(ROOT),
                "--resume",
                str(run.path),
                "--backend-config",
                ONE_ACTOR_JSON,
            ]
        )
        == 0
    )
    assert run.read_status()["status"] == "completed"
    ref = load_checkpoint(reference_run(tmp_path).final_checkpoint)
    got = load_checkpoint(run.final_checkpoint)
    for part in ("net", "ema"):
        assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part])


def test_sigterm_stops_within_seconds_leaving_no_process(tmp_path):
    import signal

    stop_mid_run(tmp_path, signal.SIGTERM)  # exit 143, status interrupted, the process group gone
