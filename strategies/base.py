"""What every strategy of this app adds on top of Flower's own strategy classes.

Mixed in front of a Flower strategy (e.g. `class IETFedAvg(AppStrategyMixin, FedAvg)`), it

- waits at most `node-wait-s` at the start of a round for the K SuperNodes to be connected (Flower's own
  sampling would wait forever for a SuperNode that is gone); the missing ones then fall under the failure
  policy below;
- sends each round's instruction to the clients: `configure_train(server_round, arrays, config, grid)`'s
  `config`, which the ServerApp builds every round (run dir, run token, K, the round of each client's state to
  start from), copied into every train message with the strategy's own flags and each client's RET shard (the
  ServerApp hands new shards over with `use_shards`);
- sorts out the replies before Flower aggregates them: a client that reported an error, a Flower error
  (a dead actor or SuperNode), a missing reply and a reply with non-finite weights are each a
  `ClientFailure` naming its partition and round. With `client-failures = "fail"` any failure stops the
  run (Flower would silently average the rest); with `"tolerate"` the round aggregates the replies it got
  (weights renormalised over them) as long as at least `min-clients-fraction` of K replied;
- sorts the good replies by partition id before aggregating, so float sums, and hence the final
  weights, are the same in every run with the same seed and config;
- returns what it sorted out as a value: `aggregate_round(server_round, replies) -> (arrays, RoundReplies)`,
  the good replies, the failures, each client's summary and the round's metrics (computed once, there). The
  ServerApp calls it and hands the RoundReplies on (logs, metrics.json, the round's commit); Flower's own
  `aggregate_train` is `aggregate_round` with the metrics as a MetricRecord. A round the failure policy stops
  raises ClientRoundError, which names its failures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.protocol import ClientFailure, ClientRound, one_line, round_metrics
from fl_ietagc.federation.wire import Layout, array_view, decode, encode, nonfinite_at, npy_fields
from fl_ietagc.training.ret import ShardAssignment


class ClientRoundError(RuntimeError):
    """Clients failed (or did not reply) in a round and the failure policy stops the run."""

    def __init__(self, failures: list[ClientFailure], why: str = ""):
        more = f" (and {len(failures) - 1} more client failure(s))" if len(failures) > 1 else ""
        super().__init__(f"{failures[0].line()}{more}{why}")
        self.failures = failures


def client_round(content: RecordDict) -> ClientRound:
    return ClientRound.from_records(content.metric_records[P.METRICS], content.config_records[P.INFO])


def metrics_of_the_mixin(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's `train_metrics_aggr_fn` hook: nothing to compute. The mixin computes the round's metrics once, from
    the replies it sorted (RoundReplies.metrics), and returns those from `aggregate_train` instead of Flower's
    (a blind weighted mean of every metric, by default)."""
    return MetricRecord()


@dataclass
class RoundReplies:
    """A round's replies, sorted out by `AppStrategyMixin.aggregate_round`: what the ServerApp logs and writes."""

    good: list[Message]  # the replies that were aggregated, in partition order
    failures: list[ClientFailure]  # the clients that failed (the policy tolerated them), in partition order
    clients: list[ClientRound]  # the good replies' summaries, in partition order
    metrics: dict  # protocol.round_metrics(clients): loss, skip rates, ... (computed here, once per round)


def partition_of(reply: Message) -> int:
    return int(reply.content.config_records[P.INFO]["partition-id"])


def nonfinite_keys(arrays: ArrayRecord, layout: Layout | None = None) -> list[str]:
    """Arrays with a NaN or Inf; with a flat layout, named by the tensor (and element) of the first one."""
    bad = []
    for k, a in arrays.items():
        if (at := nonfinite_at(array_view(a))) is not None:
            bad.append(layout.where(k, at) if layout is not None and k in layout.groups() else k)
    return bad


_CHUNK = 1 << 18  # elements per slice of the weighted mean: one product slice (1 MB) stays in the CPU's cache


