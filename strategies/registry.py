"""Strategy registry: the run-config key `strategy` picks one by name.

A strategy is registered with a builder `(cfg: RunConfig, num_clients: int) -> Strategy` that returns
an `AppStrategyMixin` subclass. Adding a strategy = one class + one line here; the ServerApp
does not change.
"""

from __future__ import annotations

from typing import Callable

from fl_ietagc.config import ConfigError, RunConfig

from .iet import IET

STRATEGIES: dict[str, Callable] = {
    "iet": lambda cfg, k: IET(k),
}


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy = {name!r}: must be one of {', '.join(sorted(STRATEGIES))}")


def build_strategy(cfg: RunConfig, num_clients: int):
    check_strategy(cfg.strategy)
    return STRATEGIES[cfg.strategy](cfg, num_clients)
