"""An offline quality score: Frechet distance and precision/recall in the features of a small classifier.

FID needs Inception weights, which cannot always be had (offline machines, tests). A model that generates noise
copies nothing, so a memorization rate needs a quality score next to it. This module trains a small CNN
classifier on the dataset's own training split (deterministic: fixed seed, one thread, fixed recipe), caches it
under `$FL_IETAGC_CACHE/classifiers/`, and scores generated images in its 64-d penultimate feature space:

- CFD, "classifier Frechet distance": |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)), as FID computes it,
  but on this classifier's features; its values are NOT comparable with FID and are never called FID;
- precision / recall (Kynkaenniemi et al. 2019, k = 3): the fraction of generated images inside the real images'
  k-NN manifold, and of real images inside the generated images' manifold.

The reference set is the dataset's training split (all of it, not only a study's few training images), so real
held-out images score near the floor, a trained model above an untrained one (tested). Compare scores only at
equal numbers of images: the Frechet distance of a finite sample is biased upwards as N shrinks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fl_ietagc.data.pixels import to_model_range
from fl_ietagc.runs.checkpoints import load_torch, save_torch
from fl_ietagc.settings.cache import cache_root

RECIPE = {"version": 1, "epochs": 30, "batch_size": 64, "lr": 1e-3, "seed": 0, "width": 32, "features": 64}


class SmallClassifier(nn.Module):
    """conv-relu x3 (stride 1, 2, 2), global average pool -> `features`-d -> linear to the classes."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(features, features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class FeatureClassifier:
    net: SmallClassifier
    accuracy: float  # on the dataset's held-out split
    key: str  # cache key: dataset, size, training data digest, recipe

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, C, H, W) -> (N, 64) float64 features."""
        self.net.eval()
        out = [
            self.net.body(to_model_range(images[s : s + batch_size])).double()
            for s in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, RECIPE["features"]))


def cache_dir() -> Path:
    return cache_root("classifiers")


def classifier_for(
    dataset: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    progress: bool = False,
) -> FeatureClassifier:
    """The cached classifier of this training data and recipe, trained (deterministically) if not cached yet."""
    if train_images.dtype != torch.uint8 or train_images.dim() != 4:
        raise ValueError("classifier_for: images must be uint8 (N, C, H, W)")
    num_classes = int(train_labels.max()) + 1
    digest = hashlib.sha256(train_images.numpy().tobytes() + train_labels.numpy().astype(np.int64).tobytes())
    digest.update(repr(sorted(RECIPE.items())).encode())
    key = f"{dataset}-{train_images.shape[-1]}px-{digest.hexdigest()[:16]}"
    path = cache_dir() / f"{key}.pt"
    channels = train_images.shape[1]
    if path.is_file():
        net = SmallClassifier(channels, num_classes, RECIPE["width"], RECIPE["features"])
        blob = load_torch(path, "cached quality classifier")
        net.load_state_dict(blob["net"])
        return FeatureClassifier(net, float(blob["accuracy"]), key)
    net = _train(train_images, train_labels, num_classes, progress)
    with torch.no_grad():
        net.eval()
        pred = (
            torch.cat(
                [net(to_model_range(test_images[s : s + 512])).argmax(1) for s in range(0, len(test_images), 512)]
            )
            if len(test_images)
            else torch.zeros(0)
        )
    accuracy = float((pred == test_labels).float().mean()) if len(test_images) else float("nan")
    save_torch(path, {"net": net.state_dict(), "accuracy": accuracy, "recipe": dict(RECIPE), "key": key})
    return FeatureClassifier(net, accuracy, key)


def _train(images: torch.Tensor, labels: torch.Tensor, num_classes: int, progress: bool) -> SmallClassifier:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions on every machine: deterministic weights
    try:
        gen = torch.Generator().manual_seed(RECIPE["seed"])
        torch.manual_seed(RECIPE["seed"])
        net = SmallClassifier(images.shape[1], num_classes, RECIPE["width"], RECIPE["features"])
        opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
        x_all, n, bs = to_model_range(images), len(images), RECIPE["batch_size"]
        epochs = range(RECIPE["epochs"])
        if progress:
            epochs = tqdm(epochs, desc="quality classifier", unit="epoch")
        net.train()
        for _ in epochs:
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, bs):
                idx = perm[s : s + bs]
                loss = nn.functional.cross_entropy(net(x_all[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a and b (rows = samples), in float64.

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2)
    (symmetric positive semi-definite), which avoids sqrtm's complex round-off."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs >= 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


def _distance_chunks(a: np.ndarray, b: np.ndarray, rows: int = 1024):
    """(start, distances of a[start:start+rows] to all of b), float64, without an (n_a, n_b, d) tensor."""
    tb = torch.from_numpy(b)
    for s in range(0, len(a), rows):
        yield s, torch.cdist(torch.from_numpy(a[s : s + rows]), tb).numpy()


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of every row to its k-th nearest other row."""
    kth = min(k, len(x) - 1)
    out = np.empty(len(x))
    for s, d in _distance_chunks(x, x):
        out[s : s + len(d)] = np.partition(d, kth, axis=1)[:, kth]  # column 0 is the point itself (distance 0)
    return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of `points` within radius of at least one centre."""
    hits = [(d <= radii[None, :]).any(1) for _, d in _distance_chunks(points, centres)]
    return float(np.concatenate(hits).mean()) if hits else 0.0


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN radii."""
    return _inside(fake, real, _knn_radii(real, k)), _inside(real, fake, _knn_radii(fake, k))


def score(classifier: FeatureClassifier, images: torch.Tensor, reference_features: np.ndarray) -> dict:
    """CFD and precision/recall of uint8 `images` against the reference features."""
    f = classifier.features(images)
    p, r = precision_recall(reference_features, f)
    return {
        "cfd": frechet_distance(f, reference_features),
        "precision": p,
        "recall": r,
        "num_images": len(images),
        "num_reference": len(reference_features),
        "classifier_accuracy": classifier.accuracy,
        "classifier": classifier.key,
    }
