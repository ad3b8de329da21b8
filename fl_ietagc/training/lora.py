"""LoRA adapters (keys `lora-rank`, `lora-alpha`, `lora-targets`): peft's LoRA layers in the UNet, base frozen.

With `lora-rank` > 0 the run's weights are the adapters only: `build_for_config` (run_model.py) builds the frozen
base (pretrained-dir's UNet, or the pixel UNet with init-checkpoint's raw weights) on every side and injects
fresh adapters with peft, the way diffusers' `unet.add_adapter(LoraConfig(...))` does; `trained_state` is what
is trained, averaged (raw and EMA), sent, kept in client state and checkpointed; `models.load_weights` puts
adapters back. AGC (per-sample losses, bank, skip rule) does not see the difference: it acts on the loss.

peft is imported only when adapters are built (it is in the t2i extra), so the core imports without it.
"""

from __future__ import annotations

import copy
import re

import torch

from fl_ietagc.settings.config import ConfigError

ADAPTER_NAME = "default"  # peft's default adapter name; diffusers' load_lora_weights names its own on load
_ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def targets(cfg) -> list[str]:
    """`lora-targets` as module names (config.py checked the syntax)."""
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def lora_config(cfg):
    """peft's LoraConfig for the run. Default init: A random (Kaiming), B zero, so the adapted UNet starts exactly
    at the base; alpha 0 = the rank (scale alpha / rank = 1)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError(f"lora-rank = {cfg.lora_rank}: needs peft (pip install 'fl-ietagc[t2i]')") from None
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        target_modules=targets(cfg),
        lora_dropout=0.0,
        bias="none",
    )


def check_targets(model: torch.nn.Module, cfg) -> None:
    """Every name of `lora-targets` must match a Linear/Conv module of the UNet (peft only fails when none does)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for target in targets(cfg):
        if not any(n == target or n.endswith("." + target) for n in names):
            attn = sorted({n.rsplit(".", 1)[-1] for n in names if ".to_" in n or n.endswith("proj_in")})[:8]
            raise ConfigError(
                f"lora-targets = {cfg.lora_targets!r}: {target!r} names no Linear/Conv2d module of "
                f"this UNet (attention projections it has: {', '.join(attn) or 'none'})"
            )


def add_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Inject the run's LoRA adapters into `model` in place; only they require grad afterwards."""
    check_targets(model, cfg)
    config = lora_config(cfg)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (UNet2DConditionModel)
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:  # UNet2DModel has no mixin: the peft call add_adapter makes
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(_ADAPTER_KEY.search(name)))
    return model


def adapter_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the LoRA adapters in `model` (empty: no adapters)."""
    return {k for k in model.state_dict() if _ADAPTER_KEY.search(k)}


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a run trains and moves: the adapters when the model has any, else the whole state dict."""
    state = model.state_dict()
    keys = adapter_keys(model)
    return {k: v for k, v in state.items() if k in keys} if keys else state


def diffusers_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA naming (what `save_lora_weights(unet_lora_layers=...)` takes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))


def merged_copy(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """`plain` (the same UNet class without adapters) holding base + alpha/rank * B A merged into each weight, as
    peft's merge does; `model` is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(model)
    for module in work.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in work.state_dict().items() if not _ADAPTER_KEY.search(k)}
    plain.load_state_dict(state, strict=True)
    return plain


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())
