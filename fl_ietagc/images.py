"""Image grids (PNG) from model-range tensors."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid, about square."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    save_image(make_grid(to_unit_range(images), nrow=nrow, padding=2, pad_value=1.0), path)
    return path
