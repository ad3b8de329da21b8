"""Pixel ranges, in one place: datasets are uint8 [0, 255], the model works in [-1, 1], image files in [0, 1]."""

from __future__ import annotations

import torch


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] (clamped) -> uint8 [0, 255], rounded."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> float [0, 1] (clamped), as image files want."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def uint8_to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]."""
    return images_uint8.float() / 255.0
