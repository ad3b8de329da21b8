"""Client-side clipping for differential privacy: Flower's `fixedclipping_mod`, for the runs that ask for it.

With `dp-client-clip-norm > 0` the server wraps its strategy in Flower's
`DifferentialPrivacyClientSideFixedClipping`, which sends the clipping norm with every train instruction and
adds Gaussian noise to the aggregate; Flower's `fixedclipping_mod` clips each client's update (raw and EMA
weights together, one vector: the flat `net` and `ema` arrays) to that norm before the reply leaves the client
(and before SecAgg+ masks it).

Flower's mod wants a message with exactly one ConfigRecord and one ArrayRecord, and answers any other message
with an error. This mod hands it only the instructions that carry a clipping norm, reduced to their `config`
and `arrays` records (the train function still gets the whole instruction, e.g. the weights' `layout`), and
passes a client's own error reply back as it is, so the server can name the partition.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # (the key Flower's wrapper sends)

from fl_ietagc.federation import protocol as P


class _ClientError(Exception):
    def __init__(self, reply: Message):
        self.reply = reply


def client_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    conf = msg.content.config_records.get("config")
    if conf is None or KEY_CLIPPING_NORM not in conf:
        return call_next(msg, ctxt)
    whole = msg.content
    msg.content = RecordDict({P.ARRAYS: whole[P.ARRAYS], "config": whole["config"]})

    def train_on_the_whole_instruction(m: Message, c: Context) -> Message:
        m.content = whole
        reply = call_next(m, c)
        if not reply.has_error() and P.ERROR in reply.content.config_records:
            raise _ClientError(reply)  # (Flower's mod would answer it with its own error, without the partition)
        return reply

    try:
        return fixedclipping_mod(msg, ctxt, train_on_the_whole_instruction)
    except _ClientError as e:
        return e.reply
    finally:
        msg.content = whole
