"""Client-level differential privacy accounting for the DP wrappers (dp-clip-norm / dp-client-clip-norm).

Each round every client's update (raw and EMA weights together, one vector) is clipped to norm S, the
server averages the K updates with shard-size weights n_c / sum n and adds Gaussian noise of std z * S / K
(Flower's `compute_stdv`). Replacing one client's data changes the weighted mean by at most
S * max n_c / sum n, so the round is a Gaussian mechanism with noise multiplier

    z_eff = (z * S / K) / (S * max n_c / sum n) = z * sum n / (K * max n_c)      (= z for equal shards)

Every client takes part in every round (no sampling, no amplification), so R rounds compose R Gaussian
mechanisms; Opacus' RDP accountant turns that into epsilon at the run's delta. This covers the weights
only: the per-client metrics (loss, per-image skip counts) travel in the clear and are not privatized.
"""

from __future__ import annotations

from fl_ietagc.settings.config import ConfigError


class AccountantMissing(ConfigError):
    """dp-noise-multiplier > 0 without opacus installed."""


def effective_noise_multiplier(noise_multiplier: float, num_clients: int, shard_sizes) -> float:
    """`shard_sizes`: of the clients aggregated this round (fewer than K when a lost client is tolerated: Flower's
    noise stays z * S / K while the mean is over fewer)."""
    sizes = [int(n) for n in shard_sizes]
    return noise_multiplier * sum(sizes) / (num_clients * max(sizes))


def rdp_accountant():
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as e:
        raise AccountantMissing(
            "dp-noise-multiplier > 0: the epsilon accounting needs opacus (pip install 'fl-ietagc[privacy]')"
        ) from e
    return RDPAccountant()


def epsilon(noise_multipliers: list[float], delta: float) -> float:
    """Epsilon after one full-participation Gaussian release per round with these noise multipliers."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return float("inf")
    accountant = rdp_accountant()
    for z in noise_multipliers:
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    return float(accountant.get_epsilon(delta))


def round_privacy(cfg, num_clients: int, shard_sizes, earlier: list[dict]) -> dict | None:
    """metrics.json's `privacy` entry of a round (None without DP): this round's settings and the epsilon spent
    so far; `earlier`: the records of the rounds before it (their `privacy` entries)."""
    clip = cfg.dp_clip_norm or cfg.dp_client_clip_norm
    if not clip:
        return None
    z_eff = effective_noise_multiplier(cfg.dp_noise_multiplier, num_clients, shard_sizes)
    history = [r["privacy"]["noise-multiplier-effective"] for r in earlier if r.get("privacy")] + [z_eff]
    return {
        "clipping": "server" if cfg.dp_clip_norm else "client",
        "clip-norm": clip,
        "noise-multiplier": cfg.dp_noise_multiplier,
        "noise-multiplier-effective": z_eff,
        "rounds": len(history),
        "delta": cfg.dp_delta,
        "epsilon": epsilon(history, cfg.dp_delta) if cfg.dp_noise_multiplier else float("inf"),
        "accountant": "opacus RDPAccountant, full participation, client-level",
    }
