"""Centralized training: one model, all training images (AGC off unless asked: the paper's "default training").

The same `LocalTrainer` as the federated clients, on the whole training set, started from the same
`initial_weights` (so `init-checkpoint` is honoured), and written through the same `RunDir`
lifecycle as the ServerApp (kind = centralized): rounds committed atomically, resumable after any
kill with `fl-ietagc resume RUN_DIR`, bit-identical to an uninterrupted run.

Budget: `num-server-rounds` "rounds" of `local-epochs` epochs over all data; or, with
`match_federated=K`, exactly the total number of optimizer steps that a K-client federated run of
the same config performs (R * E * sum_k floor(|D_k| / B)), as the paper matches default training's
400k steps to IET's 390k. Checkpoints and metrics are written after every round either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.data.shards import shard_inputs, shards_for_config
from fl_ietagc.evaluation.images import write_sample_grid
from fl_ietagc.runs.faults import fault_point
from fl_ietagc.runs.lifecycle import round_record, run_lifecycle
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, RunConfig
from fl_ietagc.training.lora import trained_state
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.run_model import build_for_config, initial_weights
from fl_ietagc.training.trainer import (
    LocalTrainer,
    NonFiniteError,
    RoundStats,
    TrainState,
    client_seed,
    pick_device,
)


def federated_total_steps(cfg: RunConfig, num_clients: int) -> int:
    """Optimizer steps summed over all clients and rounds of a federated run of `cfg`."""
    shards = shards_for_config(cfg, num_clients)
    return cfg.num_server_rounds * cfg.local_epochs * sum(len(s) // cfg.batch_size for s in shards)


def steps_per_round(cfg: RunConfig, num_train: int, match_federated: int) -> np.ndarray:
    total = (
        federated_total_steps(cfg, match_federated)
        if match_federated
        else cfg.num_server_rounds * cfg.local_epochs * (num_train // cfg.batch_size)
    )
    return np.diff(np.linspace(0, total, cfg.num_server_rounds + 1).round().astype(int))


def run_centralized(
    cfg: RunConfig,
    match_federated: int = 0,
    progress: bool = True,
    resume: str | None = None,
    on_round: Callable[[int, dict], None] | None = None,
) -> RunDir:
    """Train (or, with `resume` = a run directory, continue) a centralized run; returns its RunDir.
    `on_round(round, record)` is called after each round is committed (a study's progress lines)."""
    splits = load_splits(cfg)
    n = len(splits.train)
    if cfg.batch_size > n:
        raise ConfigError(f"batch-size = {cfg.batch_size}: larger than the {n} training images")
    device = pick_device(cfg.device)
    if resume:
        run = RunDir.reopen(resume)
        stored = run.read_config()
        if stored.get("kind") != "centralized":
            raise ConfigError(f"resume: {run.path} is a {stored.get('kind')} run, not a centralized one")
        cfg.check_resumed(f"resume {run.path}", stored)
        match_federated = int(stored.get("matched_federated_clients", 0))
        blob = run.read_resume()
        start, net_sd, ema_sd = int(blob["round"]), blob["net"], blob["ema"]
        state = TrainState.from_dict(blob["state"]["trainer"])
    else:
        net_sd, ema_sd = initial_weights(cfg)
        run = RunDir.create(cfg.output_dir, cfg.run_name, f"{cfg.dataset}-{cfg.preset}-centralized")
        start, state = 0, TrainState.fresh(np.arange(n))
    per_round = steps_per_round(cfg, n, match_federated)
    model, ema = build_for_config(cfg), build_for_config(cfg)
    load_weights(model, net_sd, "raw weights")
    load_weights(ema, ema_sd, "EMA weights")
    if not resume:
        run.begin(
            cfg.to_dict(),
            [np.arange(n)],
            len(per_round),
            kind="centralized",
            num_clients=1,
            num_parameters=sum(v.numel() for v in net_sd.values()),
            image_size=image_size(cfg),
            channels=splits.train.channels,
            num_train_images=n,
            matched_federated_clients=match_federated,
            total_steps=int(per_round.sum()),
        )
        run.write_resume(0, net_sd, ema_sd, {"trainer": state.to_dict()})
    inputs, cond = shard_inputs(cfg, np.arange(n))
    trainer = LocalTrainer(cfg, model, ema, inputs, state, device, cond=cond)
    before = (run.read_metrics() or [{}])[-1].get("elapsed-s", 0.0)
    t0 = time.time()
    with run_lifecycle(run, start, len(per_round)), progress_bar(per_round, start, progress) as bar:
        for r in range(start + 1, len(per_round) + 1):
            try:
                stats = trainer.run(epochs=0, seed=client_seed(cfg.seed, 0, r), max_steps=int(per_round[r - 1]))
            except NonFiniteError as e:
                raise FloatingPointError(f"round {r}, step {e.step}: {e.what} (lr {e.lr:g})") from e
            record = round_record(r, before + time.time() - t0, trainer_metrics(stats))
            run.commit_round(
                r,
                record,
                net=trained_state(model),
                ema=trained_state(ema),
                state={"trainer": state.to_dict()},
                config=cfg.to_dict(),
                skip_counts=state.skip_counts.numpy(),
                keep_checkpoint=r == len(per_round) or r % cfg.checkpoint_every == 0,
                num_rounds=len(per_round),
            )
            if bar is not None:
                bar.update(stats.steps)
                bar.set_postfix(loss=f"{stats.mean_loss:.4f}", skip=f"{stats.skip_rate:.3f}")
            if on_round is not None:
                on_round(r, record)
            fault_point("between-rounds", r)
        run.finish(trained_state(model), trained_state(ema), len(per_round), cfg.to_dict())
        fault_point("final-sampling", len(per_round))
        if cfg.sample_count:
            write_sample_grid(cfg, model, run.samples_path, device)
        run.mark_completed(len(per_round), seconds_this_session=time.time() - t0)
    return run


def trainer_metrics(stats: RoundStats) -> dict:
    """A centralized round's metrics, shaped as a federated round's of one client (without its per-client
    seconds)."""
    return {
        "loss": stats.mean_loss,
        "skip-rate": stats.skip_rate,
        "kept": stats.kept,
        "skipped": stats.skipped,
        "steps": stats.steps,
        "skip-rate-per-client": [stats.skip_rate],
        "loss-per-client": [stats.mean_loss],
    }


def progress_bar(per_round: np.ndarray, start: int, progress: bool):
    """A tqdm bar over the run's optimizer steps (as a context manager), or nullcontext (None) without progress."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=int(per_round.sum()), initial=int(per_round[:start].sum()), desc="centralized", unit="step")
