"""Reusing a run outside the project: a diffusers pipeline directory, metrics as JSON lines and TensorBoard."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fl_ietagc.cli import main as cli
from fl_ietagc.loops.centralized import run_centralized
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.diffusion import Diffusion, sample
from fl_ietagc.training.run_model import build_for_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = parse_config(
        {
            "max-images": 64,
            "image-size": 8,
            "batch-size": 32,
            "num-server-rounds": 2,
            "local-epochs": 2,
            "diffusion-steps": 50,
            "warmup-steps": 2,
            "sample-count": 0,
            "output-dir": str(tmp_path_factory.mktemp("runs")),
            "run-name": "r",
        }
    )
    return run_centralized(cfg, progress=False), cfg


def test_export_writes_a_pipeline_that_diffusers_loads_and_samples_as_we_do(run, tmp_path, capsys):
    from diffusers import DDIMPipeline

    rundir, cfg = run
    out = tmp_path / "pipe"
    umask = os.umask(0o022)
    try:
        assert cli(["export", str(rundir.path), str(out)]) == 0
    finally:
        os.umask(umask)
    assert "DDIMPipeline.from_pretrained" in capsys.readouterr().out
    pipe = DDIMPipeline.from_pretrained(out)
    final = torch.load(rundir.final_checkpoint, weights_only=True)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, final["net"][k]), k  # raw weights by default, as evaluate
    images = pipe(
        batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np"
    ).images  # (N, H, W, C) in [0, 1]
    model = build_for_config(cfg)
    model.load_state_dict(final["net"])
    ours = sample(model, Diffusion.for_config(cfg), 3, (1, 8, 8), steps=4, seed=5, batch_size=3)
    np.testing.assert_allclose(images.transpose(0, 3, 1, 2), ((ours + 1) / 2).numpy(), atol=1e-5)

    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {
        ".": 0o755,
        "model_index.json": 0o644,
        "scheduler": 0o755,
        "scheduler/scheduler_config.json": 0o644,
        "unet": 0o755,
        "unet/config.json": 0o644,
        "unet/diffusion_pytorch_model.safetensors": 0o644,
    }  # readable like any new file (umask 022)

    assert cli(["export", str(rundir.path), str(out)]) == 2  # never over an existing export
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli(["export", str(rundir.path), str(tmp_path / "r1"), "--round", "7"]) == 2
    assert "--round 7: no checkpoint" in capsys.readouterr().err
    assert cli(["export", str(rundir.path), str(tmp_path / "ema"), "--weights", "ema", "--round", "1"]) == 0
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written directory left


def test_metrics_as_json_lines_and_tensorboard_scalars(run, tmp_path, capsys):
    rundir, _ = run
    assert cli(["metrics", str(rundir.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == rundir.read_metrics()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli(["metrics", str(rundir.path), "--tensorboard", str(tmp_path / "tb")]) == 0
    acc = EventAccumulator(str(tmp_path / "tb" / "r"))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in rundir.read_metrics()], rel=1e-6)
    assert "loss-per-client/client-0" in acc.Tags()["scalars"]
    assert cli(["metrics", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly(run):
    """`fl-ietagc metrics RUN | head`: no BrokenPipeError traceback, exit 141 as a command ended by SIGPIPE."""
    rundir, _ = run
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fl_ietagc.cli import main; sys.exit(main())",
            "metrics",
            str(rundir.path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == ""
