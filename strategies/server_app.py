"""The Flower ServerApp: validate, build the initial model, run R rounds, write the run directory.

Order of work: parse and validate the run config (and the data it names) before anything is
trained; create the run directory; initial weights (fresh from the seed, or `init-checkpoint`);
`strategy.start(...)` for R rounds, writing the global raw + EMA weights, the metrics and the skip
counts after every round; at the end, `final.pt` and a grid of samples. Any failure (a client
error included) is written to `status.json` and re-raised, so the run fails visibly.
"""

from __future__ import annotations

import copy
import os
import re
import time
import uuid
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_ietagc.checkpoints import RunDir, load_checkpoint, pack_weights, save_checkpoint, unpack_weights
from fl_ietagc.config import ConfigError, RunConfig, parse_config
from fl_ietagc.data import image_size, load_splits
from fl_ietagc.images import write_sample_grid
from fl_ietagc.models import build_for_config, load_diffusers_unet, load_weights
from fl_ietagc.ret import redistribute
from fl_ietagc.shards import shards_for_config
from fl_ietagc.trainer import pick_device

from .base import round_metrics
from .registry import build_strategy, check_strategy

NODE_WAIT_S = 120

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    check_strategy(cfg.strategy, cfg)
    num_clients = resolve_num_clients(cfg, grid)
    shards = shards_for_config(cfg, num_clients)  # validates the data against K and batch-size
    net, ema = initial_weights(cfg)  # validates init-checkpoint
    run = RunDir.create(cfg.output_dir, cfg.run_name, f"{cfg.dataset}-{cfg.preset}-k{num_clients}")
    log(INFO, "fl-ietagc: run directory %s", run.path)
    try:
        run_federated(grid, cfg, num_clients, shards, run, net, ema)
    except BaseException as exc:
        run.write_failure(exc)
        raise


def resolve_num_clients(cfg: RunConfig, grid: Grid) -> int:
    if cfg.num_clients:
        return cfg.num_clients
    deadline = time.time() + NODE_WAIT_S
    while True:
        nodes = list(grid.get_node_ids())
        if nodes:
            return len(nodes)
        if time.time() > deadline:
            raise ConfigError(f"num-clients = 0: no SuperNode connected within {NODE_WAIT_S} s; "
                              f"start SuperNodes or set num-clients")
        time.sleep(1.0)


def initial_weights(cfg: RunConfig) -> tuple[dict, dict]:
    """Raw and EMA state dicts to start from: fresh from the seed, or init-checkpoint's."""
    torch.manual_seed(cfg.seed)
    net = build_for_config(cfg)
    ema = copy.deepcopy(net)
    source = cfg.init_checkpoint
    if source and not os.path.isfile(source) and (os.path.isdir(source) or _looks_like_hub_id(source)):
        weights = load_diffusers_unet(net, source)  # a diffusers UNet: same weights for raw and EMA
        load_weights(net, weights, f"init-checkpoint {source}")
        load_weights(ema, weights, f"init-checkpoint {source}")
    elif source:
        try:
            blob = load_checkpoint(source)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init-checkpoint = {source!r}: {e}") from e
        load_weights(net, blob["net"], f"init-checkpoint {source} (raw)")
        load_weights(ema, blob["ema"], f"init-checkpoint {source} (EMA)")
    return net.state_dict(), ema.state_dict()


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not os.path.exists(source)


