"""Client-side clipping DP (dp-client-clip-norm): Flower's `DifferentialPrivacyClientSideFixedClipping` around
another strategy of this app.

Flower's wrapper puts the clipping norm into every train instruction (clients/privacy.py hands those
messages to Flower's `fixedclipping_mod`, which clips the client's update before it is sent, or masked by
SecAgg+), lets the wrapped strategy aggregate, and adds Gaussian noise of std z * S / K to the aggregate.
Under SecAgg+ the wrapped strategy's rule runs on the protocol's mean (`aggregate_secure`), then the same
noise is added. The epsilon this spends is accounted in fl_ietagc/privacy.py.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from .base import AppStrategyMixin


class AppDPClientClipping(AppStrategyMixin, DifferentialPrivacyClientSideFixedClipping):
    def setup_app(self, num_clients: int, round_config: dict, failure_policy: str = "fail",
                  min_clients_fraction: float = 1.0, node_wait_s: float = 600.0, layout=None) -> None:
        super().setup_app(num_clients, round_config, failure_policy, min_clients_fraction, node_wait_s, layout)
        self.strategy.setup_app(num_clients, round_config, failure_policy, min_clients_fraction, node_wait_s, layout)
        self.strategy.decodes_replies = False  # the wrapper sorted and decoded the replies
        self.strategy.round_config = self.round_config  # one dict: what the ServerApp updates, both send
        self.client_flags = getattr(self.strategy, "client_flags", {})

    def use_shards(self, assignment) -> None:
        super().use_shards(assignment)
        self.strategy.use_shards(assignment)  # (the wrapped strategy writes the messages)

    def connected_nodes(self, server_round: int, grid, poll_s: float = 1.0) -> None:
        return None  # the wrapped strategy waits for the SuperNodes (in its configure_train, which Flower calls)

    def aggregate_secure(self, server_round: int, replies, mean, why: str):
        self.strategy.sent = self.sent
        try:
            arrays, metrics = self.strategy.aggregate_secure(server_round, replies, mean, why)
        finally:
            self.last_round, self.last_failures = self.strategy.last_round, self.strategy.last_failures
        return self._add_noise_to_aggregated_arrays(arrays), metrics
