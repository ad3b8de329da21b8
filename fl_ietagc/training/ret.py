"""RET (Redistribute Ensemble Training, the follow-up to IET-AGC): this project's rules.

The RET paper publishes no exact rules for its two additions, so these are ours, each switchable:

Memory-sample redistribution (`ret-every` > 0, `ret-fraction` q). After every `ret-every`-th round, each
shard gives its m = floor(q * smallest shard size) most-skipped images (skip counts reported by the clients
since the previous redistribution; ties broken by a seeded permutation) to the shard `shift` places further on,
shift = 1 + (event - 1) mod (K - 1), so repeated events send images to different shards and never back at
once. Every shard gives m and receives m: each image stays in exactly one shard and shard sizes are kept.
Deterministic for (seed, event, counts).

Threshold-aware augmentation (`taa`, `taa-gamma` gamma, `taa-max-shift` S). With thr = M[t]/lambda (the bank
before the step's update), a sample whose loss lies just above the skip threshold, thr <= l < gamma * thr, gets
strength s = (gamma * thr - l) / ((gamma - 1) * thr), in (0, 1], the closer to thr the stronger; other samples
get 0. The strength is stored per image and used the next time the image is drawn: a random translation by up
to round(s * S) pixels in x and y (reflect padding), on top of the horizontal flip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fl_ietagc.federation.protocol import shard_key


def redistribute(
    shards: list[np.ndarray], skip_counts: np.ndarray, fraction: float, event: int, seed: int
) -> list[np.ndarray]:
    """New shards after one redistribution event (1-based). `skip_counts` is indexed by global image id."""
    k = len(shards)
    m = int(fraction * min(len(s) for s in shards))
    if k < 2 or m == 0:
        return [s.copy() for s in shards]
    shift = 1 + (event - 1) % (k - 1)
    rng = np.random.default_rng([seed, event])
    movers = []
    for s in shards:
        tiebreak = rng.permutation(len(s))
        order = np.lexsort((tiebreak, -skip_counts[s]))  # most skipped first; ties in seeded random order
        movers.append(s[order[:m]])
    return [
        np.sort(np.concatenate([np.setdiff1d(s, movers[i]), movers[(i - shift) % k]])) for i, s in enumerate(shards)
    ]


def after_round(cfg, shards: list[np.ndarray], skip_period: np.ndarray, server_round: int) -> list[np.ndarray] | None:
    """The shards for the next round if RET redistributes after `server_round` (every `ret-every`-th round, never
    after the last), else None. `skip_period` counts skips per global image id since the previous event; the
    caller resets it when new shards are returned. The one rule both the ServerApp and the Flower-free loop use."""
    if not cfg.ret_every or server_round % cfg.ret_every or server_round >= cfg.num_server_rounds:
        return None
    return redistribute(shards, skip_period, cfg.ret_fraction, server_round // cfg.ret_every, cfg.seed)


class ShardAssignment:
    """The current shards, and what each client is told of them in its train instruction.

    Until RET first redistributes, nothing (every client derives its shard from the config). After that, a
    client whose partition the server knows gets its own list only; a SuperNode whose partition the server has
    not learnt yet (it has not replied since this server process started, e.g. the first round after a resume)
    gets all K lists and picks its own by its node config's partition-id."""

    def __init__(self, shards: list[np.ndarray], redistributed: bool = False):
        self.shards, self.redistributed = list(shards), redistributed

    def assign(self, shards: list[np.ndarray]) -> None:
        """RET moved images: these are the shards from now on."""
        self.shards, self.redistributed = list(shards), True

    def instruction(self, partition_id: int | None) -> dict[str, list[int]]:
        """Train-config entries for the client of `partition_id` (None: not known yet)."""
        if not self.redistributed:
            return {}
        parts = range(len(self.shards)) if partition_id is None else (partition_id,)
        return {shard_key(p): self.shards[p].tolist() for p in parts}


def moved_count(old: list[np.ndarray], new: list[np.ndarray]) -> int:
    """How many images changed shard."""
    return int(sum(len(np.setdiff1d(b, a)) for a, b in zip(old, new)))


def taa_strength(losses: torch.Tensor, threshold: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample augmentation strength in [0, 1]: (gamma*thr - l) / ((gamma-1)*thr) on [thr, gamma*thr)."""
    losses, threshold = losses.detach().double(), threshold.double()
    band = (losses >= threshold) & (losses < gamma * threshold) & (threshold > 0)
    s = (gamma * threshold - losses) / ((gamma - 1) * threshold.clamp(min=1e-300))
    return torch.where(band, s, torch.zeros_like(s)).float()


def translate(x: torch.Tensor, strength: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random integer (dx, dy), |dx|, |dy| <= round(strength * max_shift), reflect padding."""
    limit = (strength * max_shift).round().to(x.device)
    if not bool((limit > 0).any()):
        return x
    b, _, h, w = x.shape
    u = torch.rand((2, b), generator=generator, device=x.device)
    shift = (u * (2 * limit + 1)).floor() - limit  # uniform integers in [-limit, limit]
    pad = max_shift
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.arange(h, device=x.device)[None, :] + pad - shift[1][:, None].long()  # (b, h)
    cols = torch.arange(w, device=x.device)[None, :] + pad - shift[0][:, None].long()  # (b, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
