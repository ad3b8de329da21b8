"""Memorization metrics from one exact k-nearest-neighbour pass in pixel space.

For each query image q (a generated image, or a held-out real one for the null rate), with squared
L2 distances to every training image (pixels in [0, 1], summed over all pixels): d_1 <= d_2 <= ... <= d_k.

- MQ (IET-AGC's metric, as its reference code computes it): r(q) = d_1 / mean(d_1..d_k), k = 50, on
  squared distances; report how many queries have r < tau for tau in 0.15, 0.2, 0.3, ..., 0.9.
- The 1/3 rule (Yoon et al.; Gu et al.): sqrt(d_1) / sqrt(d_2) < 1/3, on plain L2 distances.
- Carlini et al. (2023): l(q) = sqrt(d_1) / (0.5 * mean(sqrt(d_1..d_k))); extracted when l < 1.
All three come from the same top-k.

The pass: queries in chunks; ||q||^2 + ||x||^2 - 2 q.x with one matrix product per chunk (TF32 off),
top (k + margin) candidates, then the candidates' distances recomputed exactly by direct subtraction and
re-sorted. The expansion alone has an absolute error of ~1e-7 * ||x||^2, which would blur near-exact copies
(a copy's true distance is 0); the recomputation is exact for uint8 images (integer sums, then / 255^2) and
float64 for float images, so d_1 = 0 for an exact copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

TAUS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CANDIDATE_MARGIN = 16
RELIABLE_TRAIN_PER_K = 100  # MQ needs the k nearest to be a small neighbourhood of a large training set


@dataclass
class Neighbours:
    d2: torch.Tensor  # (N, k) float64, exact squared distances, ascending
    index: torch.Tensor  # (N, k) int64, training-set indices
    dim: int  # pixels per image (C * H * W)

    @property
    def k(self) -> int:
        return self.d2.shape[1]


def flatten_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 [0, 255] or float [0, 1] -> (N, D) float32 in [0, 1]."""
    x = images.reshape(images.shape[0], -1)
    return x.float().div_(255.0) if images.dtype == torch.uint8 else x.float()


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, train: torch.Tensor, k: int = 50, *, device="cpu", chunk: int = 1024, progress: bool = False
) -> Neighbours:
    """Exact k nearest training images (squared L2 in [0, 1] pixel space) of every query."""
    k = min(k, train.shape[0])
    device = torch.device(device)
    x = flatten_unit(train).to(device)
    x_norm = x.pow(2).sum(1)
    integer = queries.dtype == torch.uint8 and train.dtype == torch.uint8
    x_exact = _exact_form(train, integer).to(device)
    n_cand = min(k + CANDIDATE_MARGIN, x.shape[0])
    out_d2, out_idx = [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    starts = range(0, queries.shape[0], chunk)
    if progress:
        starts = tqdm(starts, desc="nearest neighbours", unit="chunk")
    try:
        for s in starts:
            q = flatten_unit(queries[s : s + chunk]).to(device)
            approx = (q.pow(2).sum(1, keepdim=True) + x_norm[None]).addmm_(q, x.T, alpha=-2.0)
            cand = approx.topk(n_cand, dim=1, largest=False).indices
            del approx
            q_exact = _exact_form(queries[s : s + chunk], integer).to(device)
            exact = _exact_d2(q_exact, x_exact, cand)
            order = exact.argsort(dim=1, stable=True)[:, :k]
            out_d2.append(exact.gather(1, order).cpu())
            out_idx.append(cand.gather(1, order).cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if not out_d2:  # no queries
        return Neighbours(torch.empty((0, k), dtype=torch.float64), torch.empty((0, k), dtype=torch.long), x.shape[1])
    return Neighbours(torch.cat(out_d2), torch.cat(out_idx), x.shape[1])


def _exact_form(images: torch.Tensor, integer: bool) -> torch.Tensor:
    """(N, D) for the exact recomputation: int16 [0, 255] when both sides are uint8, else float64 in [0, 1]
    (a uint8 side of a mixed pair is scaled by 1/255, as flatten_unit does)."""
    x = images.reshape(images.shape[0], -1)
    if integer:
        return x.to(torch.int16)
    return x.double().div_(255.0) if images.dtype == torch.uint8 else x.double()


def _exact_d2(q: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """Squared distances (pixels in [0, 1]) of q[i] to x[cand[i, j]] by direct subtraction.

    uint8 images (given as int16) are summed as integers and scaled by 1/255^2: exact. Float images
    ([0, 1]) are summed in float64."""
    out = torch.empty(cand.shape, dtype=torch.float64, device=q.device)
    for r in range(0, q.shape[0], rows):
        diff = q[r : r + rows, None, :] - x[cand[r : r + rows]]
        if diff.dtype == torch.int16:
            out[r : r + rows] = diff.int().pow_(2).sum(-1).double() / 255.0**2
        else:
            out[r : r + rows] = diff.pow_(2).sum(-1)
    return out


def ratios(nb: Neighbours) -> dict[str, np.ndarray]:
    """Per query: MQ ratio r, the 1st/2nd-neighbour L2 ratio (Gu/Yoon), Carlini's l."""
    d2 = nb.d2
    d = d2.sqrt()
    mean_d2 = d2.mean(1)
    mq = torch.where(mean_d2 > 0, d2[:, 0] / mean_d2, torch.zeros_like(mean_d2))
    second = d[:, 1] if nb.k > 1 else d[:, 0]
    gu = torch.where(second > 0, d[:, 0] / second, torch.zeros_like(second))
    mean_d = d.mean(1)
    carlini = torch.where(mean_d > 0, d[:, 0] / (0.5 * mean_d), torch.zeros_like(mean_d))
    return {"mq": mq.numpy(), "gu": gu.numpy(), "carlini": carlini.numpy(), "l2_nearest": d[:, 0].numpy()}


def summarize(nb: Neighbours, num_train: int, taus=TAUS) -> dict:
    """Counts and fractions of each rule, plus quantiles; JSON-ready."""
    r = ratios(nb)
    n = len(r["mq"])

    def rate(mask) -> dict:
        c = int(np.count_nonzero(mask))
        return {"count": c, "fraction": c / n if n else 0.0}

    return {
        "num_queries": n,
        "k": nb.k,
        "num_train": num_train,
        "mq_reliable": num_train >= RELIABLE_TRAIN_PER_K * nb.k,
        "mq": {f"{t:g}": rate(r["mq"] < t) for t in taus},
        "one_third_rule": rate(r["gu"] < 1 / 3),
        "carlini": rate(r["carlini"] < 1.0),
        "exact_copies": rate(nb.d2[:, 0].numpy() == 0),
        "quantiles": {
            name: {f"q{int(p * 100):02d}": float(np.quantile(v, p)) for p in (0.01, 0.05, 0.5)}
            for name, v in r.items()
            if n
        },
        "mean_l2_nearest_per_pixel": float(np.mean(r["l2_nearest"]) / np.sqrt(nb.dim)) if n else 0.0,
    }
