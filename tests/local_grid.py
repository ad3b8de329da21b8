"""The app without Ray: a Grid that hands each message to the real ClientApp `train` in this process.

Used by the tests to run the real ServerApp and ClientApp (with real Flower Message / Context objects)
in seconds, and by the kill/resume tests as a subprocess:

    python -m tests.local_grid K '{"num-server-rounds": 3, ...}'     # FL_IETAGC_FAULT=... to kill it
"""

from __future__ import annotations

import json
import sys

import torch
from flwr.app import Context, RecordDict


def set_task_identity() -> None:
    """Flower's Message constructor needs a task identity, which a real run sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def wire(message):
    """The message as the other side gets it: through Flower's serialization (each client its own copy)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


class LocalGrid:
    """K SuperNodes (node ids 1000 + P) whose ClientApp runs in this process, one message after another."""

    def __init__(self, k: int, run_config: dict, node_config: dict | None = None):
        self.contexts = {
            1000 + p: Context(
                run_id=1,
                node_id=1000 + p,
                state=RecordDict(),
                node_config={"partition-id": p, "num-partitions": k, **(node_config or {})},
                run_config=dict(run_config),
            )
            for p in range(k)
        }
        self.delivered: list = []  # (round, partition) in order, for the tests
        self.shard_keys: list = []  # (round, partition, the shard lists its instruction holds: RET)
        self.pushed, self.replies = 0, {}  # message ids given so far; replies not pulled yet, by the id they answer

    def get_node_ids(self):
        return sorted(self.contexts)

    def push_messages(self, messages):
        """As a real Grid: give each message its id and deliver it (here: run it now); the replies wait for
        pull_messages (the ServerApp pushes a round's messages, then pulls their replies)."""
        messages = list(messages)
        for m in messages:
            self.pushed += 1
            m.metadata.__dict__["_message_id"] = f"local-{self.pushed}"
        for r in self.send_and_receive(messages):
            self.replies[r.metadata.reply_to_message_id] = r
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        from clients.client_app import app  # (with its mods, as Flower calls it)

        replies = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            if "config" in m.content.config_records:  # (not a SecAgg+ key-exchange stage)
                conf = m.content["config"]
                self.delivered.append((int(conf["server-round"]), ctx.node_config["partition-id"]))
                self.shard_keys.append(
                    (
                        int(conf["server-round"]),
                        ctx.node_config["partition-id"],
                        sorted(k for k in conf if k.startswith("shard-")),
                    )
                )
            replies.append(wire(app(wire(m), ctx)))
        return replies


def run_server(run_config: dict, k: int, grid: LocalGrid | None = None) -> LocalGrid:
    """The real ServerApp `main` on a LocalGrid (raises what it raises)."""
    from strategies.server_app import main

    set_task_identity()
    grid = grid or LocalGrid(k, run_config)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    return grid


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_server(json.loads(sys.argv[2]), int(sys.argv[1]))
