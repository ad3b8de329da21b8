"""Strategy registry: the run-config key `strategy` picks one by name.

A strategy is registered with a builder `(cfg: RunConfig, num_clients: int) -> strategy`, which returns a
Flower strategy with `AppStrategyMixin` in front (see base.py). Adding a strategy = a class and one line
here; the ServerApp does not change. `dp-clip-norm > 0` wraps whichever strategy in Flower's server-side
fixed-clipping DP wrapper.
"""

from __future__ import annotations

from typing import Callable

from fl_ietagc.config import ConfigError, RunConfig

from .flower_strategies import (AppDPFixedClipping, AppFedAdam, AppFedAvgM, AppFedMedian, AppFedProx,
                                AppFedTrimmedAvg, AppFedYogi, FedAvgFreshOptimizer, common_args)
from .iet import IETFedAvg

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

# run-config keys that only some strategies read: set away from their default with another strategy, they
# would be silently ignored, so that is an error
STRATEGY_KEYS = {"fedavgm-lr": {"fedavgm"}, "fedavgm-momentum": {"fedavgm"}, "fedprox-mu": {"fedprox"},
                 "fedopt-eta": {"fedadam", "fedyogi"}, "fedopt-tau": {"fedadam", "fedyogi"},
                 "trim-beta": {"fedtrimmedavg"}}


def check_strategy(name: str, cfg: RunConfig | None = None) -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy = {name!r}: must be one of {', '.join(sorted(STRATEGIES))}")
    if cfg is None:
        return
    given, defaults = cfg.to_dict(), RunConfig().to_dict()
    for key, users in STRATEGY_KEYS.items():
        if given[key] != defaults[key] and name not in users:
            raise ConfigError(f"{key} = {given[key]}: only used by strategy {' / '.join(sorted(users))}, "
                              f"not {name}")


def build_strategy(cfg: RunConfig, num_clients: int):
    check_strategy(cfg.strategy, cfg)
    strategy = STRATEGIES[cfg.strategy](cfg, num_clients)
    if cfg.dp_clip_norm > 0:
        strategy = AppDPFixedClipping(strategy, noise_multiplier=cfg.dp_noise_multiplier,
                                      clipping_norm=cfg.dp_clip_norm, num_sampled_clients=num_clients)
    return strategy
