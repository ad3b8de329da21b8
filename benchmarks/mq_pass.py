"""Time the memorization nearest-neighbour pass at (up to) full scale.

    python benchmarks/mq_pass.py [--queries 65536] [--train 50000] [--size 32] [--device cpu] [--chunk 1024]

Random uint8 images stand in for samples and CIFAR-10's training set (the cost does not depend on the
content). Prints one table row: sizes, seconds, queries/s, and the time extrapolated to 65,536 x 50,000.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fl_ietagc.evaluation.memorization import nearest_neighbours, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=65536)
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--k", type=int, default=50)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (a.train, 3, a.size, a.size), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (a.queries, 3, a.size, a.size), generator=g, dtype=torch.uint8)
    if a.device.startswith("cuda"):
        nearest_neighbours(queries[: a.chunk], train, a.k, device=a.device, chunk=a.chunk)  # warm-up
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    nb = nearest_neighbours(queries, train, a.k, device=a.device, chunk=a.chunk)
    summarize(nb, a.train)
    dt = time.perf_counter() - t0
    full = dt * (65536 / a.queries) * (50000 / a.train) * (32 * 32 / a.size**2)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print("| device | queries x train x dim | chunk | seconds | queries/s | extrapolated 65,536 x 50,000 x 3,072 |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {name} | {a.queries:,} x {a.train:,} x {3 * a.size * a.size:,} | {a.chunk} | {dt:.1f} | "
        f"{a.queries / dt:,.0f} | {full / 60:.1f} min |"
    )


if __name__ == "__main__":
    main()
