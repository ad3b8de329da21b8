"""Failures are short, named and safe: NaN training, a failing client (fail / tolerate), a failed write.

The real ServerApp and ClientApp run on the in-process grid of tests/local_grid.py (no Ray)."""

import errno
import json

import numpy as np
import pytest
import torch

from fl_ietagc.runs.checkpoints import RunWriteError, atomic_write_bytes, load_checkpoint, load_torch
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import parse_config
from strategies.base import ClientRoundError
from tests.local_grid import LocalGrid, run_server

SMALL = {
    "max-images": 128,
    "batch-size": 32,
    "local-epochs": 1,
    "num-server-rounds": 3,
    "diffusion-steps": 20,
    "agc-lambda": 1.2,
    "warmup-steps": 0,
    "sample-count": 0,
}


def test_nan_loss_fails_the_run_naming_partition_round_and_step(tmp_path):
    cfg = {**SMALL, "lr": 1e30, "output-dir": str(tmp_path), "run-name": "nan"}
    with pytest.raises(ClientRoundError) as e:
        run_server(cfg, 2)
    # the first step with lr 1e30 makes every weight huge; the second step's loss is not finite
    assert str(e.value).startswith("partition 0, round 1, step 2: loss is ")
    assert str(e.value).endswith("(lr 1e+30) (and 1 more client failure(s))")
    run = RunDir(tmp_path / "nan")
    status = run.read_status()
    assert status["status"] == "failed" and status["error"] == f"ClientRoundError: {e.value}"
    assert "Traceback" not in status["error"] and (run.logs_dir / "failure.log").is_file()
    assert "NonFiniteError" in (run.logs_dir / "client-p0-r1.log").read_text()
    json.loads(run.metrics_path.read_text() if run.metrics_path.exists() else "[]")  # valid JSON
    assert run.committed_round() == 0 and not run.checkpoint(1).exists()  # nothing non-finite was written
    blob = run.read_resume()
    assert all(torch.isfinite(v).all() for v in blob["net"].values())


def test_nan_after_good_rounds_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Round 2's client loss is forced to NaN: round 1 stays committed, metrics.json stays valid JSON."""
    from fl_ietagc.training import diffusion

    real = diffusion.Diffusion.per_sample_loss

    def poisoned(self, model, x0, t, noise):
        losses = real(self, model, x0, t, noise)
        return losses * float("nan") if model.training and POISON else losses

    POISON = False
    monkeypatch.setattr(diffusion.Diffusion, "per_sample_loss", poisoned)
    cfg = {**SMALL, "output-dir": str(tmp_path), "run-name": "r"}
    grid = LocalGrid(2, cfg)
    original = grid.send_and_receive

    def deliver(messages, timeout=None):
        nonlocal POISON
        messages = list(messages)
        POISON = int(messages[0].content["config"]["server-round"]) == 2
        return original(messages, timeout)

    grid.send_and_receive = deliver
    with pytest.raises(ClientRoundError, match=r"^partition 0, round 2, step 3: loss is NaN \(lr 0.002\)"):
        run_server(cfg, 2, grid)
    run = RunDir(tmp_path / "r")
    assert [m["round"] for m in json.loads(run.metrics_path.read_text())] == [1]
    assert run.committed_round() == 1 and run.liveness() == "failed"
    good = load_checkpoint(run.checkpoint(1))
    assert all(torch.isfinite(v).all() for v in good["net"].values())


def test_centralized_with_nan_fails_with_one_line(tmp_path):
    from fl_ietagc.loops.centralized import run_centralized

    with pytest.raises(FloatingPointError, match=r"^round 1, step 2: loss is (NaN|Inf) \(lr 1e\+30\)$"):
        run_centralized(
            parse_config({**SMALL, "agc": False, "lr": 1e30, "output-dir": str(tmp_path), "run-name": "b"}),
            progress=False,
        )
    run = RunDir(tmp_path / "b")
    assert run.read_status()["error"].startswith("FloatingPointError: round 1, step 2: loss is")


def test_a_failing_client_fails_the_run_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:2:raise")
    with pytest.raises(ClientRoundError) as e:
        run_server({**SMALL, "output-dir": str(tmp_path), "run-name": "f"}, 2)
    assert str(e.value) == "partition 1, round 2: InjectedFault: injected fault at client-train-p1, round 2"
    run = RunDir(tmp_path / "f")
    assert run.committed_round() == 1 and run.read_status()["resume"] == f"fl-ietagc resume {run.path}"
    assert "Traceback (most recent call last)" in (run.logs_dir / "client-p1-r2.log").read_text()


