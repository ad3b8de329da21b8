"""The arithmetic of SecAgg+ as Flower 1.41 runs it, for the settings and the error bound (no Flower import).

Flower's `secaggplus_mod` turns client c's weights w_c (n_c examples) into integers before masking them:

    q_c = round(n_c / M * Q)                       M = max-weight, Q = quantization range (Flower's target_range)
    x_c = (q_c / Q) * w_c                          the client pre-multiplies by its weight
    u_c = stochastic_round((clip(x_c, -C, C) + C) * Q / (2C))      C = clipping range

and the server, once the masks cancel, gets sum_c u_c and sum_c q_c (mod 2^32) and returns

    A = (sum_c u_c * 2C/Q - K'C) / (sum_c q_c / Q)      K' = clients whose masked vector was summed.

With M a power of two no larger than Q (and Q a power of two), q_c / Q = n_c / M exactly, so the weights are
exactly the shard-size weights of plain aggregation; stochastic rounding moves each u_c by less than 1, so

    |A - sum_c n_c w_c / sum_c n_c| < K' * (2C/Q) / (sum_c n_c / M)                        (`error_bound`)

as long as no |x_c| exceeds C (the client checks |w_c| <= C: x_c = (n_c/M) w_c with n_c <= M) and the
integer sums stay below the modulus 2^32 (K' * Q < 2^32, checked before a run starts).
"""

from __future__ import annotations

import math

MODULUS = 2**32  # Flower's default modulus_range (pairwise masks are drawn below it)


def is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def max_weight(shard_sizes, quantization_range: int) -> int:
    """M: the smallest power of two >= the largest shard, so that q_c / Q = n_c / M exactly. Raises ValueError when
    that needs M > Q (a shard of more than Q images)."""
    largest = max(int(n) for n in shard_sizes)
    m = 1 << max(0, math.ceil(math.log2(max(largest, 1))))
    if m > quantization_range:
        raise ValueError(
            f"secagg-quantization-range = {quantization_range}: a shard of {largest} images needs "
            f"a quantization range of at least {m} for exact shard-size weights"
        )
    return m


def error_bound(shard_sizes, clipping_range: float, quantization_range: int) -> float:
    """Largest difference, per weight, between the SecAgg+ aggregate of these clients and the exact shard-size
    weighted mean of their weights (see the module docstring)."""
    m = max_weight(shard_sizes, quantization_range)
    total_ratio = sum(int(n) for n in shard_sizes) / m
    return len(shard_sizes) * (2 * clipping_range / quantization_range) / total_ratio


def shares_and_threshold(num_clients: int, num_shares: int, threshold: int) -> tuple[int, int]:
    """(shares, reconstruction threshold) Flower's workflow will use with these keys (0 = the defaults: every
    client holds a share; a majority of the shares, at least 2, rebuilds a secret)."""
    shares = num_shares or num_clients
    return shares, threshold or max(2, shares // 2 + 1)
