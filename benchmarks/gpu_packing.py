"""K clients packed on one GPU (fractional num_gpus) vs one client alone, through the real Flower simulation.

    python benchmarks/gpu_packing.py [--clients 4] [--preset ddpm-cifar10] [--batch-size 128] [--rounds 3]
                                     [--steps-per-client 40 | --paper-round] [--precision bf16] [--channels-last]
                                     [--compile] [--compile-mode reduce-overhead] [--device cuda|cpu]
                                     [--max-images N] [--timeout-s 600]

Runs `flower-simulation` (experiments/launch/simulate.py, the project's launcher) twice on the embedded digits data
at --image-size: once with 1 client holding the whole GPU (num_gpus = 1), once with K clients sharing it
(num_gpus = 1/K each, CPUs split evenly). Each client does about --steps-per-client optimizer steps per round
(local-epochs is derived from its shard size). Aggregate img/s = images trained by all clients in a round / the
round's wall time, over rounds 2+ (round 1 starts the Ray actors, loads CUDA and compiles). Also shown: the
clients' own img/s (their training loop's time), which falls as they share the GPU, and each client's fixed cost
per round (round wall - its own training seconds): what packing can hide behind another client's training.

Round length: --steps-per-client 40 is a quick check; --paper-round is the paper's round (E = 100 local epochs of
39 steps on a 5,000-image shard: 3,900 steps per client per round; about 30 min for 1 and 4 clients on one H100
with --rounds 2), where the fixed cost is a small part of a round.

--device cuda (default) needs a CUDA GPU: without one it prints one line saying so and exits 2. --device cpu runs
the same simulations with num_gpus = 0 (the CI smoke test of scripts/gpu-check.sh --cpu). Each simulation is
bounded by --timeout-s and a failed or timed-out one is named in one line (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from fl_ietagc.settings.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.launch import run_simulation  # noqa: E402

HOLDOUT = 0.1  # digits has no test split: the run config's default holdout-fraction
PAPER_ROUND_STEPS = 100 * 39  # the paper's round: E = 100 local epochs x 39 steps (5,000 images, batch 128)


def simulate(
    run_config: str, clients: int, cpus: float, gpus: float, out: Path, name: str, timeout_s: float = 600.0
) -> tuple[list, float]:
    """(metrics.json rounds, wall seconds) of one simulation."""
    wall = run_simulation(
        run_config, clients, {"num_cpus": cpus, "num_gpus": gpus}, out, name, timeout_s, who="gpu_packing"
    )
    return json.loads((out / name / "metrics.json").read_text()), wall


def summarize(rounds: list, batch_size: int) -> tuple[float, float, float, float]:
    """(aggregate img/s over rounds 2+, mean client-own img/s, mean round seconds, mean client fixed cost: round
    seconds - the client's own training seconds)."""
    ends = [r["elapsed-s"] for r in rounds]
    seconds = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    later = list(zip(rounds, seconds))[1:] or list(zip(rounds, seconds))
    images = sum(r["steps"] * batch_size for r, _ in later)
    wall = sum(s for _, s in later)
    own = [c["steps"] * batch_size / c["seconds"] for r, _ in later for c in r["clients"] if c["seconds"] > 0]
    fixed = [s - c["seconds"] for r, s in later for c in r["clients"]]
    return images / wall, sum(own) / max(len(own), 1), wall / len(later), sum(fixed) / max(len(fixed), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="K clients sharing the GPU")
    p.add_argument("--preset", choices=("tiny", "ddpm-cifar10"), default="ddpm-cifar10")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-client", type=int, default=40)
    p.add_argument(
        "--paper-round",
        action="store_true",
        help=f"the paper's round length: {PAPER_ROUND_STEPS} steps per client (overrides --steps-per-client)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default", help="run-config compile-mode (with --compile)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-images", type=int, default=0, help="digits images used (0 = all)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="bound on each simulation")
    a = p.parse_args(argv)
    if a.paper_round:
        a.steps_per_client = PAPER_ROUND_STEPS
    import torch  # (after the options: a wrong one answers before torch loads)

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_packing: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run", file=sys.stderr)
        return 2
    from fl_ietagc.data.datasets import load_splits

    base = (
        f"preset={a.preset} image-size={a.image_size} batch-size={a.batch_size} num-server-rounds={a.rounds} "
        f"precision={a.precision} channels-last={str(a.channels_last).lower()} "
        f"compile={str(a.compile).lower()} device={a.device} sample-count=0 warmup-steps=0 "
        f"max-images={a.max_images}" + (f' compile-mode="{a.compile_mode}"' if a.compile else "")
    )
    n_train = len(load_splits(parse_config({"image-size": a.image_size, "max-images": a.max_images})).train.images)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, a.clients):
            shard = n_train // k
            if shard < a.batch_size:
                raise SystemExit(f"gpu_packing: {k} shards of {shard} images: smaller than --batch-size {a.batch_size}")
            epochs = math.ceil(a.steps_per_client / (shard // a.batch_size))
            gpus = 1.0 / k if a.device == "cuda" else 0.0
            rounds, wall = simulate(
                f"{base} local-epochs={epochs}", k, max(1, cores // k), gpus, Path(tmp), f"k{k}", a.timeout_s
            )
            rows.append((k, epochs, *summarize(rounds, a.batch_size), wall))
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({cores} cores, num_gpus 0)"
    print(
        f"{where}; torch {torch.__version__}; {a.preset} at 1x{a.image_size}x{a.image_size} "
        f"(digits), batch {a.batch_size}, {a.precision}{', channels-last' if a.channels_last else ''}"
        f"{', compile' if a.compile else ''}; {a.rounds} rounds, ~{a.steps_per_client} steps per client per round"
    )
    print()
    print(
        "| clients on the GPU | num_gpus each | local epochs | aggregate img/s (rounds 2+) | vs 1 client "
        "| client's own img/s | round (s) | client fixed cost per round (s) | total wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    alone = rows[0][2]
    for k, epochs, rate, own, round_s, fixed, wall in rows:
        share = f"{1 / k:.3g}" if a.device == "cuda" else "0 (CPU)"
        print(
            f"| {k} | {share} | {epochs} | {rate:,.0f} | {rate / alone:.2f}x | {own:,.0f} | {round_s:.1f} "
            f"| {fixed:.2f} | {wall:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
