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
from .models import build_for_config, load_diffusers_unet, load_weights


def initial_weights(cfg: RunConfig) -> tuple[dict, dict]:
    """Raw and EMA state dicts to start from: fresh from `seed`, or init-checkpoint's."""
    torch.manual_seed(cfg.seed)
    net = build_for_config(cfg)
    ema = copy.deepcopy(net)
    source = cfg.init_checkpoint
    if source and not os.path.isfile(source) and (os.path.isdir(source) or looks_like_hub_id(source)):
        weights = load_diffusers_unet(net, source)  # a diffusers UNet: the same weights for raw and EMA
        try:
            load_weights(net, weights, "its weights")
            load_weights(ema, weights, "its weights")
        except ValueError as e:
            raise ConfigError(f"init-checkpoint = {source!r}: {e}") from None
    elif source:
        if not os.path.exists(source):
            raise ConfigError(f"init-checkpoint = {source!r}: no such file or directory "
                              f"(relative to {os.getcwd()})")
        try:
            blob = load_checkpoint(source)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init-checkpoint = {source!r}: {e}") from e
        try:
            load_weights(net, blob["net"], "its raw weights")
            load_weights(ema, blob["ema"], "its EMA weights")
        except (ValueError, KeyError, TypeError) as e:  # another preset, image size or channel count
            raise ConfigError(f"init-checkpoint = {source!r}: {e}") from None
    return net.state_dict(), ema.state_dict()


FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json", ".npz", ".pkl", ".tar")


def looks_like_hub_id(source: str) -> bool:
    """owner/name that is not a local path: a name with a file suffix, starting with . or ~, or with more
    than one / is a path."""
    return (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source) is not None and not os.path.exists(source)
            and not source.lower().endswith(FILE_SUFFIXES))
