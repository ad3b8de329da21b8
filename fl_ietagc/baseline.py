"""Centralized "default training": one model, all training images, no AGC (unless asked).

The same `LocalTrainer` as the federated clients, on the whole training set. It writes the same
run-directory layout as the ServerApp (kind = centralized), so evaluation treats both alike.

Budget: `num-server-rounds` "rounds" of `local-epochs` epochs over all data; or, with
`match_federated=K`, exactly the total number of optimizer steps that a K-client federated run of
the same config performs (R * E * sum_k floor(|D_k| / B)), as the paper matches the baseline's
400k steps to IET's 390k. Checkpoints and metrics are written after every round either way.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .checkpoints import RunDir, save_checkpoint
from .config import ConfigError, RunConfig
from .data import image_size, load_splits
from .images import write_sample_grid
from .models import build_for_config, count_parameters
from .shards import shards_for_config
from .trainer import LocalTrainer, TrainState, client_seed, pick_device


def federated_total_steps(cfg: RunConfig, num_clients: int) -> int:
    """Optimizer steps summed over all clients and rounds of a federated run of `cfg`."""
    shards = shards_for_config(cfg, num_clients)
    return cfg.num_server_rounds * cfg.local_epochs * sum(len(s) // cfg.batch_size for s in shards)


def run_baseline(cfg: RunConfig, match_federated: int = 0, progress: bool = True) -> RunDir:
    splits = load_splits(cfg)
    n = len(splits.train)
    if cfg.batch_size > n:
        raise ConfigError(f"batch-size = {cfg.batch_size}: larger than the {n} training images")
    device = pick_device(cfg.device)
    steps_per_epoch = n // cfg.batch_size
    total = federated_total_steps(cfg, match_federated) if match_federated else \
        cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch
    per_round = np.diff(np.linspace(0, total, cfg.num_server_rounds + 1).round().astype(int))

    run = RunDir.create(cfg.output_dir, cfg.run_name, f"{cfg.dataset}-{cfg.preset}-centralized")
    torch.manual_seed(cfg.seed)
    model = build_for_config(cfg)
    ema = copy.deepcopy(model)
    run.write_config(cfg.to_dict(), kind="centralized", num_clients=1, num_parameters=count_parameters(model),
                     image_size=image_size(cfg), channels=splits.train.channels, num_train_images=n,
                     matched_federated_clients=match_federated, total_steps=int(total))
    all_ids = np.arange(n)
    run.write_shards([all_ids])
    state = TrainState.fresh(all_ids)
    trainer = LocalTrainer(cfg, model, ema, splits.train.images, state, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(total), desc="baseline", unit="step")
    t0 = time.time()
    try:
        for r, steps in enumerate(per_round, start=1):
            stats = trainer.run(epochs=0, seed=client_seed(cfg.seed, 0, r), max_steps=int(steps))
            run.append_metrics({"round": r, "elapsed-s": time.time() - t0, "loss": stats.mean_loss,
                                "skip-rate": stats.skip_rate, "kept": stats.kept, "skipped": stats.skipped,
                                "steps": stats.steps, "skip-rate-per-client": [stats.skip_rate],
                                "loss-per-client": [stats.mean_loss]})
            run.write_skip_counts(state.skip_counts.numpy())
            if r == len(per_round) or r % cfg.checkpoint_every == 0:
                save_checkpoint(run.checkpoint(r), model.state_dict(), ema.state_dict(), round=r,
                                config=cfg.to_dict())
            if bar is not None:
                bar.update(stats.steps)
                bar.set_postfix(loss=f"{stats.mean_loss:.4f}", skip=f"{stats.skip_rate:.3f}")
        save_checkpoint(run.final_checkpoint, model.state_dict(), ema.state_dict(), round=len(per_round),
                        config=cfg.to_dict())
        if cfg.sample_count:
            write_sample_grid(cfg, model, run.samples_path, device)
        run.write_status("completed", round=len(per_round), num_rounds=len(per_round), seconds=time.time() - t0)
    except BaseException as exc:
        run.write_failure(exc)
        raise
    finally:
        if bar is not None:
            bar.close()
    return run
