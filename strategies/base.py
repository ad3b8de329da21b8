"""What every strategy of this app adds on top of Flower's own strategy classes.

Mixed in front of a Flower strategy (e.g. `class IET(AppStrategyMixin, FedAvg)`), it

- sends the run's settings to the clients with every round (run dir, run token, K, and whether
  clients start fresh state), through `configure_train`;
- fails the run if any client reply is an error or missing (Flower would silently average the
  rest and report the run as completed);
- sorts the replies by partition id before aggregating, so float sums, and hence the final
  weights, are the same in every run with the same seed and config;
- keeps a per-round summary (loss, kept/skipped counts, skip rate per client and overall,
  per-image skip counts by global image id) for the ServerApp to log and write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

INFO_KEY = "info"  # ConfigRecord in each train reply: partition id, image ids, per-image skip counts


class ClientRoundError(RuntimeError):
    """A client failed (or did not reply) in a round; the run stops."""


@dataclass
class ClientRound:
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

    @property
    def skip_rate(self) -> float:
        total = self.kept + self.skipped
        return self.skipped / total if total else 0.0

    @classmethod
    def from_content(cls, content: RecordDict) -> "ClientRound":
        metrics = next(iter(content.metric_records.values()))
        info = content.config_records[INFO_KEY]
        return cls(partition_id=int(info["partition-id"]), num_examples=int(metrics["num-examples"]),
                   loss=float(metrics["loss"]), kept=int(metrics["kept"]), skipped=int(metrics["skipped"]),
                   steps=int(metrics["steps"]), seconds=float(metrics["seconds"]),
                   client_step=int(metrics["client-step"]), image_ids=np.asarray(info["image-ids"], np.int64),
                   skip_counts=np.asarray(info["skip-counts"], np.int64))


def round_metrics(clients: list[ClientRound]) -> dict:
    """Loss (size-weighted), overall and per-client skip rates of one round, clients in partition order."""
    n = sum(c.num_examples for c in clients)
    kept = sum(c.kept for c in clients)
    skipped = sum(c.skipped for c in clients)
    return {"loss": sum(c.loss * c.num_examples for c in clients) / n,
            "skip-rate": skipped / max(kept + skipped, 1), "kept": kept, "skipped": skipped,
            "steps": sum(c.steps for c in clients), "client-seconds-max": max(c.seconds for c in clients),
            "skip-rate-per-client": [c.skip_rate for c in clients],
            "loss-per-client": [c.loss for c in clients]}


def aggregate_client_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's `train_metrics_aggr_fn` hook: our round metrics instead of a blind weighted mean."""
    return MetricRecord(round_metrics([ClientRound.from_content(c) for c in contents]))


def partition_of(reply: Message) -> int:
    return int(reply.content.config_records[INFO_KEY]["partition-id"])


class AppStrategyMixin:
    """Put in front of a Flower strategy class. Call `setup_app(...)` before `start()`."""

    client_flags: dict = {}  # extra round config for the clients, e.g. {"reset-optimizer": True}

    def setup_app(self, num_clients: int, round_config: dict) -> None:
        self.num_clients = num_clients
        self.round_config = dict(round_config)
        self.last_round: list[ClientRound] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        for key, value in {**self.round_config, **self.client_flags}.items():
            config[key] = value
        config["fresh-state"] = server_round == 1
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        if errors:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors)
            raise ClientRoundError(f"round {server_round}: {len(errors)} client(s) failed: {reasons}")
        got = sorted(partition_of(m) for m in replies)
        if got != list(range(self.num_clients)):
            raise ClientRoundError(f"round {server_round}: expected replies from partitions 0..{self.num_clients - 1}, "
                                   f"got {got} (a client timed out or partition ids are misconfigured)")
        replies.sort(key=partition_of)
        self.last_round = [ClientRound.from_content(m.content) for m in replies]
        return super().aggregate_train(server_round, replies)
