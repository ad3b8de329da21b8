"""Flower's own strategies with this app's mixin in front: the swappable aggregation rules.

Every client reply carries raw and EMA weights in one ArrayRecord (two flat arrays, `net` and `ema`:
fl_ietagc/federation/wire.py), and each rule below treats both alike, element by element, so the global EMA always
follows the same aggregation as the raw weights:

| name            | Flower class                              | what the server does with each key (raw and EMA)           |
|-----------------|-------------------------------------------|------------------------------------------------------------|
| `fedavg`        | FedAvg                                    | size-weighted mean; clients restart Adam every round       |
| `fedavgm`       | FedAvgM                                   | server momentum on the pseudo-gradient (mean - current)    |
| `fedprox`       | FedProx                                   | size-weighted mean; clients add mu/2 ||w - w_global||^2     |
| `fedadam`       | FedAdam                                   | server Adam on the pseudo-gradient                         |
| `fedyogi`       | FedYogi                                   | server Yogi on the pseudo-gradient                         |
| `fedadagrad`    | FedAdagrad                                | server Adagrad on the pseudo-gradient                      |
| `fedmedian`     | FedMedian                                 | coordinate-wise median                                     |
| `fedtrimmedavg` | FedTrimmedAvg                             | coordinate-wise mean without the top/bottom `trim-beta`     |
| `krum`          | Krum                                      | the one reply (raw and EMA as one vector) with the least    |
|                 |                                           | sum of squared distances to its K-f-2 nearest, taken whole |
| `multikrum`     | MultiKrum                                 | the `multikrum-select` best Krum scores, size-weighted mean|
| `bulyan`        | Bulyan                                    | MultiKrum picks K-2f, then per coordinate the mean of the   |
|                 |                                           | K-4f values nearest the median                             |
| `qfedavg`       | QFedAvg                                   | q-FFL step: updates weighted by loss^q (the reply's `loss`),|
|                 |                                           | Lipschitz estimate L = 1/lr                                |
| any + dp        | DifferentialPrivacyServerSideFixedClipping| each update (raw and EMA together, one vector) clipped to   |
|                 |                                           | `dp-clip-norm`, Gaussian noise on the aggregate             |
| any + dp        | DifferentialPrivacyServerSideAdaptive-    | as above, the norm starting at `dp-clip-norm` and moved     |
| (adaptive)      | Clipping                                  | each round towards `dp-target-quantile` of update norms     |

Krum, MultiKrum and Bulyan see the raw and EMA weights of a reply as one vector (Flower concatenates every
array of the ArrayRecord), so a reply is kept or dropped whole: the global EMA comes from the same clients as the
global raw weights.

(`iet`, the paper's rule, is in iet.py: size-weighted mean, clients keep their Adam state across rounds.)
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

from .base import AppStrategyMixin, metrics_of_the_mixin
from .iet import FedAvgInPlace


def common_args(num_clients: int) -> dict:
    """Every client trains every round; the round metrics are the mixin's. No federated evaluation: see
    no_evaluation."""
    return dict(
        fraction_train=1.0,
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,
        train_metrics_aggr_fn=metrics_of_the_mixin,
    )


def no_evaluation(strategy):
    """Switch Flower's federated evaluation off (configure_evaluate then sends nothing). Set after construction:
    fraction_evaluate=0.0 in the constructor makes Flower log 'Federated evaluation will be skipped.' as a
    WARNING every time a strategy is built (twice per run), for what is this app's design (models are evaluated
    by fl-ietagc evaluate)."""
    strategy.fraction_evaluate, strategy.min_evaluate_nodes = 0.0, 0
    return strategy


class FedAvgFreshOptimizer(AppStrategyMixin, FedAvgInPlace):
    """FedAvg as FL usually runs it: clients rebuild their optimizer every round (IET keeps it)."""

    client_flags = {"reset-optimizer": True}


class AppFedAvgM(AppStrategyMixin, FedAvgM):
    pass


class AppFedProx(AppStrategyMixin, FedProx):
    pass


class AppFedAdam(AppStrategyMixin, FedAdam):
    pass


class AppFedYogi(AppStrategyMixin, FedYogi):
    pass


class AppFedMedian(AppStrategyMixin, FedMedian):
    pass


class AppFedTrimmedAvg(AppStrategyMixin, FedTrimmedAvg):
    pass


class AppFedAdagrad(AppStrategyMixin, FedAdagrad):
    pass


class AppKrum(AppStrategyMixin, Krum):
    pass


class AppMultiKrum(AppStrategyMixin, MultiKrum):
    pass


class AppBulyan(AppStrategyMixin, Bulyan):
    pass


class AppQFedAvg(AppStrategyMixin, QFedAvg):
    pass


class AppDPWrapper(AppStrategyMixin):
    """This app's mixin around one of Flower's DP wrappers (which hold the wrapped strategy in `.strategy`).

    The mixin runs first (failures, partition order), then Flower clips each update, the wrapped strategy
    aggregates, and Flower adds noise. With few clients this is a clipping-and-noise regulariser, not a
    meaningful privacy guarantee (client-level DP needs many clients per round).
    """

    def setup_app(
        self,
        num_clients: int,
        failure_policy: str = "fail",
        min_clients_fraction: float = 1.0,
        node_wait_s: float = 600.0,
        layout=None,
        decodes_replies: bool = True,
    ) -> None:
        super().setup_app(num_clients, failure_policy, min_clients_fraction, node_wait_s, layout, decodes_replies)
        # the wrapper sorts and decodes the replies before clipping them; the wrapped strategy sorts them again
        # (its aggregate_train, which Flower's wrapper calls) but need not decode them
        self.strategy.setup_app(num_clients, failure_policy, min_clients_fraction, node_wait_s, layout, False)

    # (configure_train: Flower's wrapper hands the instruction, `config`, to the wrapped strategy, which adds its
    # own flags and the RET shards to every message)

    def use_shards(self, assignment) -> None:
        super().use_shards(assignment)
        self.strategy.use_shards(assignment)  # (the wrapped strategy writes the messages)

    def connected_nodes(self, server_round: int, grid, poll_s: float = 1.0) -> None:
        return None  # the wrapped strategy waits for the SuperNodes (in its configure_train, which Flower calls)


class AppDPFixedClipping(AppDPWrapper, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping + Gaussian noise around another strategy of this app."""


class AppDPAdaptiveClipping(AppDPWrapper, DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping (Andrew et al. 2021) + Gaussian noise around another strategy of this app;
    its clipping norm changes every round and is part of the strategy state a resumed run restores."""
