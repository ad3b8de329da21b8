"""Training-step throughput: a reference-style loop vs LocalTrainer in fp32, bf16 and bf16 + channels-last + compile.

    python benchmarks/train_step.py [--preset tiny|ddpm-cifar10] [--batch-size 32] [--steps 20] [--device cpu]

One run, one markdown table. Variants (same UNet, same data shape, random uint8 images, AGC on):
  reference-style   fp32, eager; torch DataLoader over a Dataset (per-image conversion and flip in
                    __getitem__); the AGC bank updated in a Python loop over the batch, one `.item()` per
                    sample (as IET-AGC's reference code does); per-parameter EMA loop
  ours fp32         fl_ietagc.training.trainer.LocalTrainer: shard on the device, closed-form bank update, no host
                    synchronisation per step (the NaN flag is read every 25 steps)
  ours bf16         + precision = bf16 (autocast around the UNet forward only)
  ours bf16+channels-last+compile  + channels-last + compile (--compile-backend: inductor on a GPU, aot_eager
                    on a CPU by default)
Columns: images/s over --steps timed steps (after --warmup steps, which include compiling: shown apart), the
ratio to the reference-style loop, achieved TFLOP/s from torch.utils.flop_counter.FlopCounterMode over one
eager forward + backward (counted, not assumed 3x forward; the optimizer is not counted), and that as a
percentage of the device's dense bf16 peak (GPUs in PEAK_BF16_TFLOPS; "n/a" elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.device_args import add_device_args, apply_device_args  # noqa: E402
from fl_ietagc.settings.config import parse_config  # noqa: E402
from fl_ietagc.training import compiled  # noqa: E402
from fl_ietagc.training.agc import masked_mean  # noqa: E402
from fl_ietagc.training.diffusion import Diffusion  # noqa: E402
from fl_ietagc.training.models import build_unet, count_parameters  # noqa: E402
from fl_ietagc.training.trainer import LocalTrainer, TrainState  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

VARIANTS = (
    ("reference-style fp32", None),
    ("ours fp32", {}),
    ("ours bf16", {"precision": "bf16"}),
    ("ours bf16+channels-last+compile", {"precision": "bf16", "channels-last": True, "compile": True}),
)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_step(preset: str, images: torch.Tensor, batch_size: int, device: torch.device) -> int:
    """FLOPs of one training step's UNet forward + backward (eager fp32), as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_unet(preset, images.shape[-1], images.shape[1]).to(device).train()
    diffusion = Diffusion(1000)
    x0 = images[:batch_size].to(device).float() / 127.5 - 1
    t = torch.randint(0, 1000, (batch_size,), device=device)
    noise = torch.randn_like(x0)
    with FlopCounterMode(display=False) as counter:
        diffusion.per_sample_loss(model, x0, t, noise).mean().backward()
    return counter.get_total_flops()


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images, converted and randomly flipped one at a time, as a torchvision-style dataset does."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i].float() / 127.5 - 1
        return x.flip(2) if torch.rand(()) < 0.5 else x


def reference_style(
    preset: str, images: torch.Tensor, batch_size: int, steps: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """(warm-up seconds, timed seconds) of the reference-style loop."""
    cfg = parse_config({})
    model = build_unet(preset, images.shape[-1], images.shape[1]).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    diffusion = Diffusion(cfg.diffusion_steps)
    bank = [0.0] * cfg.diffusion_steps
    loader = torch.utils.data.DataLoader(ImageDataset(images), batch_size=batch_size, shuffle=True, drop_last=True)

    def batches():
        while True:
            yield from loader

    data = batches()

    def step():
        x0 = next(data).to(device)
        t = torch.randint(0, cfg.diffusion_steps, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        losses = diffusion.per_sample_loss(model, x0, t, noise)
        keep = []
        for j in range(batch_size):  # one host synchronisation per sample
            loss_j, t_j = losses[j].item(), int(t[j])
            keep.append(not loss_j < bank[t_j] / cfg.agc_lambda)
            bank[t_j] = cfg.agc_bank_decay * bank[t_j] + (1 - cfg.agc_bank_decay) * loss_j
        loss = masked_mean(losses, torch.tensor(keep, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.mul_(cfg.ema_decay).add_(p, alpha=1 - cfg.ema_decay)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def ours(
    preset: str, overrides: dict, images: torch.Tensor, batch_size: int, steps: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """(warm-up seconds, timed seconds) of LocalTrainer.run with these run-config keys."""
    cfg = parse_config({"preset": preset, "batch-size": batch_size, "hflip": "on", "device": device.type, **overrides})
    model = build_unet(preset, images.shape[-1], images.shape[1])
    trainer = LocalTrainer(
        cfg, model, copy.deepcopy(model), images, TrainState.fresh(torch.arange(len(images))), device
    )
    t0 = time.perf_counter()
    trainer.run(epochs=0, seed=0, max_steps=warmup)
    sync(device)
    t1 = time.perf_counter()
    trainer.run(epochs=0, seed=1, max_steps=steps)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "ddpm-cifar10"), default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant (saves its warm-up)")
    p.add_argument(
        "--compile-mode",
        action="append",
        default=[],
        help="add a compiled variant with this run-config compile-mode (repeatable), e.g. "
        "reduce-overhead (CUDA graphs); --only-compile-modes: only those variants",
    )
    p.add_argument(
        "--only-compile-modes",
        action="store_true",
        help="with --compile-mode: run only the compiled variants in those modes (no baseline rows)",
    )
    add_device_args(p)
    a = p.parse_args(argv)
    device = apply_device_args(a)
    variants = [v for v in VARIANTS if not (a.no_compile and v[1] and v[1].get("compile"))]
    extra = [
        (f"ours bf16+channels-last+compile {mode}", {**VARIANTS[-1][1], "compile-mode": mode})
        for mode in a.compile_mode
    ]
    variants = extra if a.only_compile_modes and extra else variants + extra
    gen = torch.Generator().manual_seed(0)
    n = a.batch_size * 4
    images = torch.randint(0, 256, (n, a.channels, a.image_size, a.image_size), generator=gen, dtype=torch.uint8)
    torch.manual_seed(0)
    flops = flops_per_step(a.preset, images, a.batch_size, device)
    peak = peak_tflops(device)
    rows = []
    for name, overrides in variants:
        torch.manual_seed(0)
        if overrides is None:
            warm, dt = reference_style(a.preset, images, a.batch_size, a.steps, a.warmup, device)
        else:
            warm, dt = ours(a.preset, overrides, images, a.batch_size, a.steps, a.warmup, device)
        rows.append((name, warm, dt))
    params = count_parameters(build_unet(a.preset, a.image_size, a.channels))
    print(
        f"{device_name(device)}; torch {torch.__version__}; preset {a.preset} ({params / 1e6:.2f}M parameters), "
        f"{a.channels}x{a.image_size}x{a.image_size}, batch {a.batch_size}, {a.steps} timed steps after {a.warmup} "
        f"warm-up; {flops / 1e9:.2f} GFLOP per step (forward + backward); compile backend {compiled.backend()}"
    )
    print()
    print(f"| variant | warm-up (s) | img/s | vs {rows[0][0]} | achieved TFLOP/s | % of bf16 peak |")
    print("|---|---|---|---|---|---|")
    ref_rate = a.steps * a.batch_size / rows[0][2]  # (the first row: reference-style unless only compile modes)
    for name, warm, dt in rows:
        rate = a.steps * a.batch_size / dt
        tflops = flops * a.steps / dt / 1e12
        share = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {warm:.1f} | {rate:,.1f} | {rate / ref_rate:.2f}x | {tflops:.4g} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
