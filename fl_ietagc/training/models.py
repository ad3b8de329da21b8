"""UNet presets, built on diffusers' UNet2DModel.

diffusers' UNet2DModel is the maintained port of Ho et al.'s DDPM UNet (it is the class behind
`google/ddpm-cifar10-32`), so the paper's 35.7M-parameter net is a configuration here, not code
to maintain, and pretrained diffusers checkpoints load into it directly.

| preset        | channels (multipliers)      | res blocks | attention    | params  |
|---------------|-----------------------------|------------|--------------|---------|
| ddpm-cifar10  | 128 (1,2,2,2)               | 2          | 16x16 + mid  | 35.75M  |
| ddpm-afhq64   | 128 (1,2,2,2,4)             | 2          | 16x16 + mid  | 78.70M  |
| tiny          | 32 (1,1,1)                  | 1          | 2nd level + mid | 0.39M |
"""

from __future__ import annotations

import warnings

import torch
from diffusers import UNet2DModel
from diffusers.utils import is_accelerate_available

from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.lora import adapter_keys

_DDPM_COMMON = dict(
    layers_per_block=2,
    dropout=0.1,
    norm_num_groups=32,
    norm_eps=1e-6,
    attention_head_dim=None,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    act_fn="silu",
)

PRESETS: dict[str, dict] = {
    # Ho et al. CIFAR-10: resolutions 32,16,8,4; attention at 16x16 (2nd level); single-head attention
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        **_DDPM_COMMON,
    ),
    # 64x64: resolutions 64,32,16,8,4; attention at 16x16 (3rd level)
    "ddpm-afhq64": dict(
        block_out_channels=(128, 256, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        **_DDPM_COMMON,
    ),
    "tiny": dict(
        block_out_channels=(32, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        dropout=0.1,
        norm_num_groups=8,
        attention_head_dim=None,
        act_fn="silu",
    ),
}


def downsample_factor(preset: str) -> int:
    return 2 ** (len(PRESETS[preset]["block_out_channels"]) - 1)


def build_unet(preset: str, image_size: int, channels: int) -> UNet2DModel:
    if preset not in PRESETS:
        raise ConfigError(f"preset = {preset!r}: must be one of {', '.join(PRESETS)}")
    factor = downsample_factor(preset)
    if image_size % factor:
        raise ConfigError(f"image-size = {image_size}: preset {preset} needs a multiple of {factor}")
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **PRESETS[preset])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_mismatch(expected: dict, given: dict) -> str | None:
    """The first difference between two state dicts' layouts (name -> tensor, or name -> shape), in one phrase:
    a missing key, an unexpected key, or a shape; None when every key and shape agree."""

    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    for name, value in expected.items():
        if name not in given:
            return f"{name} is missing"
        if shape(given[name]) != shape(value):
            return f"{name} has shape {list(shape(given[name]))}, the model needs {list(shape(value))}"
    extra = [name for name in given if name not in expected]
    if extra:
        return f"{extra[0]} is not a weight of this model" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


def load_weights(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict with a one-line error naming the first weight that does not fit, and its shapes. A model
    with LoRA adapters (fl_ietagc/training/lora.py) takes exactly its adapters: its base is not a run's weights."""
    adapters = adapter_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if not adapters or k in adapters}
    problem = first_mismatch(expected, state_dict)
    if problem is None:
        try:
            model.load_state_dict(state_dict, strict=not adapters)
            return
        except RuntimeError as e:  # (a dtype or a non-tensor entry)
            problem = str(e).splitlines()[0]
    kind = f"its LoRA adapters, {len(adapters)} tensors" if adapters else f"{count_parameters(model):,} parameters"
    raise ValueError(f"{what} do not match this model ({type(model).__name__}, {kind}): {problem}")


# config fields of a diffusers UNet2DModel that do not change the computation of trained weights
_NOT_ARCHITECTURE = {
    "dropout",
    "sample_size",
    "num_train_timesteps",
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
}


def load_diffusers_unet(model: UNet2DModel, source: str) -> dict:
    """State dict of a diffusers UNet2DModel (a local directory, or a hub id such as google/ddpm-cifar10-32
    when online) after checking that its architecture is exactly `model`'s."""
    try:
        # without accelerate, say False (the default True falls back with an "install accelerate" warning)
        with warnings.catch_warnings():
            # diffusers itself passes huggingface_hub's deprecated `local_dir_use_symlinks`: not the user's to fix
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            pretrained = UNet2DModel.from_pretrained(source, low_cpu_mem_usage=is_accelerate_available())
    except (OSError, ValueError) as e:  # missing directory/file, no network for a hub id, bad JSON, bad weights
        raise ConfigError(
            f"init-checkpoint = {source!r}: cannot load a diffusers UNet2DModel from it ({_describe(e)})"
        ) from e
    except RuntimeError as e:  # torch: the weights do not fit the directory's own config
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        raise ConfigError(
            f"init-checkpoint = {source!r}: cannot load a diffusers UNet2DModel from it ({_describe(e)})"
        ) from e
    ours, theirs = dict(model.config), dict(pretrained.config)
    differ = sorted(
        k for k in (set(ours) | set(theirs)) - _NOT_ARCHITECTURE if _normal(ours.get(k)) != _normal(theirs.get(k))
    )
    if differ:
        detail = ", ".join(f"{k}: ours {ours.get(k)!r} vs {theirs.get(k)!r}" for k in differ)
        raise ConfigError(f"init-checkpoint = {source!r}: architecture differs from the run's preset ({detail})")
    return pretrained.state_dict()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _describe(e: BaseException) -> str:
    """The error's first line and, when diffusers re-raised it from another, the root cause's (e.g. offline mode)."""
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    return _first_line(e) if root is e else f"{_first_line(e)}; cause: {_first_line(root)}"


def _normal(v):
    return list(v) if isinstance(v, (list, tuple)) else v
