"""The Flower ClientApp: one shard, one client, local training with Anti-Gradient Control.

Per train message: build the UNet, load the global raw and EMA weights, restore this client's
persistent state (Adam, step counter / warmup position, AGC memory bank, skip counts, TAA strengths)
from the round the server names (`state-rounds`), train E local epochs, save the state as this
round's version, reply with raw + EMA weights and the round's summary.

The state lives in per-round files, not in `context.state`: a ClientApp object is not kept between
rounds, a simulated client moves between Ray actors, and large state in `context.state` travels with
every message. The files are `<run dir>/client-state/p<P>/round_<R>.pt`, or
`<state-dir>/<run name>/p<P>/round_<R>.pt` when the SuperNode's node config (or the run config's
`client-state-dir`) names a local state directory. A round's version is written beside the one it
started from, which is kept until the next round: a run killed in the middle of a round, or a round
that the server does not count (a failed client under `client-failures = "tolerate"`), starts again
from the state the server last counted, so no client's steps are applied twice.

A process that serves clients round after round keeps its UNet pair and the states it saved in memory
(fl_ietagc/training/client_memory.py, bounded by `client-memory-mb`): the next round of the same partition starts from
the in-memory copy when it is exactly the version the server names. The file is still written every round, in
the background while the reply is built, and the reply waits for it: a round the server commits always has its
client states on disk.

Any error is caught and sent back as an `error` record (partition, round, step, one line, traceback),
so the server can name the partition instead of a Flower node id.

Two mods wrap `train` (each passes a message on unless the run uses it): SecAgg+ (secure_aggregation.py:
Flower's secaggplus_mod masks the reply's weights) and client-side clipping (privacy.py: Flower's
fixedclipping_mod clips the update first).
"""

from __future__ import annotations

import time
import traceback
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fl_ietagc.data.shards import shard_inputs, shards_for_config
from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.protocol import ClientFailure, ClientRound, one_line
from fl_ietagc.federation.wire import Layout, array_view, decode, encode, flatten, npy_fields, unflatten
from fl_ietagc.runs import phases
from fl_ietagc.runs.checkpoints import BackgroundWrite, pack_weights, unpack_weights
from fl_ietagc.runs.faults import fault_point
from fl_ietagc.runs.progress import StepProgress
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import RunConfig, parse_config
from fl_ietagc.training.client_memory import MEMORY
from fl_ietagc.training.lora import trained_state
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.run_model import build_for_config
from fl_ietagc.training.trainer import LocalTrainer, NonFiniteError, TrainState, client_seed, pick_device, ray_gpu_ids

from .privacy import client_clipping_mod
from .secure_aggregation import secure_aggregation_mod

# clipping acts on the update in the clear, then SecAgg+ masks it
app = ClientApp(mods=[secure_aggregation_mod, client_clipping_mod])

STATE_WRITE_TIMEOUT_S = 600.0  # a client-state write that takes longer fails the round, named


@app.train()
def train(msg: Message, context: Context) -> Message:
    received_at = time.time()
    conf = msg.content["config"]
    server_round = int(conf.get(P.ROUND, -1))
    partition_id = -1
    try:
        cfg = parse_config(context.run_config)
        partition_id = _partition(context, int(conf[P.NUM_CLIENTS]))
        fault_point(f"client-train-p{partition_id}", server_round)
        content = train_round(cfg, msg.content, context, partition_id, server_round)
        content[P.INFO][P.RECEIVED_AT] = received_at
        content[P.INFO][P.REPLIED_AT] = time.time()
    except Exception as e:  # reported to the server by partition; the traceback goes to the run's logs
        if isinstance(e, NonFiniteError):
            error, step = f"{e.what} (lr {e.lr:g})", e.step
        else:
            error, step = f"{type(e).__name__}: {one_line(str(e))}", -1
        failure = ClientFailure(partition_id, server_round, error, step, traceback.format_exc())
        content = RecordDict({P.ERROR: ConfigRecord(failure.to_record())})
    return Message(content=content, reply_to=msg)


