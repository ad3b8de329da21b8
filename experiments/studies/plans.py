"""What each study runs (RunSpec per run, its base config: smoke or the paper's protocol) and what it costs (optimizer
steps, FLOPs from PyTorch's counter, GPU hours at an assumed throughput), before anything trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fl_ietagc.settings.config import STRATEGIES, load_config_file, parse_config

# fl-ietagc-study imports this module at start-up: the cost estimate imports torch and the model and data wings
# (seconds) when it runs.

ASSUMED_TFLOPS = 50.0  # sustained fp32/TF32 UNet training per H100-class GPU; an assumption, not a measurement
FULL_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "afhq-dog": 4_739}
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper-cifar10.toml"  # the one copy of the protocol


def paper_config() -> dict:
    """The paper's CIFAR-10 protocol, read from experiments/configs/paper-cifar10.toml (strictly: an unknown or
    invalid key there fails here, naming the file)."""
    raw = load_config_file(str(PAPER_CONFIG))
    parse_config(raw)
    return raw


SMOKE = {
    "dataset": "digits",
    "preset": "tiny",
    "max-images": 240,
    "batch-size": 24,
    "num-server-rounds": 2,
    "local-epochs": 1,
    "warmup-steps": 4,
    "diffusion-steps": 100,
    "sample-count": 16,
    "sample-steps": 10,
}


@dataclass
class RunSpec:
    name: str
    clients: int  # K; 0 = centralized training (default training, or AGC alone with centralized_agc)
    overrides: dict = field(default_factory=dict)
    match_federated: int = 0  # centralized: as many steps as a K-client federated run of the same config
    centralized_agc: bool = False  # centralized with AGC ("AGC alone")


def base_config(study: str, size: str) -> dict:
    if size == "smoke":
        return dict(SMOKE)
    if study == "paper-cifar100":
        return {**paper_config(), "dataset": "cifar100"}
    if study == "paper-afhq-dog":
        return {**paper_config(), "dataset": "afhq-dog", "preset": "ddpm-afhq64", "batch-size": 60}
    return paper_config()


def plan(study: str, size: str) -> list[RunSpec]:
    smoke = size == "smoke"
    k = 2 if smoke else 10
    if study in ("paper-cifar10", "paper-cifar100", "paper-afhq-dog"):
        return [
            RunSpec("default-training", 0, {"agc": False}, match_federated=k),
            RunSpec("iet", k, {"agc": False}),
            RunSpec("iet-agc", k),
        ]
    if study == "ablations":
        ks = (2, 3) if smoke else (2, 5, 10)
        lams = (1.5, 3.0) if smoke else (1.5, 2.0, 3.0)
        epochs = base_config(study, size)["local-epochs"] * base_config(study, size)["num-server-rounds"]
        periods = (1, 2) if smoke else (25, 50, 100, 200)  # local epochs between averagings, same total epochs
        runs = [
            RunSpec("iet-agc", k),
            RunSpec("iet-alone", k, {"agc": False}),
            RunSpec("agc-alone", 0, {}, match_federated=k, centralized_agc=True),
        ]
        runs += [RunSpec(f"k{kk}", kk) for kk in ks if kk != k]
        runs += [RunSpec(f"lambda{lam:g}", k, {"agc-lambda": lam}) for lam in lams if lam != 2.0]
        runs += [
            RunSpec(f"period{p}", k, {"local-epochs": p, "num-server-rounds": max(1, epochs // p)})
            for p in periods
            if p != base_config(study, size)["local-epochs"]
        ]
        return runs
    if study == "strategies":
        k = max(k, 3)  # Krum and Bulyan (f = 0) need K >= 3: every strategy gets the same 3 clients at smoke size
        return [RunSpec(name, k, {"strategy": name}) for name in ["iet", *sorted(set(STRATEGIES) - {"iet"})]]
    if study == "finetune":
        rounds = 2 if smoke else 3
        return [
            RunSpec("pretrained-then-iet-agc", k, {"num-server-rounds": rounds, "local-epochs": 1 if smoke else 10})
        ]
    raise SystemExit(f"unknown study {study!r}; one of: {', '.join(STUDIES)}")


STUDIES = ("paper-cifar10", "paper-cifar100", "paper-afhq-dog", "ablations", "strategies", "finetune")


def forward_gflops(preset: str, image_size: int, channels: int) -> float:
    """GFLOP of one forward pass of one image, counted by torch.utils.flop_counter on the real UNet."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fl_ietagc.training.models import build_unet

    model = build_unet(preset, image_size, channels).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, channels, image_size, image_size), torch.tensor([1]))
    return counter.get_total_flops() / 1e9


def estimate(study: str, size: str, runs: list[RunSpec], eval_samples: int, eval_steps: int) -> dict:
    """Optimizer steps, FLOPs and GPU hours of a study (training at 3x forward FLOPs per image)."""
    from fl_ietagc.data.datasets import DEFAULT_IMAGE_SIZE, load_splits

    base = base_config(study, size)
    cfg = parse_config(base if size == "smoke" else {**base, "data-root": "/not/read/for/an/estimate"})
    img = cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset]
    n_train = len(load_splits(cfg).train) if size == "smoke" else FULL_TRAIN_SIZES[cfg.dataset]
    channels = 1 if cfg.dataset in ("digits", "fashion-mnist") else 3
    fwd = forward_gflops(cfg.preset, img, channels) * 1e9
    rows, total = [], 0.0
    for r in runs:
        c = {**base, **r.overrides}
        k = r.clients or r.match_federated or 1
        steps = c["num-server-rounds"] * c["local-epochs"] * k * ((n_train // k) // c["batch-size"])
        flops = steps * c["batch-size"] * 3 * fwd + eval_samples * eval_steps * fwd
        rows.append({"run": r.name, "optimizer_steps": steps, "pflop": flops / 1e15})
        total += flops
    return {
        "rows": rows,
        "total_pflop": total / 1e15,
        "gpu_hours": total / (ASSUMED_TFLOPS * 1e12) / 3600,
        "assumed_tflops": ASSUMED_TFLOPS,
        "forward_gflop_per_image": fwd / 1e9,
    }


def print_estimate(est: dict) -> None:
    print(f"{'run':28s} {'optimizer steps':>16s} {'PFLOP':>10s}")
    for row in est["rows"]:
        print(f"{row['run']:28s} {row['optimizer_steps']:16,d} {row['pflop']:10.2f}")
    print(
        f"total {est['total_pflop']:.1f} PFLOP ~ {est['gpu_hours']:.1f} GPU hours at an assumed "
        f"{est['assumed_tflops']:.0f} TFLOP/s sustained (forward {est['forward_gflop_per_image']:.2f} GFLOP/image; "
        f"an estimate, not a measurement)",
        flush=True,
    )
