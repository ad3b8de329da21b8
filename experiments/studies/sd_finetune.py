"""`fl-ietagc-study sd-finetune`: fine-tuning a latent text-to-image model (Stable Diffusion layout) on image-caption
pairs, plain fine-tuning vs IET-AGC vs RET at the same number of optimizer steps, then the memorization score of
generations from the training captions (fl-ietagc evaluate on each run).

    fl-ietagc-study sd-finetune --smoke                                    # tiny random parts, digits as captions
    fl-ietagc-study sd-finetune --full --pretrained SD_DIR --data PAIRS    # e.g. SD 2.1 base, a LAION-10k folder
    fl-ietagc-study sd-finetune --full --pretrained SD_DIR --data PAIRS --dry-run   # the estimate only

Runs: `plain-finetune` (centralized training, AGC off, as many steps as the K-client runs), `iet-agc` (K clients),
`ret` (IET-AGC with RET's redistribution every round and threshold-aware augmentation by up to 1 latent pixel),
`iet-agc-lora` (IET-AGC training LoRA adapters of rank 4 only, base frozen; lr 1e-4 at full size, as diffusers'
LoRA text-to-image example), `iet-agc-lora-secagg` (the same under Flower's SecAgg+, as Flower's
quickstart-diffusion-SecAggregation example: the server holds only the masked sum of the clients' adapters). The estimate's second table gives each run's message (raw + EMA of what it trains,
fp32, each direction of a round) and per-client state (trained weights, EMA, gradients, Adam; the frozen base apart).
`--full` follows the reference SD setup where this project can (method.md: 256 px, K = 4, 25 rounds, batch 8,
lr 2.5e-6, lambda 1.25, warmup 5000, grad clip 1.0) with bf16 frozen parts and forward, gradient checkpointing;
it uses Adam, not AdamW with weight decay 1e-2, and keeps an EMA. The estimate printed first counts FLOPs on the
checkpoint's own UNet (torch.utils.flop_counter) and converts them at an assumed sustained rate: an estimate, not a
measurement; the per-client memory line counts weights and optimizer state only (activations unmeasured).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

from experiments.studies import runner
from experiments.studies.pipeline_check import NOTE, label_figures
from experiments.studies.plans import ASSUMED_TFLOPS, RunSpec
from experiments.studies.plans import print_estimate as print_runs
from fl_ietagc.cli import main as fl_ietagc
from fl_ietagc.settings.config import ConfigError, parse_config
from fl_ietagc.validate import validate_run

# fl-ietagc-study imports this module at start-up: the functions import torch and the wings that load it (data,
# training, evaluation: seconds) where they use them.

K_FULL, K_SMOKE = 4, 2
FULL = {
    "model-type": "latent-t2i",
    "dataset": "captions",
    "image-size": 256,
    "num-server-rounds": 25,
    "local-epochs": 6,
    "batch-size": 8,
    "lr": 2.5e-6,
    "warmup-steps": 5000,
    "grad-clip": 1.0,
    "frozen-dtype": "bf16",
    "precision": "bf16",
    "gradient-checkpointing": True,
    "sample-count": 16,
    "holdout-fraction": 0.05,
}
SMOKE = {
    "model-type": "latent-t2i",
    "dataset": "captions",
    "image-size": 16,
    "num-server-rounds": 2,
    "local-epochs": 2,
    "batch-size": 4,
    "lr": 1e-3,
    "warmup-steps": 2,
    "diffusion-steps": 20,
    "sample-count": 4,
    "sample-steps": 5,
}
AGC = {"agc-lambda": 1.25}  # the AGC runs' lambda (plain fine-tuning has no bank: setting it there would be a no-op)
RET = {**AGC, "ret-every": 1, "ret-fraction": 0.1, "taa": True, "taa-max-shift": 1}
LORA_RANK = 4


def plan(k: int, smoke: bool = True) -> list[RunSpec]:
    lora = {**AGC, "lora-rank": LORA_RANK} if smoke else {**AGC, "lora-rank": LORA_RANK, "lr": 1e-4}
    return [
        RunSpec("plain-finetune", 0, {"agc": False}, match_federated=k),
        RunSpec("iet-agc", k, AGC),
        RunSpec("ret", k, RET),
        RunSpec("iet-agc-lora", k, lora),
        # Flower's SecAgg+: the server only ever holds the masked sum of the adapters (their EMA too)
        RunSpec("iet-agc-lora-secagg", k, {**lora, "secure-aggregation": "secaggplus"}),
    ]


def smoke_inputs(study_dir: Path) -> tuple[Path, Path]:
    """(tiny random Stable Diffusion parts, 48 embedded digits as 16 px RGB images captioned with their digit):
    everything the smoke size needs, made here without a download."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from fl_ietagc.data.latent import save_components, tiny_components

    parts_dir, pairs = study_dir / "tiny-sd", study_dir / "digit-pairs"
    if not (parts_dir / "unet").is_dir():
        save_components(tiny_components(seed=0, image_size=16), parts_dir)
    if not (pairs / "metadata.jsonl").is_file():
        pairs.mkdir(parents=True, exist_ok=True)
        digits = load_digits()
        rows = []
        for i in range(48):
            grey = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(np.stack([grey] * 3, -1)).resize((16, 16), Image.NEAREST).save(pairs / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"digit {digits.target[i]} number {i}"})
        (pairs / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return parts_dir, pairs


def estimate(cfg, runs: list[RunSpec], n_train: int, generations: int, eval_steps: int) -> dict:
    """FLOPs of training (3 x forward per image) and sampling (2 forwards per step: classifier-free guidance) on
    the checkpoint's UNet; GPU hours at ASSUMED_TFLOPS; weights + optimizer memory per client."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fl_ietagc.data.latent import unet_for, vae_factor

    unet = unet_for(cfg.pretrained_dir).eval()
    c = unet.config
    side = cfg.image_size // vae_factor(cfg.pretrained_dir)
    latent = torch.zeros(1, c.in_channels, side, side)
    text = torch.zeros(
        1, 77, c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(latent, torch.tensor([1]), encoder_hidden_states=text)
    fwd = counter.get_total_flops()
    params = sum(p.numel() for p in unet.parameters())
    rows, total = [], 0.0
    for r in runs:
        k = r.clients or r.match_federated
        steps = cfg.num_server_rounds * cfg.local_epochs * k * ((n_train // k) // cfg.batch_size)
        # (a LoRA run's backward skips the base's weight gradients: 3 x forward overestimates it)
        flops = steps * cfg.batch_size * 3 * fwd + generations * eval_steps * 2 * fwd
        rows.append(
            {
                "run": r.name,
                "optimizer_steps": steps,
                "pflop": flops / 1e15,
                **run_sizes(unet, r.overrides.get("lora-rank", 0), cfg, federated=bool(r.clients)),
            }
        )
        total += flops
    state_bytes = params * (4 + 4 + 4 + (2 if cfg.optimizer == "adam8bit" else 8))  # weights, grads, EMA, Adam
    return {
        "rows": rows,
        "total_pflop": total / 1e15,
        "gpu_hours": total / (ASSUMED_TFLOPS * 1e12) / 3600,
        "assumed_tflops": ASSUMED_TFLOPS,
        "forward_gflop_per_image": fwd / 1e9,
        "unet_parameters": params,
        "state_gib_per_client": state_bytes / 2**30,
    }


def run_sizes(unet, rank: int, cfg, federated: bool = True) -> dict:
    """Trained and frozen parameters of one run's UNet (LoRA of `rank` on a copy, or the whole UNet), its message
    (raw + EMA, fp32; 0 for centralized training) and its per-client trained state (weights, EMA, gradients, Adam
    moments)."""
    from fl_ietagc.training.lora import add_lora

    if rank:
        unet = add_lora(
            copy.deepcopy(unet), SimpleNamespace(lora_rank=rank, lora_alpha=0.0, lora_targets=cfg.lora_targets)
        )
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    adam = 2 if cfg.optimizer == "adam8bit" else 8
    return {
        "trained_parameters": trained,
        "message_mb": 2 * 4 * trained / 1e6 if federated else 0.0,
        "state_mib": trained * (4 + 4 + 4 + adam) / 2**20,
        "frozen_base_mib": 4 * frozen / 2**20,
    }


def print_estimate(est: dict) -> None:
    print_runs(est)
    print(f"{'run':28s} {'trained params':>15s} {'message (raw+EMA)':>18s} {'client state':>13s} {'frozen base':>12s}")
    for row in est["rows"]:
        print(
            f"{row['run']:28s} {row['trained_parameters']:15,d} {row['message_mb']:15.2f} MB "
            f"{row['state_mib']:9.1f} MiB {row['frozen_base_mib']:8.1f} MiB"
        )
    print(
        f"per client: UNet {est['unet_parameters']:,} parameters -> {est['state_gib_per_client']:.1f} GiB of "
        f"weights, gradients, EMA and Adam state, plus the frozen VAE and text encoder and the activations "
        f"(unmeasured)",
        flush=True,
    )


def run_sd_finetune(
    size: str,
    out: Path,
    *,
    pretrained: str = "",
    data: str = "",
    gpus_per_client: float = 0.5,
    dry_run: bool = False,
    eval_args: tuple[str, ...] = (),
) -> Path | None:
    from fl_ietagc.data.datasets import load_splits

    smoke = size == "smoke"
    k = K_SMOKE if smoke else K_FULL
    study_dir = out / f"sd-finetune-{size}"
    if smoke:
        if pretrained or data:
            raise ConfigError("--pretrained / --data: the smoke size makes its own tiny parts and pairs")
        if dry_run:  # the plan is checked against inputs made in a scratch folder: a dry run writes nothing
            scratch = tempfile.TemporaryDirectory(prefix="sd-finetune-dry-run-")
            parts_dir, pairs = smoke_inputs(Path(scratch.name))
        else:
            study_dir.mkdir(parents=True, exist_ok=True)
            parts_dir, pairs = smoke_inputs(study_dir)
        base = {**SMOKE, "pretrained-dir": str(parts_dir), "data-root": str(pairs)}
    else:
        if not pretrained or not data:
            raise ConfigError(
                "sd-finetune --full needs --pretrained DIR (a local Stable Diffusion checkpoint) and "
                "--data SOURCE (image-caption pairs)"
            )
        base = {**FULL, "pretrained-dir": pretrained, "data-root": data}
    runs = plan(k, smoke)
    backend = (
        {"client_resources": {"num_cpus": 1}}
        if smoke
        else {"client_resources": {"num_cpus": 2, "num_gpus": gpus_per_client}}
    )
    for r in runs:  # every run's config, data and resources before anything trains
        conf = {**base, **r.overrides, "output-dir": str(study_dir), "run-name": r.name}
        try:
            if not (study_dir / r.name / "config.json").is_file():
                validate_run(parse_config(conf), r.clients or r.match_federated, backend if r.clients else None)
        except ConfigError as e:
            raise ConfigError(f"[{r.name}] {e}") from e
    cfg = parse_config(base)
    generations = 8 if smoke else 4000
    print(f"study sd-finetune ({size}): {len(runs)} runs: {', '.join(r.name for r in runs)}")
    print_estimate(estimate(cfg, runs, len(load_splits(cfg).train), generations, 5 if smoke else 50))
    if dry_run:
        if smoke:
            scratch.cleanup()
        return None
    study_dir.mkdir(parents=True, exist_ok=True)
    for r in runs:
        runner.train_run(r, study_dir, base, backend, smoke)  # looked up at call time: tests swap it
    return evaluate_and_compare(study_dir, runs, smoke, eval_args)


def evaluate_and_compare(study_dir: Path, runs: list[RunSpec], smoke: bool, eval_args: tuple[str, ...]) -> Path:
    """`fl-ietagc evaluate` on every run (kept when done), then `fl-ietagc compare`'s table of them, relative to
    plain fine-tuning: comparison.md / comparison.json in the study directory."""
    from fl_ietagc.evaluation.compare import compare, to_markdown, write_comparison

    size = (
        ["--num-captions", "8", "--seeds-per-caption", "1", "--steps", "5"]
        if smoke
        else ["--num-captions", "1000", "--seeds-per-caption", "4"]
    )  # 4000 generations, as the reference
    for r in runs:
        if not (study_dir / r.name / "results.json").is_file():
            code = fl_ietagc(["evaluate", str(study_dir / r.name), *size, *eval_args])
            if code:
                raise SystemExit(f"[{r.name}] evaluation failed (exit {code})")
    table = compare([str(study_dir / r.name) for r in runs])
    if smoke:  # in the table and in every figure: smoke numbers are a pipeline check, not a finding
        table["note"] = NOTE
        label_figures(study_dir)
    path = write_comparison(table, study_dir)
    print(to_markdown(table))
    return path
