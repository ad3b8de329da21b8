"""Export a run's global model as a diffusers pipeline directory.

    fl-ietagc export RUN_DIR OUT [--weights raw|ema] [--round R]

OUT gets `DDIMPipeline(unet, scheduler).save_pretrained(OUT)`: the UNet (safetensors + config.json), the run's
noise schedule as a DDIMScheduler (the one `fl-ietagc evaluate` samples with: eta 0, x0 clipped, final step to
alpha_bar = 1) and model_index.json, so that

    from diffusers import DDIMPipeline
    pipe = DDIMPipeline.from_pretrained(OUT)
    images = pipe(batch_size=16, num_inference_steps=50).images

samples the run's model with no code of this project (tested: the same images as our sampler for the same noise).

A LoRA run (lora-rank > 0) of a text-to-image model exports its adapters the way diffusers' LoRA loaders read them:
OUT/pytorch_lora_weights.safetensors (`StableDiffusionPipeline.save_lora_weights`, diffusers' key names) and
OUT/base.json naming the base checkpoint (pretrained-dir) and the adapter settings, so that

    pipe = StableDiffusionPipeline.from_pretrained(BASE)   # BASE: base.json's "pretrained-dir"
    pipe.load_lora_weights(OUT)

gives the run's UNet (tested: the same outputs as our merged model). A pixel LoRA run exports the DDIM pipeline
above with the adapters merged into the base UNet.
The directory is written beside OUT and renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from fl_ietagc.evaluation.evaluate import load_run
from fl_ietagc.runs.checkpoints import atomic_write_json, load_checkpoint
from fl_ietagc.training.diffusion import Diffusion
from fl_ietagc.training.lora import ADAPTER_NAME, diffusers_lora_state, merged_copy
from fl_ietagc.training.models import build_unet, load_weights
from fl_ietagc.training.run_model import build_for_config


def export_pipeline(
    run_dir: str | Path, out: str | Path, weights: str = "raw", server_round: int | None = None
) -> Path:
    """Write the pipeline directory; ValueError / FileExistsError with one line naming the problem."""
    from diffusers import DDIMPipeline, DDIMScheduler

    if weights not in ("raw", "ema"):
        raise ValueError(f"--weights {weights}: must be raw or ema")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new OUT")
    run, cfg, _ = load_run(run_dir)
    if server_round is None:
        path = run.final_checkpoint
        if not path.is_file():
            raise ValueError(f"{path}: missing; the run has not completed (export a saved round with --round R)")
    else:
        path = run.checkpoint(server_round)
        if not path.is_file():
            raise ValueError(f"--round {server_round}: no checkpoint {path}")
    ckpt = load_checkpoint(path)
    key = "net" if weights == "raw" else "ema"
    if not isinstance(ckpt.get(key), dict):
        raise ValueError(f"{path}: no {key!r} weights (--weights {weights})")
    unet = build_for_config(cfg)
    load_weights(unet, ckpt[key], f"{path} ({weights})")
    if cfg.lora_rank and cfg.model_type == "latent-t2i":
        return _write_atomically(out, lambda tmp: _save_lora(tmp, unet, cfg, weights, path))
    if cfg.lora_rank:  # pixel: one self-contained pipeline, adapters merged into the base
        unet = merged_copy(unet, build_unet(cfg.preset, unet.config.sample_size, unet.config.in_channels))
    scheduler = DDIMScheduler(**Diffusion.for_config(cfg).scheduler_config, set_alpha_to_one=True)
    return _write_atomically(out, lambda tmp: DDIMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(tmp))


def _write_atomically(out: Path, write) -> Path:
    """`write(tmp)` fills a directory beside OUT, which is then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        _usual_modes(tmp)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _usual_modes(folder: Path) -> None:
    """Give the export the modes a normal new file and folder get under this umask (0644 / 0755 under 022): the
    weights file comes out of save_pretrained as 0600 (written through a private temporary file), and the
    directory itself is ours to share."""
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _save_lora(tmp: Path, unet, cfg, weights: str, checkpoint: Path) -> None:
    from diffusers import StableDiffusionPipeline

    # the adapter metadata (peft's LoraConfig: rank, alpha, targets) rides in the safetensors header; without it
    # diffusers would assume alpha = rank
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=diffusers_lora_state(unet),
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
        safe_serialization=True,
    )
    atomic_write_json(
        tmp / "base.json",
        {
            "pretrained-dir": str(Path(cfg.pretrained_dir).resolve()),
            "lora-rank": cfg.lora_rank,
            "lora-alpha": cfg.lora_alpha or cfg.lora_rank,
            "lora-targets": cfg.lora_targets,
            "weights": weights,
            "checkpoint": str(checkpoint),
        },
    )
