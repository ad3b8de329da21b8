"""A SecAgg+ round: Flower's `SecAggPlusWorkflow`, stage by stage, inside this app's round loop.

Flower 1.41 has SecAgg+ only for its legacy server API: `SecAggPlusWorkflow(grid, LegacyContext)` samples
clients with a legacy strategy's `configure_fit`, runs the protocol's four stages (setup, share keys,
collect masked vectors, unmask) and hands the unmasked aggregate to `aggregate_fit`; the Message-API
strategies (`flwr.serverapp.strategy`) have no secure-aggregation counterpart. This module keeps Flower's
protocol code whole (key agreement, Shamir shares, masking, dropout recovery, dequantization) and calls its
four public stage methods itself, with three small stand-ins around them:

- the clients and the train instruction come from this app's Message-API strategy (`configure_train` with the
  ServerApp's round instruction: node wait, run settings, RET shards); after the setup stage each client's legacy FitIns is replaced by
  its own copy of that instruction, which the collect stage sends with the client's key shares;
- `_Aggregate`, the legacy strategy the stages call, only keeps the unmasked aggregate;
- `_ProtocolGrid` moves each stage's messages with the ServerApp's own `exchange` (at most `round-timeout-s`
  per stage; replies asked for every 0.1 s, not Grid.send_and_receive's 3 s), keeps the train stage's
  messages, replies and timing for the failure policy and metrics, and drops a client's own error reply from
  what the stages see, so the protocol treats that client as lost and rebuilds the masks it shared.

The aggregate is the shard-size weighted mean of the raw and EMA weights of the clients that finished the
train stage (Flower's mod pre-multiplies by num-examples / max-weight); the strategy's own rule then runs
on it (`AppStrategyMixin.aggregate_secure`). Per-client metrics (loss, skip counts, image ids) still reach
the server in the clear: the failure policy, RET and metrics.json need them; weights never do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.history import History
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.secure_sum import max_weight, shares_and_threshold
from fl_ietagc.federation.wire import npy_fields
from fl_ietagc.runs.faults import fault_point
from fl_ietagc.settings.config import RunConfig

from .base import RoundReplies


class _Aggregate:
    """The legacy strategy of the workflow's stages: the clients our strategy chose; the aggregate, kept."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids
        self.parameters: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.parameters = results[0][1].parameters if results else None  # (every result holds the aggregate)
        return self.parameters, {}


class _ProtocolGrid:
    def __init__(self, grid, exchange, timeout: float):
        self.grid, self.exchange, self.timeout = grid, exchange, timeout
        self.train_sent: list = []
        self.train_replies: list = []
        self.train_timing: dict = {}
        self.train_done_at = 0.0

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies, timing = self.exchange(self.grid, messages, self.timeout)
        if messages and P.ARRAYS in messages[0].content.array_records:  # the stage with the train instruction
            self.train_sent, self.train_replies, self.train_timing = messages, replies, timing
            self.train_done_at = time.time()
        return [r for r in replies if r.has_error() or P.ERROR not in r.content.config_records]


@dataclass
class SecureRound:
    arrays: ArrayRecord | None  # what the strategy's aggregate_train would return (None: see `why`)
    outcome: RoundReplies  # the train stage's replies as the strategy sorted them out
    replies: list  # the train stage's replies (metrics, no weights)
    timing: dict  # the train stage's exchange timing (server_app.exchange)
    train_done_at: float
    why: str = ""  # why the protocol could not unmask the sum, when it could not


def workflow_for(cfg: RunConfig, num_clients: int, shard_sizes) -> SecAggPlusWorkflow:
    shares, threshold = shares_and_threshold(num_clients, cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold)
    return SecAggPlusWorkflow(
        num_shares=shares if cfg.secagg_num_shares else 1.0,  # (1.0: every client)
        reconstruction_threshold=threshold,
        max_weight=float(max_weight(shard_sizes, cfg.secagg_quantization_range)),
        clipping_range=float(cfg.secagg_clipping_range),
        quantization_range=cfg.secagg_quantization_range,
        timeout=cfg.round_timeout_s,
    )


def secure_round(
    grid, strategy, cfg: RunConfig, server_round: int, arrays: ArrayRecord, instruction: ConfigRecord, shards, exchange
) -> SecureRound:
    """One round under SecAgg+. `arrays`: the global flat weights (float32, as the strategy aggregates them);
    `instruction`: the ServerApp's train instruction of this round (as for configure_train);
    `exchange(grid, messages, timeout) -> (replies, timing)`: how the ServerApp pushes and pulls a stage."""
    messages = list(strategy.configure_train(server_round, arrays, instruction, grid))
    # one RecordDict per client: the collect stage writes each client's key shares into it
    instructions = {m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages}
    workflow = workflow_for(cfg, strategy.num_clients, [len(s) for s in shards])
    legacy = _Aggregate(list(instructions))
    context = SimpleNamespace(
        state=RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: ArrayRecord(),
            }
        ),
        strategy=legacy,
        client_manager=SimpleNamespace(num_available=lambda: len(instructions)),
        history=History(),
    )
    proto_grid, state = _ProtocolGrid(grid, exchange, cfg.round_timeout_s), WorkflowState()
    done = workflow.setup_stage(proto_grid, context, state)
    state.nid_to_fitins = instructions
    for stage in (workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage):
        done = done and stage(proto_grid, context, state)
    fault_point("after-replies", server_round)
    mean = None
    if done and legacy.parameters is not None:
        # the clients sent their arrays in the order of the instruction's ArrayRecord (clients/secure_aggregation.py)
        order = list(messages[0].content[P.ARRAYS].keys())
        sums = parameters_to_ndarrays(legacy.parameters)
        mean = ArrayRecord(
            {
                k: Array(**npy_fields(np.asarray(v, dtype=np.dtype(arrays[k].dtype)).reshape(arrays[k].shape)))
                for k, v in zip(order, sums, strict=True)
            }
        )
    new_arrays, outcome = strategy.aggregate_secure(server_round, proto_grid.train_replies, proto_grid.train_sent, mean)
    why = (
        ""
        if mean is not None
        else f"SecAgg+ could not unmask the sum: fewer than secagg-reconstruction-threshold = "
        f"{workflow.reconstruction_threshold} share holders stayed connected for some client, or fewer than 2 "
        f"clients took part"
    )
    return SecureRound(
        new_arrays,
        outcome,
        proto_grid.train_replies,
        proto_grid.train_timing,
        proto_grid.train_done_at,
        why,
    )
