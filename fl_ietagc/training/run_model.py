"""The UNet of a run and the weights it starts from: the architecture the config names (preset, resolution and
channels, or pretrained-dir's text-conditional UNet; LoRA adapters), fresh from the seed or `init-checkpoint`.

One function for the ServerApp, centralized training and the Flower-free loop, so all three
start from the same raw and EMA weights for the same config (and all three honour init-checkpoint).
"""

from __future__ import annotations

import copy
import os
import re

import torch

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.data.latent import unet_for
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.settings.config import ConfigError, RunConfig
from fl_ietagc.training.lora import add_lora, trained_state
from fl_ietagc.training.models import build_unet, load_diffusers_unet, load_weights


def build_for_config(cfg) -> torch.nn.Module:
    """The UNet for a run: preset, model resolution and the dataset's channel count (model-type = pixel), or
    pretrained-dir's text-conditional UNet with its pretrained weights (latent-t2i); gradient checkpointing on
    request."""
    if cfg.model_type == "latent-t2i":
        model = unet_for(cfg.pretrained_dir)
    else:
        model = build_unet(cfg.preset, image_size(cfg), load_splits(cfg).train.channels)
    if cfg.lora_rank:  # the frozen base is rebuilt here on every side; only the adapters travel
        if cfg.init_checkpoint:  # (config.py: a pixel LoRA run has one; latent-t2i: replaces pretrained-dir's UNet)
            weights, what = checkpoint_weights(cfg, model)[0]  # the raw weights are the base
            load_init_weights(cfg, model, weights, what)
        model = add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def initial_weights(cfg: RunConfig) -> tuple[dict, dict]:
    """Raw and EMA state dicts to start from: fresh from `seed`, or init-checkpoint's. With LoRA (lora-rank > 0):
    the fresh adapters only (build_for_config has put init-checkpoint's raw weights into the frozen base)."""
    torch.manual_seed(cfg.seed)
    net = build_for_config(cfg)
    ema = copy.deepcopy(net)
    if cfg.init_checkpoint and not cfg.lora_rank:
        (net_w, net_what), (ema_w, ema_what) = checkpoint_weights(cfg, net)
        load_init_weights(cfg, net, net_w, net_what)
        load_init_weights(cfg, ema, ema_w, ema_what)
    return trained_state(net), trained_state(ema)


def checkpoint_weights(cfg: RunConfig, net: torch.nn.Module) -> list[tuple[dict, str]]:
    """init-checkpoint's [(raw weights, what), (EMA weights, what)]: a diffusers UNet directory or hub id (the same
    weights twice, checked against `net`'s architecture) or a checkpoint of this project."""
    source = cfg.init_checkpoint
    if not os.path.isfile(source) and (os.path.isdir(source) or looks_like_hub_id(source)):
        weights = load_diffusers_unet(net, source)  # a diffusers UNet: the same weights for raw and EMA
        return [(weights, "its weights"), (weights, "its weights")]
    if not os.path.exists(source):
        raise ConfigError(f"init-checkpoint = {source!r}: no such file or directory (relative to {os.getcwd()})")
    try:
        blob = load_checkpoint(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init-checkpoint = {source!r}: {e}") from e
    try:
        return [(blob["net"], "its raw weights"), (blob["ema"], "its EMA weights")]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"init-checkpoint = {source!r}: {e}") from None


def load_init_weights(cfg: RunConfig, model: torch.nn.Module, weights: dict, what: str) -> None:
    try:
        load_weights(model, weights, what)
    except (ValueError, KeyError, TypeError) as e:  # another preset, image size or channel count
        raise ConfigError(f"init-checkpoint = {cfg.init_checkpoint!r}: {e}") from None


FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json", ".npz", ".pkl", ".tar")


def looks_like_hub_id(source: str) -> bool:
    """owner/name that is not a local path: a name with a file suffix, starting with . or ~, or with more
    than one / is a path."""
    return (
        re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source) is not None
        and not os.path.exists(source)
        and not source.lower().endswith(FILE_SUFFIXES)
    )
