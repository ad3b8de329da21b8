"""Numeric precision and memory format of the UNet forward (run-config keys `precision`, `channels-last`).

Only the UNet forward runs under autocast. Everything that decides what is trained stays in full precision:
the per-sample losses are computed from the UNet output cast to float32, and the AGC memory bank is float64,
so the skip rule compares the same kind of numbers in every precision. With the defaults (fp32, contiguous)
these helpers are no-ops, so the default path is bit-identical to code without them.
"""

from __future__ import annotations

import contextlib

import torch

from fl_ietagc.settings.config import PRECISIONS, ConfigError

_DTYPES = {"bf16": torch.bfloat16}


def forward_context(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The context the UNet forward runs in: nothing for fp32, torch.autocast(bfloat16) for bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def as_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D UNet input in the requested memory format (unchanged when channels_last is off)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def unet_forward(model, device: torch.device | str, precision: str = "fp32", channels_last: bool = False):
    """`model` itself for fp32 + contiguous (the default path is untouched); else a callable model(x, t)
    that runs the forward under autocast and/or with a channels-last input."""
    if precision == "fp32" and not channels_last:
        return model
    forward_context(device, precision)  # refuses an unknown precision now, not at the first step

    def forward(x: torch.Tensor, t: torch.Tensor, **kwargs):
        with forward_context(device, precision):
            return model(as_input(x, channels_last), t, **kwargs)

    return forward


def check_supported(device: torch.device, precision: str) -> None:
    """Refuse bf16 on a CUDA device without bfloat16 arithmetic (pre-Ampere), in one line, before training."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            f"precision = 'bf16': {torch.cuda.get_device_name(device)} has no native bfloat16; use precision = \"fp32\""
        )
