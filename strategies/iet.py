"""IET: Iterative Ensemble Training's aggregation.

Every client returns its raw and EMA weights in one ArrayRecord (keys `net.*` and `ema.*`), so
Flower's FedAvg, weighted by `num-examples` (the shard size), averages raw and EMA weights
separately with weights |D_c| / sum |D|, exactly the paper's rule. The result goes back to every
client, which restarts from it.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .base import AppStrategyMixin, metrics_of_the_mixin, weighted_mean_record


class FedAvgInPlace(FedAvg):
    """Flower's FedAvg whose weighted mean reads the replies in place (base.weighted_mean_record: bit-identical,
    without Flower's copies; tests/test_wire.py compares the two), into accumulators kept from round to round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulators: dict = {}  # the mean's buffers, kept: a fresh 286 MB per round is page-faulted in

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        return (
            weighted_mean_record(contents, self.weighted_by_key, self.accumulators),
            self.train_metrics_aggr_fn(contents, self.weighted_by_key),
        )


class IETFedAvg(AppStrategyMixin, FedAvgInPlace):
    """FedAvg whose clients keep their Adam state, LR position and AGC bank across rounds (the paper's IET);
    `FedAvgFreshOptimizer` (strategy `fedavg`) is the same average with a new optimizer every round."""

    def __init__(self, num_clients: int):
        super().__init__(
            fraction_train=1.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
            train_metrics_aggr_fn=metrics_of_the_mixin,
        )
        self.fraction_evaluate, self.min_evaluate_nodes = 0.0, 0  # see flower_strategies.no_evaluation
