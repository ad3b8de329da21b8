"""Per-client memory and message size of LoRA vs full fine-tuning of Stable Diffusion 1.5's UNet, counted.

    python benchmarks/lora_memory.py [--ranks 4 8 16]

The UNet is diffusers' UNet2DConditionModel with SD 1.5's configuration, built on the meta device (no download,
no memory), with this project's LoRA adapters (fl_ietagc/training/lora.py: peft, default targets to_q,to_k,to_v,to_out.0,
alpha = rank). Everything is counted from the parameters, not measured on a device:

  adapters          trained parameters (the run's weights: averaged, sent, checkpointed)
  message           raw + EMA adapters in fp32, each direction of a round (what pack_weights sends)
  trained state     adapters raw + EMA + gradients (fp32) + Adam's two moments (fp32) = 20 bytes/parameter
                    (adam8bit would store the moments in 2 bytes/parameter: not counted here)
  frozen base       the UNet's other parameters in fp32 (this project's UNet base) and in fp16 (what a half-
                    precision base would take; the project keeps the UNet fp32, frozen-dtype covers VAE and text
                    encoder only)
  activations       not counted: they depend on batch size, resolution and gradient checkpointing: "unmeasured"

The full fine-tune row is today's behaviour (lora-rank = 0): every parameter trained, raw + EMA sent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_ietagc.training.lora import add_lora  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
GIB, MB = 1024**3, 1e6


def sd15_unet(rank: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        if rank:
            unet = add_lora(
                unet, SimpleNamespace(lora_rank=rank, lora_alpha=0.0, lora_targets="to_q,to_k,to_v,to_out.0")
            )
    return unet


def row(rank: int) -> dict:
    unet = sd15_unet(rank)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    return {
        "rank": rank,
        "trained": trained,
        "frozen": frozen,
        "message": 2 * 4 * trained,
        "trained-state": 20 * trained,
        "base-fp32": 4 * frozen,
        "base-fp16": 2 * frozen,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args(argv)
    rows = [row(r) for r in args.ranks] + [row(0)]
    print(
        "| UNet training | trained parameters | message (raw + EMA, fp32) | trained state (weights, EMA, grads, "
        "Adam) | frozen base fp32 / fp16 | per client without activations (fp32 base) | activations |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"LoRA rank {r['rank']}" if r["rank"] else "full fine-tune (lora-rank = 0)"
        base = f"{r['base-fp32'] / GIB:.2f} / {r['base-fp16'] / GIB:.2f} GiB" if r["frozen"] else "none"
        print(
            f"| {name} | {r['trained']:,} | {r['message'] / MB:.2f} MB | {r['trained-state'] / GIB:.3f} GiB "
            f"| {base} | {(r['trained-state'] + r['base-fp32']) / GIB:.2f} GiB | unmeasured |"
        )


if __name__ == "__main__":
    main()
