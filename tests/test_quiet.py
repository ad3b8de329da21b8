"""What a user reads: expected third-party notices are switched off at their source (the setting they ask for),
and what that setting changes is covered by our own code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_ietagc.training.trainer import pick_device

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_core_opts_into_rays_accelerator_behaviour_and_unfolded_logs():
    keys = ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "RAY_DEDUP_LOGS")
    env = {k: v for k, v in os.environ.items() if k not in keys}
    code = f"import os, fl_ietagc; print([os.environ[k] for k in {keys}])"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120
    )
    assert out.stdout == "['0', '0']\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "RAY_DEDUP_LOGS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout == "['1', '1']\n"  # an explicit value wins


def test_a_ray_worker_without_a_gpu_share_trains_on_cpu(monkeypatch):
    """Ray no longer hides the GPUs from a num_gpus = 0 actor: the client asks Ray what it was given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", ray_gpus=[]) == torch.device("cpu")
    assert pick_device("auto", ray_gpus=["0"]) == torch.device("cuda")
    assert pick_device("auto", ray_gpus=None) == torch.device("cuda")  # not a Ray worker (deployment, server)
    assert pick_device("cpu", ray_gpus=["0"]) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device = 'cuda' but no CUDA device is visible"):
        pick_device("cuda", ray_gpus=[])


@pytest.mark.slow
def test_ray_starts_without_the_accelerator_future_warning():
    """One private Ray instance: ray.init says nothing about accelerator variables, and a num_gpus = 0 task is
    told it has no GPU (ray_gpu_ids() == []) while the driver is no Ray worker (None)."""
    code = (
        "import fl_ietagc, ray\n"
        "from fl_ietagc.training.trainer import ray_gpu_ids\n"
        "ray.init(address='local', num_cpus=1, num_gpus=0, include_dashboard=False, logging_level='ERROR')\n"
        "f = ray.remote(num_cpus=1, num_gpus=0)(lambda: __import__('fl_ietagc.training.trainer').training.trainer.ray_gpu_ids())\n"
        "print(ray_gpu_ids(), ray.get(f.remote(), timeout=120))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "None []"
    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in out.stderr
    assert "FutureWarning" not in out.stderr, out.stderr[-2000:]


def test_strategies_are_built_without_evaluation_and_without_saying_so():
    """Flower warns 'Federated evaluation will be skipped.' when fraction_evaluate=0.0 reaches its constructor;
    every registered strategy (and the DP wrapper) is built with evaluation off and nothing logged about it."""
    import logging

    from fl_ietagc.settings.config import STRATEGIES, parse_config
    from strategies.registry import build_strategy

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        for name in STRATEGIES:
            for dp in (0.0, 1.0):
                strategy = build_strategy(parse_config({"strategy": name, "dp-clip-norm": dp}), 3)
                inner = getattr(strategy, "strategy", strategy)
                assert (inner.fraction_evaluate, inner.min_evaluate_nodes) == (0.0, 0), name
                assert list(inner.configure_evaluate(1, None, None, None)) == [], name
    finally:
        flwr_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "skipped" in r.getMessage()] == []


def test_loading_text_to_image_parts_prints_no_diffusers_warning(tmp_path, capfd):
    """No 'install accelerate' block and no 'modules that should be kept in float32' line, in fp32 and bf16;
    the parts still come in the dtypes asked for."""
    from fl_ietagc.data.latent import load_components, save_components, tiny_components, unet_for

    save_components(tiny_components(seed=0, image_size=16), tmp_path / "parts")
    assert "Writing model shards" not in capfd.readouterr().err
    for dtype in (torch.float32, torch.bfloat16):
        parts = load_components(tmp_path / "parts", dtype)
        assert {p.dtype for p in parts.vae.parameters()} == {dtype}
        assert {p.dtype for p in parts.text_encoder.parameters()} == {dtype}
        assert {p.dtype for p in parts.unet.parameters()} == {torch.float32}
    unet_for(str(tmp_path / "parts"))
    err = capfd.readouterr().err
    assert "accelerate" not in err and "kept in float32" not in err and "Loading weights" not in err, err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # off for the load only