def run_federated(grid: Grid, cfg: RunConfig, num_clients: int, shards: list[np.ndarray], run: RunDir,
                  net: dict, ema: dict) -> None:
    splits = load_splits(cfg)
    n_params = sum(v.numel() for v in net.values())
    run.write_config(cfg.to_dict(), kind="federated", num_clients=num_clients, num_parameters=n_params,
                     image_size=image_size(cfg), channels=splits.train.channels, num_train_images=len(splits.train))
    run.write_shards(shards)
    run.write_status("running", round=0, num_rounds=cfg.num_server_rounds)
    skip_totals = np.zeros(len(splits.train), np.int64)
    skip_period = np.zeros(len(splits.train), np.int64)  # since the last RET redistribution
    log(INFO, "fl-ietagc: %d clients, shard sizes %s, %s preset (%s parameters), %d rounds x %d local epochs",
        num_clients, [len(s) for s in shards], cfg.preset, f"{n_params:,}", cfg.num_server_rounds, cfg.local_epochs)

    np.random.seed(cfg.seed)  # Flower's DP wrapper draws its noise from numpy's global generator
    strategy = build_strategy(cfg, num_clients)
    strategy.setup_app(num_clients, {"run-dir": str(run.path), "run-token": uuid.uuid4().hex,
                                     "num-clients": num_clients})
    t_start = time.time()

    def on_round_end(server_round: int, arrays: ArrayRecord):
        if server_round == 0:
            return None
        clients = strategy.last_round
        for c in clients:
            np.add.at(skip_totals, c.image_ids, c.skip_counts)
            np.add.at(skip_period, c.image_ids, c.skip_counts)
        elapsed = time.time() - t_start
        moved = 0
        if cfg.ret_every and server_round % cfg.ret_every == 0 and server_round < cfg.num_server_rounds:
            event = server_round // cfg.ret_every
            new = redistribute(shards, skip_period, cfg.ret_fraction, event, cfg.seed)
            moved = int(sum(len(np.setdiff1d(a, b)) for a, b in zip(new, shards)))
            shards[:] = new
            skip_period[:] = 0
            run.write_shards(shards)
            strategy.round_config.update({f"shard-{i}": s.tolist() for i, s in enumerate(shards)})
        record = {"round": server_round, "elapsed-s": elapsed, **round_metrics(clients), "ret-moved": moved,
                  "clients": [{"partition-id": c.partition_id, "num-examples": c.num_examples, "loss": c.loss,
                               "kept": c.kept, "skipped": c.skipped, "skip-rate": c.skip_rate, "steps": c.steps,
                               "client-step": c.client_step, "seconds": c.seconds} for c in clients]}
        run.append_metrics(record)
        run.write_skip_counts(skip_totals)
        last = server_round == cfg.num_server_rounds
        if last or server_round % cfg.checkpoint_every == 0:
            r_net, r_ema = unpack_weights(arrays.to_torch_state_dict())
            save_checkpoint(run.checkpoint(server_round), r_net, r_ema, round=server_round, config=cfg.to_dict())
        run.write_status("running", round=server_round, num_rounds=cfg.num_server_rounds)
        eta = elapsed / server_round * (cfg.num_server_rounds - server_round)
        log(INFO, "fl-ietagc: round %d/%d  loss %.4f  skip-rate %.3f (per client %s)  elapsed %.0fs  eta %.0fs",
            server_round, cfg.num_server_rounds, record["loss"], record["skip-rate"],
            " ".join(f"{r:.3f}" for r in record["skip-rate-per-client"]), elapsed, eta)
        return None

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(pack_weights(net, ema)),
                            num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout_s,
                            train_config=ConfigRecord(), evaluate_fn=on_round_end)
    done = len(run.read_metrics())
    if done != cfg.num_server_rounds or len(result.arrays) == 0:
        raise RuntimeError(f"only {done} of {cfg.num_server_rounds} rounds were aggregated")
    final_net, final_ema = unpack_weights(result.arrays.to_torch_state_dict())
    save_checkpoint(run.final_checkpoint, final_net, final_ema, round=cfg.num_server_rounds, config=cfg.to_dict())
    if cfg.sample_count:
        model = build_for_config(cfg)
        load_weights(model, final_net, "final global weights")
        write_sample_grid(cfg, model, run.samples_path, pick_device(cfg.device))  # raw weights, as the paper
    run.write_status("completed", round=cfg.num_server_rounds, num_rounds=cfg.num_server_rounds,
                     seconds=time.time() - t_start)
    log(INFO, "fl-ietagc: done in %.0fs. run directory: %s", time.time() - t_start, run.path)
    log(INFO, "fl-ietagc:   metrics %s | final weights %s | samples %s", run.metrics_path, run.final_checkpoint,
        run.samples_path if cfg.sample_count else "(sample-count = 0)")