def weighted_mean_record(
    contents: list[RecordDict], weight_key: str, accumulators: dict[str, np.ndarray] | None = None
) -> ArrayRecord:
    """Flower's `aggregate_arrayrecords` (FedAvg's weighted mean), bit for bit: the same float operations in the same
    order per element (x_0 * w_0, then += x_i * w_i, w_i = n_i / sum n), on read-only views of the replies' bytes
    instead of copies, slice by slice into one accumulator that becomes the Array in one copy. Why: Flower's copies
    each reply out, makes a new product per reply and serializes the mean through a growing BytesIO (~0.5 s per
    round for two replies of the paper UNet, on the server's critical path); and a fresh 143 MB accumulator per
    round cost 0.5 s more in page faults in a long-running ServerApp (benchmarks/round_overhead.py) than a warm
    one. `accumulators`: the caller's buffers, kept between rounds (the mean is copied out of them, so they are
    free again when this returns)."""
    weights = [float(next(iter(c.metric_records.values()))[weight_key]) for c in contents]
    total = sum(weights)
    factors = [w / total for w in weights]
    accumulators = {} if accumulators is None else accumulators
    replies: dict[str, list[tuple[np.ndarray, float]]] = {}  # key -> (view, its reply's factor), in reply order
    for content, factor in zip(contents, factors, strict=True):
        for record in content.array_records.values():
            for key, array in record.items():
                replies.setdefault(key, []).append((array_view(array), factor))
    out: dict[str, Array] = {}
    for key, pairs in replies.items():
        xs = [x for x, _ in pairs]
        if len(xs) != len(factors) or any(x.shape != xs[0].shape or x.dtype != xs[0].dtype for x in xs):
            # (a reply without this key, or shapes/dtypes Flower's `+=` would broadcast or cast: its own expression)
            mean = np.multiply(*pairs[0])
            for x, f in pairs[1:]:
                mean += x * f
            out[key] = Array(**npy_fields(np.asarray(mean)))
            continue
        dtype = np.result_type(xs[0], factors[0])
        acc = accumulators.get(key)
        if acc is None or acc.shape != xs[0].shape or acc.dtype != dtype:
            acc = accumulators[key] = np.empty(xs[0].shape, dtype)
        flat_acc, flats = acc.reshape(-1), [x.reshape(-1) for x in xs]
        product = np.empty(min(_CHUNK, flat_acc.size), dtype)
        for s in range(0, flat_acc.size, _CHUNK):
            a = flat_acc[s : s + _CHUNK]
            np.multiply(flats[0][s : s + _CHUNK], factors[0], out=a)
            for x, f in zip(flats[1:], factors[1:]):
                a += np.multiply(x[s : s + _CHUNK], f, out=product[: a.size])
        out[key] = Array(**npy_fields(acc))
    return ArrayRecord(out)


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(**npy_fields(a)) for k, a in arrays.items()})


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


