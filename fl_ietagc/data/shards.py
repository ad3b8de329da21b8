"""Splitting the training set into K shards (one per client).

Deterministic for a given seed and identical in every process (numpy's PCG64 generator, no
global state). Each shard is a sorted int64 array of indices into the training set; shards are
disjoint and together cover every image.

- balanced  (the paper's): per class, shard i takes the i-th contiguous slice of that class's
            images in dataset order. When a class does not divide by K, its leftover images go to
            the shards that have received fewest leftovers so far, so shard sizes differ by at most 1.
- random:   a seeded permutation, then K near-equal parts.
- dirichlet: non-IID; for each class, shard proportions ~ Dir(alpha). Redrawn (seeded) until every
            shard has at least `min_size` images.

Flower's partitioners (flwr-datasets) work on Hugging Face `datasets` objects and have no
per-class contiguous split, so this small module is our own.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_ietagc.data.datasets import load_splits
from fl_ietagc.data.latent import training_pairs
from fl_ietagc.settings.config import ConfigError, RunConfig

DIRICHLET_TRIES = 1000


def make_shards(
    labels: np.ndarray, num_shards: int, method: str, seed: int, alpha: float = 0.5, min_size: int = 1
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    n = len(labels)
    if num_shards < 1:
        raise ConfigError(f"num-clients = {num_shards}: must be >= 1")
    if num_shards * min_size > n:
        raise ConfigError(
            f"num-clients = {num_shards}: {n} training images cannot give {num_shards} shards of "
            f"at least {min_size} image(s) (batch-size); use fewer clients, a smaller batch-size "
            f"or more images"
        )
    if method == "balanced":
        shards = _balanced(labels, num_shards)
    elif method == "random":
        shards = np.array_split(np.random.default_rng(seed).permutation(n), num_shards)
    elif method == "dirichlet":
        shards = _dirichlet(labels, num_shards, alpha, seed, min_size)
    else:
        raise ConfigError(f"sharding = {method!r}: must be one of balanced, random, dirichlet")
    shards = [np.sort(s).astype(np.int64) for s in shards]
    smallest = min(len(s) for s in shards)
    if smallest < min_size:
        raise ConfigError(
            f"batch-size = {min_size}: the smallest {method} shard has {smallest} images; "
            f"lower batch-size or num-clients"
        )
    return shards


def _balanced(labels: np.ndarray, k: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    extra_given = np.zeros(k, np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)  # dataset order within the class
        base, rest = divmod(len(idx), k)
        # leftovers go to the shards with the fewest leftovers so far (ties: lowest shard id)
        takers = np.argsort(extra_given, kind="stable")[:rest]
        sizes = np.full(k, base)
        sizes[takers] += 1
        extra_given[takers] += 1
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for i in range(k):
            parts[i].append(idx[bounds[i] : bounds[i + 1]])
    return [np.concatenate(p) for p in parts]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(idx)).astype(int)
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
        shards = [np.concatenate(p) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ConfigError(
        f"dirichlet-alpha = {alpha}: no draw in {DIRICHLET_TRIES} gave every one of {k} shards "
        f">= {min_size} images; raise dirichlet-alpha or lower num-clients / batch-size"
    )


def shards_for_config(cfg, num_shards: int) -> list[np.ndarray]:
    """The run's K shards of the training set: what the server records and each client trains on."""
    labels = load_splits(cfg).train.labels.numpy()
    return make_shards(labels, num_shards, cfg.sharding, cfg.seed, cfg.dirichlet_alpha, min_size=cfg.batch_size)


def shard_inputs(cfg: RunConfig, ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a client (or centralized training) trains on for training-set ids `ids`: their uint8 images, or for
    model-type = latent-t2i their cached VAE latents and text embeddings (fl_ietagc/data/latent.py)."""
    index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if cfg.model_type == "latent-t2i":
        latents, text = training_pairs(cfg)
        return latents[index], text[index]
    return load_splits(cfg).train.images[index], None
