"""IET-AGC in one process, without Flower: K clients trained one after another, then averaged.

This is the reference implementation's structure (clients sequential on one device). Given the
same config it performs exactly the training the Flower app performs (same shards, same seeds,
same state carried across rounds, same averaging arithmetic as Flower's FedAvg, in partition
order), so it serves as the oracle for the app's end-to-end test and as the "plain loop" against
which the simulation's overhead is measured.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fl_ietagc.data.datasets import load_splits
from fl_ietagc.data.shards import shard_inputs, shards_for_config
from fl_ietagc.federation.protocol import ClientRound, round_metrics
from fl_ietagc.runs.checkpoints import pack_weights, unpack_weights
from fl_ietagc.runs.lifecycle import round_record, run_lifecycle
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import RunConfig
from fl_ietagc.training import ret
from fl_ietagc.training.lora import trained_state
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.run_model import build_for_config, initial_weights
from fl_ietagc.training.trainer import LocalTrainer, RoundStats, TrainState, client_seed, pick_device


def weighted_average(weighted: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """sum_i (w_i / sum w) * state_i, accumulated in list order in float32, as Flower's FedAvg does."""
    total = sum(w for w, _ in weighted)
    out: dict[str, torch.Tensor] = {}
    for w, state in weighted:
        factor = w / total
        for k, v in state.items():
            term = v.detach().cpu().float() * factor
            out[k] = term if k not in out else out[k].add_(term)
    return out


@dataclass
class LoopResult:
    net: dict
    ema: dict
    states: list[TrainState]
    rounds: list[list[RoundStats]] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_iet_loop(
    cfg: RunConfig,
    num_clients: int,
    device: torch.device | None = None,
    run: RunDir | None = None,
    progress=None,
    on_round=None,
) -> LoopResult:
    """K clients one after another, then the size-weighted average, for R rounds; RET (`ret-every`) moves images
    between shards as the ServerApp does. With `run`, the rounds are committed to that run directory as the
    ServerApp commits them, and a run directory that holds a resume point (`RunDir.reopen`) continues from it.
    `progress(round, record)` is called after every round; `on_round(round, [(shard ids, client raw weights)],
    averaged raw weights)` after every average, before RET moves images (read-only: the small-data study's
    per-client copy rates)."""
    device = device or pick_device(cfg.device)
    n_train = len(load_splits(cfg).train)
    start = 0
    if run is not None and run.resume_path.is_file():
        blob = run.read_resume()
        start, g_net, g_ema = int(blob["round"]), blob["net"], blob["ema"]
        states = [TrainState.from_dict(d) for d in blob["state"]["clients"]]
        skip_period = blob["state"].get("skip-period", torch.zeros(n_train, dtype=torch.long)).numpy().copy()
    else:
        g_net, g_ema = initial_weights(cfg)
        states = [TrainState.fresh(s) for s in shards_for_config(cfg, num_clients)]
        skip_period = np.zeros(n_train, np.int64)
        if run is not None:
            run.begin(
                cfg.to_dict(),
                [s.image_ids.numpy() for s in states],
                cfg.num_server_rounds,
                kind="federated",
                engine="iet-loop",
                num_clients=num_clients,
            )
            run.write_resume(0, g_net, g_ema, _loop_state(states, skip_period))
    shards = [s.image_ids.numpy() for s in states]  # current shards: RET may have moved images
    result = LoopResult(net={}, ema={}, states=states)
    t0 = time.perf_counter()
    with run_lifecycle(run, start, cfg.num_server_rounds) if run is not None else contextlib.nullcontext():
        for server_round in range(start + 1, cfg.num_server_rounds + 1):
            # Train the K clients one after another, then average.
            t_round = time.perf_counter()
            replies, stats = [], []
            for pid, shard in enumerate(shards):
                model = build_for_config(cfg)
                load_weights(model, g_net, "global raw weights")
                ema = copy.deepcopy(model)
                load_weights(ema, g_ema, "global EMA weights")
                inputs, cond = shard_inputs(cfg, shard)
                trainer = LocalTrainer(cfg, model, ema, inputs, states[pid], device, cond=cond)
                stats.append(trainer.run(cfg.local_epochs, client_seed(cfg.seed, pid, server_round)))
                replies.append((len(shard), pack_weights(trained_state(trainer.model), trained_state(trainer.ema))))
            g_net, g_ema = unpack_weights(weighted_average(replies))
            if on_round is not None:
                on_round(server_round, [(s, unpack_weights(w)[0]) for s, (_, w) in zip(shards, replies)], g_net)
            result.rounds.append(stats)
            result.round_seconds.append(time.perf_counter() - t_round)
            clients = [
                ClientRound(
                    pid,
                    len(shard),
                    st.mean_loss,
                    st.kept,
                    st.skipped,
                    st.steps,
                    st.seconds,
                    states[pid].step,
                    shard,
                    st.skip_counts.numpy(),
                )
                for pid, (shard, st) in enumerate(zip(shards, stats))
            ]
            # RET, as the ServerApp: next round's shards; each client's per-image records follow.
            for c in clients:
                np.add.at(skip_period, c.image_ids, c.skip_counts)
            new = ret.after_round(cfg, shards, skip_period, server_round)
            moved = 0
            if new is not None:
                moved = ret.moved_count(shards, new)
                shards, skip_period[:] = new, 0
                for state, shard in zip(states, shards):
                    state.remap(shard)
            record = round_record(
                server_round, time.perf_counter() - t0, round_metrics(clients), ret_moved=moved, clients=clients
            )
            # Commit the round.
            if run is not None:
                if new is not None:
                    run.write_shards(shards)
                skips = np.zeros(n_train, np.int64)
                for s in states:
                    np.add.at(skips, s.image_ids.numpy(), s.skip_counts.numpy())
                run.commit_round(
                    server_round,
                    record,
                    net=g_net,
                    ema=g_ema,
                    state=_loop_state(states, skip_period),
                    config=cfg.to_dict(),
                    skip_counts=skips,
                    num_rounds=cfg.num_server_rounds,
                    keep_checkpoint=server_round == cfg.num_server_rounds or server_round % cfg.checkpoint_every == 0,
                )
            if progress is not None:
                progress(server_round, record)
        result.net, result.ema, result.seconds = g_net, g_ema, time.perf_counter() - t0
        if run is not None:
            run.finish(g_net, g_ema, cfg.num_server_rounds, cfg.to_dict())
            run.mark_completed(cfg.num_server_rounds)
    return result


def _loop_state(states: list[TrainState], skip_period: np.ndarray) -> dict:
    return {"clients": [s.to_dict() for s in states], "skip-period": torch.from_numpy(skip_period.copy())}
