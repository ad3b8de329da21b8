"""Strategy registry: the run-config key `strategy` picks one by name.

A strategy is registered with a builder `(cfg: RunConfig, num_clients: int) -> strategy`, which returns a
Flower strategy with `AppStrategyMixin` in front (see base.py). Adding a strategy = a class, one line here,
and its name in fl_ietagc/settings/config.py's STRATEGIES (plus STRATEGY_KEYS for keys only it reads); the ServerApp does
not change. `dp-clip-norm > 0` wraps whichever strategy in Flower's server-side
fixed-clipping DP wrapper (`dp-clipping = "adaptive"`: its adaptive-clipping wrapper), `dp-client-clip-norm > 0`
in its client-side one (strategies/privacy.py).
"""

from __future__ import annotations

from collections.abc import Callable

from fl_ietagc.settings.config import RunConfig, check_strategy_clients

from .flower_strategies import (
    AppBulyan,
    AppDPAdaptiveClipping,
    AppDPFixedClipping,
    AppFedAdagrad,
    AppFedAdam,
    AppFedAvgM,
    AppFedMedian,
    AppFedProx,
    AppFedTrimmedAvg,
    AppFedYogi,
    AppKrum,
    AppMultiKrum,
    AppQFedAvg,
    FedAvgFreshOptimizer,
    common_args,
    no_evaluation,
)
from .iet import IETFedAvg
from .privacy import AppDPClientClipping

STRATEGIES: dict[str, Callable] = {
    "iet": lambda cfg, k: IETFedAvg(k),
    "fedavg": lambda cfg, k: FedAvgFreshOptimizer(**common_args(k)),
    "fedavgm": lambda cfg, k: AppFedAvgM(
        **common_args(k), server_learning_rate=cfg.fedavgm_lr, server_momentum=cfg.fedavgm_momentum
    ),
    "fedprox": lambda cfg, k: AppFedProx(**common_args(k), proximal_mu=cfg.fedprox_mu),
    "fedadam": lambda cfg, k: AppFedAdam(**common_args(k), eta=cfg.fedopt_eta, tau=cfg.fedopt_tau),
    "fedyogi": lambda cfg, k: AppFedYogi(**common_args(k), eta=cfg.fedopt_eta, tau=cfg.fedopt_tau),
    "fedadagrad": lambda cfg, k: AppFedAdagrad(**common_args(k), eta=cfg.fedopt_eta, tau=cfg.fedopt_tau),
    "fedmedian": lambda cfg, k: AppFedMedian(**common_args(k)),
    "fedtrimmedavg": lambda cfg, k: AppFedTrimmedAvg(**common_args(k), beta=cfg.trim_beta),
    "krum": lambda cfg, k: AppKrum(**common_args(k), num_malicious_nodes=cfg.malicious_clients),
    "multikrum": lambda cfg, k: AppMultiKrum(
        **common_args(k), num_malicious_nodes=cfg.malicious_clients, num_nodes_to_select=cfg.multikrum_select
    ),
    "bulyan": lambda cfg, k: AppBulyan(**common_args(k), num_malicious_nodes=cfg.malicious_clients),
    # the reply's metric "loss" is q-FFL's F_k (the client's mean training loss this round); L = 1 / lr
    "qfedavg": lambda cfg, k: AppQFedAvg(
        client_learning_rate=cfg.lr, q=cfg.qfedavg_q, train_loss_key="loss", **common_args(k)
    ),
}


def build_strategy(cfg: RunConfig, num_clients: int):
    """The strategy `cfg.strategy` names (parse_config has checked the name and its keys; the rule's needs on K
    are checked here, where K is known)."""
    check_strategy_clients(cfg, num_clients)
    strategy = no_evaluation(STRATEGIES[cfg.strategy](cfg, num_clients))
    if cfg.dp_clip_norm > 0 and cfg.dp_clipping == "adaptive":
        strategy = AppDPAdaptiveClipping(
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            num_sampled_clients=num_clients,
            initial_clipping_norm=cfg.dp_clip_norm,
            target_clipped_quantile=cfg.dp_target_quantile,
            clip_norm_lr=cfg.dp_clip_norm_lr,
        )
    elif cfg.dp_clip_norm > 0:
        strategy = AppDPFixedClipping(
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clip_norm,
            num_sampled_clients=num_clients,
        )
    elif cfg.dp_client_clip_norm > 0:
        strategy = AppDPClientClipping(
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_client_clip_norm,
            num_sampled_clients=num_clients,
        )
    return strategy
