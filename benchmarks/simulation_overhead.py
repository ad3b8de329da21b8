"""Flower simulation overhead: the same IET-AGC training through `flower-simulation` vs a plain loop.

    python benchmarks/simulation_overhead.py [--clients 4] [--rounds 3] [--epochs 2]

Runs the default job's config (digits, tiny UNet) with fewer rounds/epochs three ways and prints per-round
wall times:
  loop        fl_ietagc.loops.iet: clients one after another in this process (torch threads = all cores)
  sim-serial  flower-simulation, client_resources num_cpus = all cores: one client at a time, same threads
  sim-par     flower-simulation, num_cpus = 1: one client per core in parallel (the default job's setting)
Round 1 of a simulation includes starting the Ray actors (each imports torch); the overhead per round is
measured on rounds >= 2. Total wall includes Ray start-up and the final sample grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.launch import run_simulation  # noqa: E402
from fl_ietagc.loops.iet import run_iet_loop  # noqa: E402
from fl_ietagc.settings.config import (  # noqa: E402
    parse_config,
    parse_overrides,
)


def simulate(overrides: str, clients: int, num_cpus: int, out: Path) -> tuple[list[float], float]:
    wall = run_simulation(overrides, clients, {"num_cpus": num_cpus}, out, f"sim{num_cpus}", who="simulation_overhead")
    elapsed = [m["elapsed-s"] for m in json.loads((out / f"sim{num_cpus}" / "metrics.json").read_text())]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)], wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    overrides = f"num-server-rounds={args.rounds} local-epochs={args.epochs} sample-count=16 sample-steps=10"
    cfg = parse_config(parse_overrides(overrides))
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    loop = run_iet_loop(cfg, args.clients, torch.device("cpu"))
    loop_wall = time.perf_counter() - t0
    steps = sum(s.steps for s in loop.rounds[0])
    rows = [("loop", loop.round_seconds, loop_wall)]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("sim-serial", *simulate(overrides, args.clients, cores, Path(tmp))))
        rows.append(("sim-par", *simulate(overrides, args.clients, 1, Path(tmp))))
    later_loop = sum(loop.round_seconds[1:]) / max(len(loop.round_seconds) - 1, 1)
    print(
        f"{args.clients} clients x {args.epochs} epochs, {steps} optimizer steps per round in total, "
        f"{cores} CPU cores, torch {torch.__version__}"
    )
    print("| variant | round 1 (s) | rounds 2+ mean (s) | overhead per round vs loop | total wall (s) |")
    print("|---|---|---|---|---|")
    for name, rounds, wall in rows:
        later = sum(rounds[1:]) / max(len(rounds) - 1, 1)
        print(
            f"| {name} | {rounds[0]:.1f} | {later:.2f} | {later - later_loop:+.2f} s ({later / later_loop:.2f}x) "
            f"| {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
