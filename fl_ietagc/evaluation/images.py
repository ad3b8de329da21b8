"""Image grids (PNG) from model-range tensors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.data.latent import parts_for, vae_factor
from fl_ietagc.data.pixels import to_model_range, to_unit_range
from fl_ietagc.evaluation.t2i_eval import sample_from_captions
from fl_ietagc.runs.checkpoints import atomic_write_bytes
from fl_ietagc.training.diffusion import Diffusion, sample

MIN_GRID_WIDTH = 512  # px: small images (8-32 px) are enlarged so the grid can be looked at without zooming
PADDING = 2


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_width: int = MIN_GRID_WIDTH) -> Path:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid, about square, at least `min_width` px wide: each
    image is enlarged by the smallest whole factor that gets there, by pixel repetition (nearest), so the grid
    shows the generated pixels themselves, not an interpolation of them."""
    path = Path(path)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    images = upscale_for_width(images, min(nrow, images.shape[0]), min_width)
    grid = make_grid(to_unit_range(images), nrow=nrow, padding=PADDING, pad_value=1.0)
    atomic_write_bytes(path, lambda f: save_image(grid, f, format="png"))
    return path


def upscale_for_width(images: torch.Tensor, columns: int, min_width: int) -> torch.Tensor:
    """`images` (N, C, H, W) repeated factor x factor per pixel, the smallest whole factor for which `columns` of
    them side by side (with the grid's padding) are at least `min_width` px wide; unchanged when already so."""
    if images.shape[0] == 0:
        return images
    factor = max(1, math.ceil((min_width - PADDING * (columns + 1)) / (columns * images.shape[-1])))
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def write_sample_grid(cfg, model: torch.nn.Module, path: str | Path, device) -> Path:
    """`sample-count` DDIM (`sample-steps`) samples of `model`, seeded by `seed`, as one PNG grid."""
    if cfg.model_type == "latent-t2i":  # from the first sample-count training captions, one seed each
        return save_grid(_t2i_samples(cfg, model, device), path)
    size, channels = image_size(cfg), load_splits(cfg).train.channels
    images = sample(
        model.to(device),
        Diffusion.for_config(cfg),
        cfg.sample_count,
        (channels, size, size),
        sampler="ddim",
        steps=cfg.sample_steps,
        seed=cfg.seed,
        device=device,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
    )
    return save_grid(images, path)


def _t2i_samples(cfg, model: torch.nn.Module, device) -> torch.Tensor:
    parts = dataclasses.replace(parts_for(cfg.pretrained_dir, cfg.frozen_dtype), unet=model.to(device))
    captions = list(load_splits(cfg).train.captions[: cfg.sample_count])
    images, _ = sample_from_captions(
        parts,
        Diffusion.for_config(cfg),
        captions,
        steps=cfg.sample_steps,
        seed=cfg.seed,
        device=device,
        latent_size=image_size(cfg) // vae_factor(cfg.pretrained_dir),
    )
    return to_model_range(images)
