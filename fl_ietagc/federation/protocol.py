"""The messages between the ServerApp and the ClientApps: their keys, and the round summary.

Plain Python (no Flower import), so the core stays usable without Flower: the apps put these keys
into Flower's ConfigRecord / MetricRecord.

Train instruction (`config` ConfigRecord; Flower adds `server-round`):
    run-dir, run-token, num-clients   where the run lives and which run this is
    state-rounds                      list, per partition: the round whose saved client state to start from
                                      (0 = a fresh state); a failed client's entry stays behind
    keep-states-from                  list, per partition: the state round of the last durable commit (a
                                      commit is written while the next round trains); older states may go
    shard-<P>                         RET: partition P's current training-set ids (only after a redistribution)
    reset-optimizer                   plain FedAvg: a new Adam every round
    proximal-mu                       FedProx (set by Flower's FedProx strategy)

Train instruction weights: `arrays` holds a few flat arrays (`net`, `ema`: raw and EMA weights, fl_ietagc/federation/wire.py)
and `layout` (ConfigRecord) their tensors' names, shapes, dtypes and the transport dtype.

Reply: `arrays` (the same flat groups), `metrics` (MetricRecord) and `info` (ConfigRecord: partition-id,
image-ids, skip-counts, layout-digest, received-at / replied-at, and where the round ran: pid, host, ray-node);
or, when the client failed, only `error` (ConfigRecord: partition-id, round, step, error, traceback).

Under SecAgg+ (secure-aggregation = "secaggplus") the train instruction also carries Flower's protocol record,
and the reply holds no weights: Flower's legacy `fitres.*` records (their ArrayRecord emptied by Flower's mod),
the masked vector in the protocol's record, and the same `metrics` and `info`.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

import numpy as np

ROUND = "server-round"
RUN_DIR = "run-dir"
RUN_TOKEN = "run-token"
NUM_CLIENTS = "num-clients"
STATE_ROUNDS = "state-rounds"
KEEP_STATES_FROM = "keep-states-from"
RESET_OPTIMIZER = "reset-optimizer"
PROXIMAL_MU = "proximal-mu"
ARRAYS, METRICS, INFO, ERROR = "arrays", "metrics", "info", "error"
LAYOUT = "layout"  # the weights' layout (fl_ietagc/wire.Layout.to_record), beside the flat arrays
LAYOUT_DIGEST = "layout-digest"  # in a reply's info: the layout of the weights it returns
RECEIVED_AT, REPLIED_AT = "received-at", "replied-at"  # in a reply's info: the client's wall clock when its
# handler started and when the reply was ready (the server splits a round's time into transport and training)


def shard_key(partition_id: int) -> str:
    return f"shard-{partition_id}"


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside a Ray worker). Never imports Ray itself."""
    ray = sys.modules.get("ray")
    try:
        return str(ray.get_runtime_context().get_node_id()) if ray is not None and ray.is_initialized() else ""
    except Exception:  # an unusual Ray state is not worth failing a round for
        return ""


@dataclass
class ClientRound:
    """One client's summary of one round (the reply's metrics and info records)."""

    partition_id: int
    num_examples: int
    loss: float
    kept: int
    skipped: int
    steps: int
    seconds: float
    client_step: int  # the client's optimizer step counter after this round (persists across rounds)
    image_ids: np.ndarray
    skip_counts: np.ndarray
    # where the round ran: the process (a long-lived ClientApp process serves every round with one pid), the
    # machine, and the Ray node in simulation. Not training results: nothing compares or aggregates them.
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    ray_node: str = field(default_factory=ray_node_id)

    @property
    def skip_rate(self) -> float:
        total = self.kept + self.skipped
        return self.skipped / total if total else 0.0

    def to_records(self) -> tuple[dict, dict]:
        """(metrics, info) for the reply."""
        metrics = {
            "num-examples": self.num_examples,
            "loss": self.loss,
            "kept": self.kept,
            "skipped": self.skipped,
            "steps": self.steps,
            "seconds": self.seconds,
            "client-step": self.client_step,
        }
        info = {
            "partition-id": self.partition_id,
            "image-ids": self.image_ids.tolist(),
            "skip-counts": self.skip_counts.tolist(),
            "pid": self.pid,
            "host": self.host,
            "ray-node": self.ray_node,
        }
        return metrics, info

    @classmethod
    def from_records(cls, metrics, info) -> ClientRound:
        return cls(
            partition_id=int(info["partition-id"]),
            num_examples=int(metrics["num-examples"]),
            loss=float(metrics["loss"]),
            kept=int(metrics["kept"]),
            skipped=int(metrics["skipped"]),
            steps=int(metrics["steps"]),
            seconds=float(metrics["seconds"]),
            client_step=int(metrics["client-step"]),
            image_ids=np.asarray(info["image-ids"], np.int64),
            skip_counts=np.asarray(info["skip-counts"], np.int64),
            pid=int(info.get("pid", -1)),
            host=str(info.get("host", "")),
            ray_node=str(info.get("ray-node", "")),
        )

    def to_json(self) -> dict:
        return {
            "partition-id": self.partition_id,
            "num-examples": self.num_examples,
            "loss": self.loss,
            "kept": self.kept,
            "skipped": self.skipped,
            "skip-rate": self.skip_rate,
            "steps": self.steps,
            "client-step": self.client_step,
            "seconds": self.seconds,
            "pid": self.pid,
            "host": self.host,
            "ray-node": self.ray_node,
        }


@dataclass
class ClientFailure:
    """A client that failed in a round: what the user reads (one line) and the traceback (a log file)."""

    partition_id: int  # -1 when unknown (the client died before it could say)
    server_round: int
    error: str  # one line
    step: int = -1  # the client's optimizer step, when the failure happened while training
    traceback: str = ""

    def line(self) -> str:
        who = f"partition {self.partition_id}" if self.partition_id >= 0 else "a client (partition unknown)"
        where = f", step {self.step}" if self.step >= 0 else ""
        return f"{who}, round {self.server_round}{where}: {self.error}"

    def to_record(self) -> dict:
        return {
            "partition-id": self.partition_id,
            "round": self.server_round,
            "error": self.error,
            "step": self.step,
            "traceback": self.traceback,
        }

    @classmethod
    def from_record(cls, rec) -> ClientFailure:
        return cls(
            partition_id=int(rec["partition-id"]),
            server_round=int(rec["round"]),
            error=str(rec["error"]),
            step=int(rec["step"]),
            traceback=str(rec["traceback"]),
        )


def one_line(text: str) -> str:
    """The last non-empty line of an error text (where Python puts the exception), at most 500 characters."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


def round_metrics(clients: list[ClientRound]) -> dict:
    """Loss (size-weighted), overall and per-client skip rates of one round, clients in partition order."""
    n = sum(c.num_examples for c in clients)
    kept = sum(c.kept for c in clients)
    skipped = sum(c.skipped for c in clients)
    return {
        "loss": sum(c.loss * c.num_examples for c in clients) / n,
        "skip-rate": skipped / max(kept + skipped, 1),
        "kept": kept,
        "skipped": skipped,
        "steps": sum(c.steps for c in clients),
        "client-seconds-max": max(c.seconds for c in clients),
        "skip-rate-per-client": [c.skip_rate for c in clients],
        "loss-per-client": [c.loss for c in clients],
    }
