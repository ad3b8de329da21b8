"""Strategy registry: the run-config key `strategy` picks one by name.

A strategy is registered with a builder `(cfg: RunConfig, num_clients: int) -> strategy`, which returns a
Flower strategy with `AppStrategyMixin` in front (see base.py). Adding a strategy = a class, one line here,
and its name in fl_ietagc/config.py's STRATEGIES (plus STRATEGY_KEYS for keys only it reads); the ServerApp does
not change. `dp-clip-norm > 0` wraps whichever strategy in Flower's server-side
fixed-clipping DP wrapper, `dp-client-clip-norm > 0` in its client-side one (strategies/privacy.py).
"""

from __future__ import annotations

from typing import Callable

from fl_ietagc.config import RunConfig

from .flower_strategies import (AppDPFixedClipping, AppFedAdam, AppFedAvgM, AppFedMedian, AppFedProx,
                                AppFedTrimmedAvg, AppFedYogi, FedAvgFreshOptimizer, common_args, no_evaluation)
from .iet import IETFedAvg
from .privacy import AppDPClientClipping

STRATEGIES: dict[str, Callable] = {
    "iet": lambda cfg, k: IETFedAvg(k),
    "fedavg": lambda cfg, k: FedAvgFreshOptimizer(**common_args(k)),
    "fedavgm": lambda cfg, k: AppFedAvgM(**common_args(k), server_learning_rate=cfg.fedavgm_lr,
                                         server_momentum=cfg.fedavgm_momentum),
    "fedprox": lambda cfg, k: AppFedProx(**common_args(k), proximal_mu=cfg.fedprox_mu),
    "fedadam": lambda cfg, k: AppFedAdam(**common_args(k), eta=cfg.fedopt_eta, tau=cfg.fedopt_tau),
    "fedyogi": lambda cfg, k: AppFedYogi(**common_args(k), eta=cfg.fedopt_eta, tau=cfg.fedopt_tau),
    "fedmedian": lambda cfg, k: AppFedMedian(**common_args(k)),
    "fedtrimmedavg": lambda cfg, k: AppFedTrimmedAvg(**common_args(k), beta=cfg.trim_beta),
}

def build_strategy(cfg: RunConfig, num_clients: int):
    """The strategy `cfg.strategy` names (parse_config has checked the name and its keys)."""
    strategy = no_evaluation(STRATEGIES[cfg.strategy](cfg, num_clients))
    if cfg.dp_clip_norm > 0:
        strategy = AppDPFixedClipping(strategy, noise_multiplier=cfg.dp_noise_multiplier,
                                      clipping_norm=cfg.dp_clip_norm, num_sampled_clients=num_clients)
    elif cfg.dp_client_clip_norm > 0:
        strategy = AppDPClientClipping(strategy, noise_multiplier=cfg.dp_noise_multiplier,
                                       clipping_norm=cfg.dp_client_clip_norm, num_sampled_clients=num_clients)
    return strategy
