"""The Flower ClientApp: one shard, one client, local training with Anti-Gradient Control.

Per train message: build the UNet, load the global raw and EMA weights, restore this client's
persistent state (Adam, step counter / warmup position, AGC memory bank, skip counts) from its
state file, train E local epochs, save the state, reply with raw + EMA weights and round stats.

The state lives in a per-run, per-partition file, not in `context.state`: a ClientApp object is
not kept between rounds, a simulated client moves between Ray actors, and large state in
`context.state` travels with every message (and was seen lost on SuperNodes). The file path is
`<run dir>/client-state/p<partition>.pt`, or `<state-dir>/<run name>/p<partition>.pt` when the
SuperNode's node config (or the run config's `client-state-dir`) names a local state directory.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_ietagc.checkpoints import RunDir, load_client_state, pack_weights, save_client_state, unpack_weights
from fl_ietagc.config import parse_config
from fl_ietagc.data import load_splits
from fl_ietagc.models import build_for_config, load_weights
from fl_ietagc.shards import shards_for_config
from fl_ietagc.trainer import LocalTrainer, TrainState, client_seed, pick_device

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse_config(context.run_config)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    partition_id, num_clients = _partition(context, int(conf["num-clients"]))

    shard = _shard(cfg, conf, partition_id, num_clients)
    images = load_splits(cfg).train.images[torch.from_numpy(shard)]
    device = pick_device(cfg.device)

    net_sd, ema_sd = unpack_weights(msg.content["arrays"].to_torch_state_dict())
    model = build_for_config(cfg)
    load_weights(model, net_sd, "global raw weights")
    ema = copy.deepcopy(model)
    load_weights(ema, ema_sd, "global EMA weights")

    run = RunDir(str(conf["run-dir"]))
    state_root = context.node_config.get("state-dir") or cfg.client_state_dir or None
    state_path = run.client_state(partition_id, state_root)
    state = _restore_state(state_path, shard, str(conf["run-token"]), bool(conf["fresh-state"]), device,
                           redistributed=f"shard-{partition_id}" in conf)
    if bool(conf.get("reset-optimizer", False)):  # plain FedAvg: a new Adam every round
        state.optimizer = None

    trainer = LocalTrainer(cfg, model, ema, images, state, device)
    stats = trainer.run(cfg.local_epochs, client_seed(cfg.seed, partition_id, server_round),
                        prox_mu=float(conf.get("proximal-mu", 0.0)))  # set by the fedprox strategy
    save_client_state(state_path, state.to_dict())

    reply = RecordDict({
        "arrays": ArrayRecord(pack_weights(trainer.model.state_dict(), trainer.ema.state_dict())),
        "metrics": MetricRecord({"num-examples": len(shard), "loss": stats.mean_loss, "kept": stats.kept,
                                 "skipped": stats.skipped, "steps": stats.steps, "seconds": stats.seconds,
                                 "client-step": state.step}),
        "info": ConfigRecord({"partition-id": partition_id, "image-ids": shard.tolist(),
                              "skip-counts": stats.skip_counts.tolist()}),
    })
    del trainer, model, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()  # long-lived Ray actors would otherwise keep the cached VRAM
    return Message(content=reply, reply_to=msg)


def _partition(context: Context, num_clients: int) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this SuperNode has no partition-id / num-partitions in its node config "
                         "(start it with --node-config \"partition-id=I num-partitions=K\")")
    pid, k = int(node["partition-id"]), int(node["num-partitions"])
    if k != num_clients:
        raise ValueError(f"node config num-partitions = {k}, but the run has num-clients = {num_clients}")
    if not 0 <= pid < k:
        raise ValueError(f"node config partition-id = {pid} is outside 0..{k - 1}")
    return pid, k


def _restore_state(path, shard, token: str, fresh: bool, device: torch.device,
                   redistributed: bool = False) -> TrainState:
    if fresh:
        return TrainState.fresh(shard, token)
    if not path.exists():
        raise RuntimeError(f"client state {path} is missing after round 1; the client's optimizer, warmup "
                           f"position and memory bank would be lost. Is client-state-dir on a disk this "
                           f"client can reach in every round?")
    state = TrainState.from_dict(load_client_state(path, device))
    if state.token != token:
        raise RuntimeError(f"client state {path} belongs to another run (token {state.token!r} != {token!r})")
    state.image_ids, state.skip_counts = state.image_ids.cpu(), state.skip_counts.cpu()
    state.aug_strength = state.aug_strength.cpu()
    if not torch.equal(state.image_ids, torch.as_tensor(shard, dtype=torch.long)):
        if not redistributed:
            raise RuntimeError(f"client state {path} was made for a different shard")
        state.remap(shard)  # RET moved images between shards: per-image records follow the images
    return state


def _shard(cfg, conf, partition_id: int, num_clients: int) -> np.ndarray:
    """This client's training-set ids: as the server last redistributed them (RET), else from the config."""
    key = f"shard-{partition_id}"
    if key in conf:
        return np.asarray(conf[key], dtype=np.int64)
    return shards_for_config(cfg, num_clients)[partition_id]