def train_round(
    cfg: RunConfig, instruction: RecordDict, context: Context, partition_id: int, server_round: int
) -> RecordDict:
    conf = instruction["config"]
    num_clients = int(conf[P.NUM_CLIENTS])
    shard = _shard(cfg, conf, partition_id, num_clients)
    inputs, cond = shard_inputs(cfg, shard)
    device = pick_device(cfg.device, ray_gpu_ids())  # a simulated client without a GPU share: CPU

    t0 = time.perf_counter()
    layout = Layout.from_record(instruction[P.LAYOUT])
    # views of the message's bytes, only read: load_weights copies them into the model
    received = {k: array_view(a) for k, a in instruction[P.ARRAYS].items()}
    net_sd, ema_sd = unpack_weights(unflatten(decode(received, layout), layout, borrowed=True))
    phases.since("client: unpack weights", t0)
    budget = cfg.client_memory_mb * 2**20
    with phases.timed("client: build model, load weights"):
        model, ema = MEMORY.models(_model_key(cfg, device), lambda: build_for_config(cfg), budget)
        load_weights(model, net_sd, "global raw weights")
        load_weights(ema, ema_sd, "global EMA weights")
    del net_sd, ema_sd

    run = RunDir(str(conf[P.RUN_DIR]))
    state_root = context.node_config.get("state-dir") or cfg.client_state_dir or None
    start_round = int(list(conf[P.STATE_ROUNDS])[partition_id])
    token = str(conf[P.RUN_TOKEN])
    held = (token, str(run.client_state_dir(partition_id, state_root)), partition_id)
    with phases.timed("client: state load"):
        state = _restore_state(
            run,
            partition_id,
            start_round,
            state_root,
            shard,
            token,
            device,
            redistributed=P.shard_key(partition_id) in conf,
            held=held,
        )
    if bool(conf.get(P.RESET_OPTIMIZER, False)):  # plain FedAvg: a new Adam every round
        state.optimizer = None

    with phases.timed("client: trainer set-up (to device, Adam state)"):
        trainer = LocalTrainer(cfg, model, ema, inputs, state, device, cond=cond)
    stats = trainer.run(
        cfg.local_epochs,
        client_seed(cfg.seed, partition_id, server_round),
        prox_mu=float(conf.get(P.PROXIMAL_MU, 0.0)),  # set by the fedprox strategy
        progress=lambda total: StepProgress(
            f"client p{partition_id} round {server_round}", total, cfg.batch_size, write=_log_info
        ),
    )
    # the state file is written (and fsync'ed) while the reply is built, and waited for before replying: the
    # server commits this round only after the reply, so a committed round's client states are always durable
    path = run.client_state(partition_id, server_round, state_root)
    write = BackgroundWrite(lambda: state.save(path), f"client state {path}")

    summary = ClientRound(
        partition_id=partition_id,
        num_examples=len(shard),
        loss=stats.mean_loss,
        kept=stats.kept,
        skipped=stats.skipped,
        steps=stats.steps,
        seconds=stats.seconds,
        client_step=state.step,
        image_ids=shard,
        skip_counts=stats.skip_counts.numpy(),
    )
    metrics, info = summary.to_records()
    info[P.LAYOUT_DIGEST] = layout.digest()
    t0 = time.perf_counter()
    packed = pack_weights(trained_state(trainer.model), trained_state(trainer.ema))
    flat = encode(flatten(packed, layout, MEMORY.buffers(_model_key(cfg, device))), layout)
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(**npy_fields(a)) for k, a in flat.items()}),
            P.METRICS: MetricRecord(metrics),
            P.INFO: ConfigRecord(info),
        }
    )
    phases.since("client: reply serialization", t0)
    with phases.timed("client: state save (fsync), after the reply was built"):
        write.wait(STATE_WRITE_TIMEOUT_S)
        keep = conf.get(P.KEEP_STATES_FROM)  # (an older server's instruction has none: its commits were synchronous)
        _prune_states(
            run, partition_id, min(start_round, int(list(keep)[partition_id])) if keep else start_round, state_root
        )
    MEMORY.keep(held, server_round, state, path, budget)
    for p in model.parameters():
        p.grad = None  # (the kept UNet holds no gradients between rounds)
    del trainer, model, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()  # long-lived Ray actors would otherwise keep the cached VRAM
    return content


def _log_info(line: str) -> None:
    """Through Flower's logger: in simulation Ray forwards it to the driver's output (prefixed with the actor),
    in deployment it is in the SuperNode's log."""
    log(INFO, "%s", line)


def _model_key(cfg: RunConfig, device: torch.device) -> tuple:
    """What decides the UNet a run builds (build_for_config), and where it lives."""
    return (
        cfg.model_type,
        cfg.pretrained_dir,
        cfg.preset,
        cfg.dataset,
        cfg.data_root,
        cfg.image_size,
        cfg.gradient_checkpointing,
        cfg.channels_last,
        str(device),
    )


def _partition(context: Context, num_clients: int) -> int:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode has no partition-id / num-partitions in its node config "
            '(start it with --node-config "partition-id=I num-partitions=K")'
        )
    pid, k = int(node["partition-id"]), int(node["num-partitions"])
    if k != num_clients:
        raise ValueError(f"node config num-partitions = {k}, but the run has num-clients = {num_clients}")
    if not 0 <= pid < k:
        raise ValueError(f"node config partition-id = {pid} is outside 0..{k - 1}")
    return pid


def _restore_state(
    run: RunDir,
    partition_id: int,
    start_round: int,
    state_root,
    shard,
    token: str,
    device: torch.device,
    redistributed: bool,
    held: tuple | None = None,
) -> TrainState:
    """The state of round `start_round`: fresh for round 0, this process's own copy when it holds exactly that
    version (client_memory.py), else the file."""
    if start_round == 0:
        return TrainState.fresh(shard, token)
    path = run.client_state(partition_id, start_round, state_root)
    state = MEMORY.state(held, start_round, path) if held is not None else None
    if state is not None:
        return state.check(path, token, shard, allow_remap=redistributed)
    if not path.exists():
        raise RuntimeError(
            f"client state {path} is missing; the client's optimizer, warmup position and memory "
            f"bank would be lost. Is client-state-dir on a disk this client can reach in every round?"
        )
    return TrainState.load(path, token, shard, device, allow_remap=redistributed)


def _prune_states(run: RunDir, partition_id: int, keep_from: int, state_root) -> None:
    """Keep the states from round `keep_from` on: the one the last durable commit resumes from, the one this round
    started from and the new one; older versions are no longer needed."""
    for path in run.client_state_dir(partition_id, state_root).glob("round_*.pt"):
        if int(path.stem.split("_")[1]) < keep_from:
            path.unlink(missing_ok=True)


def _shard(cfg, conf, partition_id: int, num_clients: int) -> np.ndarray:
    """This client's training-set ids: as the server last redistributed them (RET), else from the config."""
    key = P.shard_key(partition_id)
    if key in conf:
        return np.asarray(conf[key], dtype=np.int64)
    return shards_for_config(cfg, num_clients)[partition_id]
