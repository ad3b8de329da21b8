"""Client-side clipping for differential privacy: Flower's `fixedclipping_mod`, for the runs that ask for it.

With `dp-client-clip-norm > 0` the server wraps its strategy in Flower's
`DifferentialPrivacyClientSideFixedClipping`, which sends the clipping norm with every train instruction and
adds Gaussian noise to the aggregate; Flower's `fixedclipping_mod` clips each client's update (raw and EMA
weights together, one vector) to that norm before the reply leaves the client (and before SecAgg+ masks it).
Flower's mod answers a message without the clipping norm with an error, so this mod hands it only the
messages that carry one.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # (the key Flower's wrapper sends)


def client_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    conf = msg.content.config_records.get("config")
    if conf is None or KEY_CLIPPING_NORM not in conf:
        return call_next(msg, ctxt)
    return fixedclipping_mod(msg, ctxt, call_next)
