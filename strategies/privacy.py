"""Client-side clipping DP (dp-client-clip-norm): Flower's `DifferentialPrivacyClientSideFixedClipping` around
another strategy of this app.

Flower's wrapper puts the clipping norm into every train instruction (clients/privacy.py hands those
messages to Flower's `fixedclipping_mod`, which clips the client's update before it is sent, or masked by
SecAgg+), lets the wrapped strategy aggregate, and adds Gaussian noise of std z * S / K to the aggregate.
Under SecAgg+ the wrapped strategy's rule runs on the protocol's mean (`aggregate_secure`), then the same
noise is added. The epsilon this spends is accounted in fl_ietagc/training/privacy.py.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from .flower_strategies import AppDPWrapper


class AppDPClientClipping(AppDPWrapper, DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping (the clients' fixedclipping_mod) + Gaussian noise on the aggregate, around
    another strategy of this app; also on SecAgg+'s masked mean."""

    def aggregate_secure(self, server_round: int, replies, sent, mean):
        """The wrapped strategy sorts the replies and runs its rule on the mean; the noise goes on its result."""
        arrays, round_replies = self.strategy.aggregate_secure(server_round, replies, sent, mean)
        return (None if arrays is None else self._add_noise_to_aggregated_arrays(arrays)), round_replies
