"""Where one training step's time goes: torch.profiler over the project's own step, shares by kernel category.

    python benchmarks/profile_step.py [--preset ddpm-cifar10] [--batch-size 128] [--steps 5] [--warmup 3]
                                      [--precision bf16] [--no-channels-last] [--no-compile]
                                      [--compile-mode default|reduce-overhead|...] [--device cuda|cpu]

The step is fl_ietagc.training.trainer.LocalTrainer's (AGC on, EMA, data on the device) at the given settings (default:
the fastest measured, bf16 + channels-last + compile); --warmup steps first (compiling happens there), then
--steps steps under torch.profiler. Each kernel (on a GPU; each operator's own time on a CPU) is put in one
category by its name: conv (convolutions and the GEMMs cuDNN runs for them), matmul (linear layers' GEMMs),
norm (group/layer norm, also when fused into a Triton kernel), attention (scaled-dot-product / flash / softmax),
optimizer (Adam's multi-tensor kernels, the EMA lerp), elementwise (other pointwise and reduction kernels,
copies) and other. Prints one markdown table: time per step and share of the profiled device time per category.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.device_args import add_device_args, apply_device_args  # noqa: E402
from fl_ietagc.settings.config import parse_config  # noqa: E402
from fl_ietagc.training.models import build_unet, count_parameters  # noqa: E402
from fl_ietagc.training.trainer import LocalTrainer, TrainState  # noqa: E402

# first match wins; names lower-cased. Inductor names fused kernels after the ops they fuse
# (e.g. triton_per_fused_native_group_norm_silu_0), so norm is tested before elementwise.
CATEGORIES = (
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax", "efficient_attention")),
    ("norm", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm", "norm")),
    ("conv", ("conv", "cudnn", "implicit_gemm", "xmma", "winograd", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "matmul", "addmm", "aten::mm", "aten::bmm", "cublas", "cutlass", "sm90", "sm80")),
    (
        "elementwise",
        (
            "triton_poi",
            "triton_per",
            "triton_red",
            "elementwise",
            "vectorized",
            "reduce",
            "copy",
            "fill",
            "aten::",
            "cat",
            "index",
        ),
    ),
)
ORDER = ("conv", "matmul", "norm", "attention", "elementwise", "optimizer", "other")


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def shares(prof, device: torch.device) -> dict[str, tuple[float, int]]:
    """{category: (microseconds, kernel/op count)} from the profiler's per-name averages (self time only, so
    nothing is counted twice)."""
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if us <= 0:
            continue
        if device.type == "cuda" and getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        cat = category(evt.key)
        out[cat][0] += us
        out[cat][1] += evt.count
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "ddpm-cifar10"), default="ddpm-cifar10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (compiling happens here)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    add_device_args(p)
    a = p.parse_args(argv)
    device = apply_device_args(a)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    overrides = {
        "preset": a.preset,
        "batch-size": a.batch_size,
        "precision": precision,
        "device": device.type,
        "channels-last": not a.no_channels_last,
        "compile": not a.no_compile,
        "warmup-steps": 0,
    }
    if not a.no_compile:
        overrides["compile-mode"] = a.compile_mode
    cfg = parse_config(overrides)
    gen = torch.Generator().manual_seed(0)
    n = a.batch_size * 4
    images = torch.randint(0, 256, (n, a.channels, a.image_size, a.image_size), generator=gen, dtype=torch.uint8)
    torch.manual_seed(0)
    model = build_unet(a.preset, a.image_size, a.channels)
    ema = build_unet(a.preset, a.image_size, a.channels)
    ema.load_state_dict(model.state_dict())
    trainer = LocalTrainer(cfg, model, ema, images, TrainState.fresh(range(n)), device)
    t0 = time.perf_counter()
    trainer.run(1, seed=0, max_steps=a.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.run(1, seed=1, max_steps=a.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    parts = shares(prof, device)
    total = sum(us for us, _ in parts.values()) or 1.0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}; torch {torch.__version__}; preset {a.preset} "
        f"({count_parameters(model) / 1e6:.2f}M parameters), {a.channels}x{a.image_size}x{a.image_size}, batch "
        f"{a.batch_size}, {precision}{', channels-last' if cfg.channels_last else ''}"
        f"{f', compile ({cfg.compile_mode})' if cfg.compile else ''}; {a.steps} profiled steps after "
        f"{a.warmup} warm-up ({warm:.1f} s); wall {1000 * wall / a.steps:.1f} ms per step under the profiler, "
        f"{'device kernel' if device.type == 'cuda' else 'CPU operator self'} time "
        f"{total / 1000 / a.steps:.1f} ms per step"
    )
    print()
    print("| category | ms per step | share | kernels per step |")
    print("|---|---|---|---|")
    for cat in ORDER:
        us, count = parts.get(cat, (0.0, 0))
        print(f"| {cat} | {us / 1000 / a.steps:.2f} | {100 * us / total:.1f}% | {count / a.steps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