def test_tolerate_aggregates_without_the_failed_client_and_does_not_advance_its_state(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:2:raise")
    cfg = {
        **SMALL,
        "client-failures": "tolerate",
        "min-clients-fraction": 0.5,
        "output-dir": str(tmp_path),
        "run-name": "t",
    }
    run_server(cfg, 2)
    run = RunDir(tmp_path / "t")
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    assert [[c["partition-id"] for c in m["clients"]] for m in metrics] == [[0, 1], [0], [0, 1]]
    assert metrics[1]["failed"] == [
        {"partition-id": 1, "error": "InjectedFault: injected fault at client-train-p1, round 2", "step": -1}
    ]
    # partition 1 trained in rounds 1 and 3 only (2 steps a round): its step counter shows it
    steps = [[c["client-step"] for c in m["clients"]] for m in metrics]
    assert steps == [[2, 2], [4], [6, 4]]
    state = load_torch(run.client_state(1, 3), "client state")
    assert state["rounds"] == 2 and state["step"] == 4
    # round 2's global weights are partition 0's alone (weights renormalised over the replies)
    assert metrics[1]["loss"] == metrics[1]["loss-per-client"][0]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"good")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunWriteError, match=f"cannot write {path}: No space left on device"):
        atomic_write_bytes(path, disk_full)
    assert path.read_bytes() == b"good" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_metrics_with_nan_are_strict_json(tmp_path):
    from fl_ietagc.runs.checkpoints import atomic_write_json

    atomic_write_json(tmp_path / "m.json", [{"loss": float("nan"), "x": [1.0, float("inf")]}])
    assert json.loads((tmp_path / "m.json").read_text()) == [{"loss": None, "x": [1.0, None]}]
    assert "NaN" not in (tmp_path / "m.json").read_text()
    # numpy scalars (a study's summary holds comparisons and counts computed with numpy) as their Python values
    atomic_write_json(tmp_path / "n.json", {"reached": np.bool_(True), "n": np.int64(3), "r": [np.float32("nan")]})
    assert json.loads((tmp_path / "n.json").read_text()) == {"reached": True, "n": 3, "r": [None]}


def test_a_corrupt_status_or_resume_file_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.status_path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{run.status_path}: corrupt status file"):
        run.read_status()
    run.resume_path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{run.resume_path}: empty file, not a resume point"):
        run.read_resume()
    run.resume_path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"{run.resume_path}: not a readable resume point"):
        run.read_resume()


class LosingGrid(LocalGrid):
    """Partition 1's SuperNode leaves after round `gone_after` (and comes back from round `back_at`, with a new
    node id, as a restarted SuperNode does)."""

    def __init__(self, k, run_config, gone_after: int, back_at: int = 10**9):
        super().__init__(k, run_config)
        self.gone_after, self.back_at, self.round = gone_after, back_at, 0

    def get_node_ids(self):
        ids = super().get_node_ids()
        if self.gone_after < self.round + 1 < self.back_at:
            return [i for i in ids if self.contexts[i].node_config["partition-id"] != 1]
        return ids

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.round = int(messages[0].content["config"]["server-round"])
        return super().send_and_receive(messages, timeout)


def test_a_supernode_gone_between_rounds_fails_the_run_naming_it_within_node_wait_s(tmp_path):
    import time

    cfg = {**SMALL, "node-wait-s": 0.5, "output-dir": str(tmp_path), "run-name": "g"}
    grid = LosingGrid(2, cfg, gone_after=1)
    t0 = time.time()
    with pytest.raises(ClientRoundError) as e:
        run_server(cfg, 2, grid)
    assert time.time() - t0 < 60
    assert str(e.value) == (
        "partition 1, round 2: SuperNode not connected at the start of the round (waited "
        "node-wait-s = 0.5 s); only 1 of 2 SuperNodes connected"
    )
    run = RunDir(tmp_path / "g")
    assert run.committed_round() == 1 and run.read_status()["status"] == "failed"


def test_tolerate_goes_on_without_a_gone_supernode_and_takes_it_back_when_it_returns(tmp_path):
    cfg = {
        **SMALL,
        "node-wait-s": 0.5,
        "client-failures": "tolerate",
        "min-clients-fraction": 0.5,
        "output-dir": str(tmp_path),
        "run-name": "t",
    }
    run_server(cfg, 2, LosingGrid(2, cfg, gone_after=1, back_at=3))
    run = RunDir(tmp_path / "t")
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    assert [[c["partition-id"] for c in m["clients"]] for m in metrics] == [[0, 1], [0], [0, 1]]
    assert metrics[1]["failed"] == [
        {
            "partition-id": 1,
            "step": -1,
            "error": "SuperNode not connected at the start of the round (waited node-wait-s = 0.5 s)",
        }
    ]
    assert [[c["client-step"] for c in m["clients"]] for m in metrics] == [[2, 2], [4], [6, 4]]


def test_resume_passes_the_ray_address_on(tmp_path, monkeypatch):
    """`fl-ietagc resume RUN_DIR --ray-address H:P` continues a failed federated run on that Ray cluster."""
    from experiments.launch import simulate
    from fl_ietagc import cli

    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:2:raise")
    with pytest.raises(ClientRoundError):
        run_server({**SMALL, "num-server-rounds": 2, "output-dir": str(tmp_path), "run-name": "r"}, 2)
    monkeypatch.delenv("FL_IETAGC_FAULT")
    seen = []
    monkeypatch.setattr(simulate, "_launch", lambda args: seen.append(args) or 0)
    assert cli.main(["resume", str(tmp_path / "r"), "--ray-address", "10.0.0.5:6379"]) == 0
    assert seen[0].resume == str(tmp_path / "r") and seen[0].ray_address == "10.0.0.5:6379"
    assert json.loads(seen[0].backend_config) == {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
