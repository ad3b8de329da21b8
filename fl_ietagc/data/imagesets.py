"""A dataset in memory: uint8 images with labels (and captions), its train / held-out split, and the held-out rule
(the last ceil(fraction * n) images of every class), shared by every loader in datasets.py and captions.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    captions: tuple[str, ...] | None = None  # dataset = captions: one per image

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, index) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        captions = None if self.captions is None else tuple(self.captions[i] for i in index)
        return ImageSet(self.images[torch.from_numpy(index)], self.labels[torch.from_numpy(index)], captions)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    heldout: ImageSet


def holdout_count(n: int, fraction: float) -> int:
    """How many of n images (of one class) are held out: ceil(fraction * n), keeping at least one to train on."""
    return min(n - 1, int(np.ceil(fraction * n))) if fraction > 0 else 0


def holdout_tail(data: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """Hold out the last holdout_count(n_c) images of every class c (independent of the seed)."""
    labels = data.labels.numpy()
    held = np.zeros(len(labels), bool)
    if fraction > 0:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            n_out = holdout_count(len(idx), fraction)
            held[idx[len(idx) - n_out :]] = True
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))
