"""The weights every kind of run starts from: fresh from the seed, or `init-checkpoint`.

One function for the ServerApp, centralized training and the Flower-free loop, so all three
start from the same raw and EMA weights for the same config (and all three honour init-checkpoint).
"""

from __future__ import annotations

import copy
import os
import re

import torch

from .checkpoints import load_checkpoint
from .config import ConfigError, RunConfig
from .lora import trained_state
from .models import build_for_config, load_diffusers_unet, load_weights


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
    return (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source) is not None and not os.path.exists(source)
            and not source.lower().endswith(FILE_SUFFIXES))
