"""The compile-mode key: torch.compile's mode for the training step and the sampler (reduce-overhead = CUDA graphs),
checked with the config and refused in one line where it cannot work (off CUDA), before anything compiles."""

import copy

import pytest
import torch

from fl_ietagc.settings.config import ConfigError, parse_config
from fl_ietagc.training import compiled
from fl_ietagc.training.models import build_unet
from fl_ietagc.training.trainer import LocalTrainer, TrainState
from fl_ietagc.validate import check_device


def test_compile_mode_is_checked_and_refused_off_cuda():
    compiled.clear_cache()
    with pytest.raises(ConfigError, match=r"^compile-mode = 'reduce-overhead': only used with compile = true$"):
        parse_config({"compile-mode": "reduce-overhead"})
    with pytest.raises(
        ConfigError,
        match=r"^compile-mode = 'graphs': must be one of default, reduce-overhead, "
        r"max-autotune, max-autotune-no-cudagraphs$",
    ):
        parse_config({"compile": True, "compile-mode": "graphs"})
    cfg = parse_config({"compile": True, "compile-mode": "reduce-overhead", "device": "cpu"})
    with pytest.raises(ConfigError, match=r"^compile-mode = 'reduce-overhead': CUDA only .*device = 'cpu'"):
        check_device(cfg)
    model = build_unet("tiny", 16, 1)
    state = TrainState.fresh(range(8))
    with pytest.raises(
        ValueError,
        match=r"^compile-mode = 'max-autotune': CUDA only \(CUDA graphs / GPU kernel "
        r"tuning\), but this process trains on cpu; use compile-mode = \"default\"$",
    ):
        LocalTrainer(
            cfg.replace(**{"compile-mode": "max-autotune", "device": "auto"}),
            model,
            copy.deepcopy(model),
            torch.zeros(8, 1, 16, 16, dtype=torch.uint8),
            state,
            torch.device("cpu"),
        )
    assert compiled.STATS.builds == 0  # refused before anything was compiled
