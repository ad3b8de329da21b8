"""The ClientApp's side of SecAgg+: Flower's own `secaggplus_mod`, and the reply it needs.

Flower's mod (flwr.client.mod.secaggplus_mod, Flower 1.41) runs the client's part of the protocol: key
pairs, Shamir shares of its secrets for its neighbours, and, in the stage that carries the train
instruction, it calls the train function, reads the weights from the reply in Flower's legacy
`fitres.*` records, multiplies them by num-examples / max-weight, quantizes, masks them, and clears every
ArrayRecord of the reply: only the masked integer vector leaves the client.

`secure_aggregation_mod` is the ClientApp's outermost mod. A message without the protocol's config record
goes straight on (runs without secure aggregation). In the protocol's train stage it hands the train
function the instruction without the protocol's record (so the mods inside, e.g. Flower's clipping mod,
see the message they expect), then turns the reply into the `fitres.*` form (`secure_reply`), checking
on the client what the server can no longer check: non-finite weights, and weights outside
+-secagg-clipping-range (which the protocol would silently clip) are this client's error. A client error
goes back as our `error` record (partition, round, traceback) instead of a masked vector: the server
counts the client as lost, and the protocol rebuilds the masks it shared from the other clients' shares.
"""

from __future__ import annotations

import traceback

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.protocol import ClientFailure, one_line
from fl_ietagc.federation.wire import Layout, decode, nonfinite_at
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.trainer import client_seed


class _ClientError(Exception):
    def __init__(self, reply: Message):
        self.reply = reply


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train_then_convert(m: Message, c: Context) -> Message:
        protocol_record = m.content.config_records[RECORD_KEY_CONFIGS]
        m.content = RecordDict({k: v for k, v in m.content.items() if k != RECORD_KEY_CONFIGS})
        reply = call_next(m, c)
        m.content[RECORD_KEY_CONFIGS] = protocol_record
        if reply.has_error() or P.ERROR in reply.content.config_records:
            raise _ClientError(reply)  # (Flower's mod would fail reading fitres.* from it)
        try:
            content = secure_reply(m.content, reply.content, c)
        except Exception as e:
            info = reply.content.config_records[P.INFO]
            failure = ClientFailure(
                int(info["partition-id"]),
                int(m.content["config"][P.ROUND]),
                f"{type(e).__name__}: {one_line(str(e))}",
                traceback=traceback.format_exc(),
            )
            raise _ClientError(Message(RecordDict({P.ERROR: ConfigRecord(failure.to_record())}), reply_to=m)) from e
        return Message(content, reply_to=m)

    try:
        return secaggplus_mod(msg, ctxt, train_then_convert)
    except _ClientError as e:
        return e.reply


def secure_reply(instruction: RecordDict, reply: RecordDict, context: Context) -> RecordDict:
    """The reply as Flower's mod reads it (fitres.*: the flat weights, decoded from the transport dtype, as float64
    arrays in the order of the instruction's ArrayRecord, num-examples), plus our metrics and info records. numpy's global RNG, which the
    mod's stochastic rounding draws from, is seeded from the run seed, partition and round, so a round's
    aggregate is the same in every run with the same seed."""
    cfg = parse_config(context.run_config)
    order, weights = list(instruction[P.ARRAYS].keys()), reply[P.ARRAYS]
    if list(weights.keys()) != order:
        raise ValueError(f"the reply's {len(weights)} arrays are not the instruction's {len(order)}, in order")
    # the flat arrays as the server would average them (transport-dtype decoded), then float64 for the mod
    decoded = decode({k: a.numpy() for k, a in weights.items()}, Layout.from_record(instruction[P.LAYOUT]))
    arrays = [decoded[k].astype(np.float64) for k in order]
    bad = [k for k, a in zip(order, arrays) if nonfinite_at(a) is not None]
    if bad:
        raise FloatingPointError(f"returned non-finite weights ({len(bad)} arrays, e.g. {bad[0]})")
    top, key = max((float(np.abs(a).max(initial=0.0)), k) for k, a in zip(order, arrays))
    if top > cfg.secagg_clipping_range:
        raise ValueError(
            f"secagg-clipping-range = {cfg.secagg_clipping_range:g}: weight {key} reaches {top:.4g}, "
            f"which SecAgg+ would clip; raise secagg-clipping-range"
        )
    metrics, info = reply[P.METRICS], reply[P.INFO]
    np.random.seed(client_seed(cfg.seed, int(info["partition-id"]), int(instruction["config"][P.ROUND])) % 2**32)
    content = fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(metrics["num-examples"]), {}), keep_input=False
    )
    content[P.METRICS] = MetricRecord(dict(metrics))
    content[P.INFO] = ConfigRecord(dict(info))
    return content