class AppStrategyMixin:
    """Put in front of a Flower strategy class. Call `setup_app(...)` before the first round."""

    client_flags: dict = {}  # the strategy's own entries in every train instruction, e.g. {"reset-optimizer": True}

    def setup_app(
        self,
        num_clients: int,
        failure_policy: str = "fail",
        min_clients_fraction: float = 1.0,
        node_wait_s: float = 600.0,
        layout: Layout | None = None,
        decodes_replies: bool = True,
    ) -> None:
        self.num_clients = num_clients
        self.failure_policy = failure_policy
        self.min_clients = max(1, math.ceil(min_clients_fraction * num_clients - 1e-9))
        self.node_wait_s = node_wait_s
        self.sent: list[Message] = []  # this round's train messages (their ids name the node an error answers for)
        self.absent: list[ClientFailure] = []  # partitions whose SuperNode was not connected at the round's start
        self.node_partitions: dict[int, int] = {}  # Flower node id -> partition, learnt from replies
        self.shards: ShardAssignment | None = None  # RET: the current shards (see use_shards)
        # the flat weights' layout (fl_ietagc/federation/wire.py): sent with every instruction; replies must match it
        # and are decoded (bf16 transport) before anything is averaged. None: arrays travel and average as given.
        self.layout = layout
        self.decodes_replies = decodes_replies  # False for a strategy wrapped by another that decoded them (DP)

    def use_shards(self, assignment: ShardAssignment) -> None:
        """RET: from the next round on, tell each client its shard from `assignment` (the ServerApp calls this
        with the run's shards at the start, and with new ones whenever RET moves images)."""
        self.shards = assignment

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages: `config` is the ServerApp's instruction for this round (not changed here);
        every message gets a copy of it with the strategy's flags (and, with RET, its client's shard)."""
        config = ConfigRecord({**config, **self.client_flags})
        nodes = self.connected_nodes(server_round, grid)
        if nodes is None:
            self.sent = self.with_layout(list(super().configure_train(server_round, arrays, config, grid)))
            return self.sent
        # Flower samples fraction_train = 1.0 of the connected nodes, waiting for min_available_nodes: this round,
        # the nodes just found (K, or fewer when the failure policy tolerates the missing ones)
        before = self.min_available_nodes, self.min_train_nodes
        self.min_available_nodes = self.min_train_nodes = len(nodes)
        try:
            # kept: the grid gives each its message id when it pushes it, which a Flower error reply names
            self.sent = self.with_layout(
                self.with_shards(list(super().configure_train(server_round, arrays, config, grid)))
            )
        finally:
            self.min_available_nodes, self.min_train_nodes = before
        return self.sent

    def with_layout(self, messages: list[Message]) -> list[Message]:
        """Each message with the weights' layout, and its arrays in the transport dtype (encoded once: Flower's
        strategies give the messages one RecordDict, or, with RET shards, RecordDicts sharing the arrays)."""
        if self.layout is None or not messages:
            return messages
        layout, encoded = ConfigRecord(self.layout.to_record()), {}
        for m in messages:
            if P.LAYOUT in m.content:  # written by a strategy this one wraps
                continue
            arrays = m.content[P.ARRAYS]
            if id(arrays) not in encoded:  # (already in the wire dtypes: sent as it is, not serialized again)
                encoded[id(arrays)] = (
                    arrays if self.in_wire_dtypes(arrays) else as_record(encode(numpy_arrays(arrays), self.layout))
                )
            m.content = RecordDict({**m.content, P.ARRAYS: encoded[id(arrays)], P.LAYOUT: layout})
        return messages

    def in_wire_dtypes(self, arrays: ArrayRecord) -> bool:
        """The arrays have the layout's groups, each in its wire dtype (from the arrays' metadata, not decoded)."""
        groups = self.layout.groups()
        if set(arrays.keys()) != set(groups):
            return False
        wire = {
            g: (
                "int16"
                if self.layout.transport == "bf16" and self.layout.dtypes[i[0]] == "float32"
                else self.layout.dtypes[i[0]]
            )
            for g, i in groups.items()
        }
        return all(a.dtype == wire.get(k) for k, a in arrays.items())

    def with_shards(self, messages: list[Message]) -> list[Message]:
        """Each message with its own copy of the train config, holding its client's shard (RET), if any."""
        if self.shards is None or not self.shards.redistributed:
            return messages
        for m in messages:
            shards = self.shards.instruction(self.node_partitions.get(m.metadata.dst_node_id))
            content = m.content  # (Flower's strategies give every message the same RecordDict)
            key = self.configrecord_key
            m.content = RecordDict({**content, key: ConfigRecord({**content[key], **shards})})
        return messages

    def connected_nodes(self, server_round: int, grid: Grid, poll_s: float = 1.0) -> list[int] | None:
        """The connected SuperNodes once all K are, or after `node-wait-s` the ones that are, when the failure
        policy allows the round without the others (else ClientRoundError naming the missing partitions)."""
        self.absent = []
        deadline, said = time.time() + self.node_wait_s, 0.0
        while len(nodes := list(grid.get_node_ids())) < self.num_clients and time.time() < deadline:
            if time.time() - said >= 30:
                log(
                    INFO,
                    "fl-ietagc: round %d waits for SuperNodes: %d of %d connected (node-wait-s = %g)",
                    server_round,
                    len(nodes),
                    self.num_clients,
                    self.node_wait_s,
                )
                said = time.time()
            time.sleep(poll_s)
        if len(nodes) >= self.num_clients:
            return nodes
        gone = sorted({p for n, p in self.node_partitions.items() if n not in nodes})
        why = f"SuperNode not connected at the start of the round (waited node-wait-s = {self.node_wait_s:g} s)"
        self.absent = [ClientFailure(p, server_round, why) for p in gone] or [
            ClientFailure(-1, server_round, f"{self.num_clients - len(nodes)} SuperNode(s) missing: {why}")
        ]
        summary = f"; only {len(nodes)} of {self.num_clients} SuperNodes connected"
        if self.failure_policy == "fail" or len(nodes) < self.min_clients:
            raise ClientRoundError(
                self.absent,
                summary + ("" if self.failure_policy == "fail" else f", min-clients-fraction needs {self.min_clients}"),
            )
        log(
            WARNING,
            "fl-ietagc: round %d goes on without %s%s (client-failures = tolerate)",
            server_round,
            ", ".join(f"partition {f.partition_id}" for f in self.absent if f.partition_id >= 0) or "them",
            summary,
        )
        return nodes

    def sort_replies(self, server_round: int, replies: list[Message]) -> tuple[list[Message], list[ClientFailure]]:
        """(good replies in partition order, failures)."""
        good, failures = [], []
        sent_to = {s.metadata.message_id: s.metadata.dst_node_id for s in self.sent if s.metadata.message_id}
        for m in replies:
            if m.has_error():  # Flower's own error: the ClientApp process or actor died, a lost SuperNode (the
                # SuperLink answers for it: src_node_id is then the SuperLink's), or a timeout
                node = sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                failures.append(
                    ClientFailure(
                        self.node_partitions.get(node, -1),
                        server_round,
                        f"Flower error on node {node}: {one_line(m.error.reason)}",
                        traceback=str(m.error.reason),
                    )
                )
            elif P.ERROR in m.content.config_records:  # the ClientApp caught its own error
                failures.append(ClientFailure.from_record(m.content.config_records[P.ERROR]))
            else:
                self.node_partitions[m.metadata.src_node_id] = partition_of(m)
                problem = self.decode_reply(m)
                secure = P.ARRAYS not in m.content.array_records  # SecAgg+: no weights; the client checked them
                bad = [] if problem or secure else nonfinite_keys(m.content[P.ARRAYS], self.layout)
                if problem:
                    failures.append(ClientFailure(partition_of(m), server_round, problem))
                elif bad:
                    failures.append(
                        ClientFailure(
                            partition_of(m),
                            server_round,
                            f"returned non-finite weights ({len(bad)} arrays, e.g. {bad[0]})",
                        )
                    )
                else:
                    good.append(m)
        failures += [f for f in self.absent if f.partition_id not in {partition_of(m) for m in good}]
        seen = {partition_of(m) for m in good} | {f.partition_id for f in failures}
        for pid in sorted(set(range(self.num_clients)) - seen):
            if not any(f.partition_id < 0 for f in failures):
                failures.append(
                    ClientFailure(pid, server_round, "no reply (timed out, or partition ids are misconfigured)")
                )
        good.sort(key=partition_of)
        return good, sorted(failures, key=lambda f: f.partition_id)

    def decode_reply(self, reply: Message) -> str:
        """Check a reply's weights against the layout sent and turn them into what is averaged (float32 flat
        arrays); returns "" or what is wrong, in one line."""
        if self.layout is None or not self.decodes_replies:
            return ""
        digest = reply.content.config_records[P.INFO].get(P.LAYOUT_DIGEST, "")
        if digest != self.layout.digest():
            return (
                f"returned weights of another layout (digest {digest or 'missing'}, sent "
                f"{self.layout.digest()}): a different model or app version on that node"
            )
        if P.ARRAYS not in reply.content.array_records:  # (SecAgg+)
            return ""
        if self.in_wire_dtypes(reply.content[P.ARRAYS]) and self.layout.transport == "fp32":
            return ""  # averaged as they are (read from their metadata: 286 MB of the paper UNet not decoded here)
        try:
            arrays = decode(numpy_arrays(reply.content[P.ARRAYS]), self.layout)
        except ValueError as e:
            return f"returned unreadable weights: {e}"
        if self.layout.transport != "fp32":
            reply.content = RecordDict({**reply.content, P.ARRAYS: as_record(arrays)})
        return ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's API: (arrays, metrics), the metrics those `aggregate_round` computed."""
        arrays, round_replies = self.aggregate_round(server_round, replies)
        return arrays, MetricRecord(round_replies.metrics)

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, RoundReplies]:
        """The round's new global arrays (None: the strategy aggregated nothing) and its sorted replies: the
        ServerApp's call, in place of Flower's aggregate_train."""
        round_replies = self.check_replies(server_round, replies)
        arrays, _ = super().aggregate_train(server_round, round_replies.good)  # (metrics: see metrics_of_the_mixin)
        return arrays, round_replies

    def check_replies(self, server_round: int, replies: Iterable[Message]) -> RoundReplies:
        """The replies sorted out, after the failure policy (ClientRoundError when it stops the round)."""
        good, failures = self.sort_replies(server_round, list(replies))
        if failures and self.failure_policy == "fail":
            raise ClientRoundError(failures)
        if len(good) < self.min_clients:
            raise ClientRoundError(
                failures,
                f"; only {len(good)} of {self.num_clients} clients replied, "
                f"min-clients-fraction needs {self.min_clients}",
            )
        clients = [client_round(m.content) for m in good]
        return RoundReplies(good, failures, clients, round_metrics(clients))

    def aggregate_secure(
        self, server_round: int, replies: list[Message], sent: list[Message], mean: ArrayRecord | None
    ) -> tuple[ArrayRecord | None, RoundReplies]:
        """SecAgg+ (secure_aggregation.py): `replies` hold metrics but no weights, `sent` are the train messages the
        protocol pushed, `mean` is the protocol's shard-size weighted mean of the good replies' weights (None: the
        protocol stopped; then no arrays either). The strategy's rule runs on that mean as on one reply of weight 1
        (FedAvg returns it unchanged; FedAdam, FedAvgM, FedYogi take their step from it)."""
        self.sent = sent
        round_replies = self.check_replies(server_round, replies)
        if mean is None:
            return None, round_replies
        good = round_replies.good
        one = Message(
            RecordDict(
                {
                    P.ARRAYS: mean,
                    P.METRICS: MetricRecord({**good[0].content[P.METRICS], "num-examples": 1}),
                    P.INFO: good[0].content[P.INFO],
                }
            ),
            good[0].metadata.src_node_id,
            MessageType.TRAIN,
        )
        arrays, _ = super().aggregate_train(server_round, [one])
        return arrays, round_replies
