"""Evaluation throughput: DDIM sampling in fp32 vs bf16 (vs compile), and the memorization kNN pass.

    python benchmarks/sampling.py [--preset tiny] [--image-size 32] [--channels 3] [--num-images 64]
                                  [--batch-size 64] [--steps 50] [--compile] [--queries 1024] [--train 5000]

Sampling: fl_ietagc.training.diffusion.sample (DDIM, eta 0) with an untrained UNet of the preset (the cost does not
depend on the weights); img/s over --num-images after one untimed warm-up batch (which compiles, shown
apart). Variants: fp32, bf16 (autocast around the UNet forward), and with --compile bf16 + channels-last +
torch.compile (the last partial batch is padded, so there is one compiled shape).
Memorization: fl_ietagc.evaluation.memorization.nearest_neighbours + summarize (k = 50) for --queries x --train random
uint8 images of --mem-channels x --mem-size x --mem-size (0 queries: skipped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.device_args import add_device_args, apply_device_args  # noqa: E402
from fl_ietagc.evaluation.memorization import nearest_neighbours, summarize  # noqa: E402
from fl_ietagc.training import compiled  # noqa: E402
from fl_ietagc.training.diffusion import Diffusion, sample  # noqa: E402
from fl_ietagc.training.models import build_unet  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(model, a, device: torch.device, **options) -> tuple[float, float]:
    """(warm-up seconds, seconds for --num-images) of DDIM sampling with these options."""
    shape = (a.channels, a.image_size, a.image_size)
    diffusion = Diffusion(1000)
    common = dict(steps=a.steps, seed=0, batch_size=a.batch_size, device=device, **options)
    t0 = time.perf_counter()
    sample(model, diffusion, min(a.batch_size, a.num_images), shape, **{**common, "steps": 2})
    sync(device)
    t1 = time.perf_counter()
    sample(model, diffusion, a.num_images, shape, **common)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def time_memorization(a, device: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    shape = (a.mem_channels, a.mem_size, a.mem_size)
    train = torch.randint(0, 256, (a.train, *shape), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (a.queries, *shape), generator=g, dtype=torch.uint8)
    if device.type == "cuda":
        nearest_neighbours(queries[: a.chunk], train, 50, device=device, chunk=a.chunk)  # warm-up
        sync(device)
    t0 = time.perf_counter()
    summarize(nearest_neighbours(queries, train, 50, device=device, chunk=a.chunk), a.train)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "ddpm-cifar10"), default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--compile", action="store_true", help="add the bf16 + channels-last + compile variant")
    p.add_argument(
        "--compile-mode",
        action="append",
        default=[],
        help="with --compile: add the compiled variant in this compile-mode too (repeatable), e.g. "
        "reduce-overhead (CUDA graphs)",
    )
    p.add_argument("--queries", type=int, default=1024, help="memorization pass: generated images (0 = skip)")
    p.add_argument("--train", type=int, default=5000, help="memorization pass: training images")
    p.add_argument("--mem-size", type=int, default=32)
    p.add_argument("--mem-channels", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1024)
    add_device_args(p)
    a = p.parse_args(argv)
    device = apply_device_args(a)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} torch threads)"
    )
    torch.manual_seed(0)
    model = build_unet(a.preset, a.image_size, a.channels).to(device)
    variants = [("fp32", {}), ("bf16", {"precision": "bf16"})]
    if a.compile:
        variants.append(("bf16+channels-last+compile", {"precision": "bf16", "channels_last": True, "compile": True}))
        variants += [
            (
                f"bf16+channels-last+compile {mode}",
                {"precision": "bf16", "channels_last": True, "compile": True, "compile_mode": mode},
            )
            for mode in a.compile_mode
        ]
    rows = [(label, *time_sampling(model, a, device, **options)) for label, options in variants]
    print(
        f"{name}; torch {torch.__version__}; DDIM-{a.steps}, {a.preset} at {a.channels}x{a.image_size}x"
        f"{a.image_size}, {a.num_images} images in batches of {a.batch_size}"
        + (f"; compile backend {compiled.backend()}" if a.compile else "")
    )
    print()
    print("| sampling variant | warm-up (s) | img/s | vs fp32 |")
    print("|---|---|---|---|")
    base = a.num_images / rows[0][2]
    for label, warm, dt in rows:
        print(f"| {label} | {warm:.1f} | {a.num_images / dt:,.2f} | {a.num_images / dt / base:.2f}x |")
    if a.queries:
        dt = time_memorization(a, device)
        dim = a.mem_channels * a.mem_size**2
        print()
        print("| memorization pass (k = 50) | seconds | queries/s |")
        print("|---|---|---|")
        print(f"| {a.queries:,} x {a.train:,} x {dim:,} | {dt:.1f} | {a.queries / dt:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
