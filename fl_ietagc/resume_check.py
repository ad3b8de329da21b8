"""Before a resume starts anything: the run's commit point fits its config, and every client state the next
round will read is there, readable and of this run.

`RunDir.check_resumable` says whether a run can be resumed at all (its status, a resume.pt); this goes into
what the resume will load, so a run directory edited or damaged since it stopped (a changed `preset` in
config.json, a deleted or unreadable client state) is refused here, in one line naming the file, instead of
when round 2 starts. Client states are checked where this process can see them (a simulation, centralized
training); a deployment's SuperNodes keep theirs on their own disks.
"""

from __future__ import annotations

import torch

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.runs.checkpoints import load_torch
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, RunConfig
from fl_ietagc.settings.paths import kind
from fl_ietagc.training.models import build_unet, first_mismatch
from fl_ietagc.training.trainer import TrainState


def model_layout(cfg: RunConfig) -> dict | None:
    """name -> shape of the model `cfg` builds (on the meta device: no memory, no weights); None for
    latent-t2i (its UNet is pretrained-dir's, read when the run starts)."""
    if cfg.model_type != "pixel":
        return None

    channels = load_splits(cfg).train.channels
    with torch.device("meta"):
        model = build_unet(cfg.preset, image_size(cfg), channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_resume_contents(cfg: RunConfig, client_states: bool = True) -> None:
    """`cfg` resumes cfg.resume_from: its resume.pt holds weights of cfg's model and (federated, `client_states`)
    every client state file the next round starts from exists, loads (weights_only) and belongs to this run."""
    run = RunDir(cfg.resume_from)
    try:
        blob = run.read_resume()
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {e}") from None
    layout = model_layout(cfg)
    for part in ("net", "ema"):
        weights = blob.get(part)
        if not isinstance(weights, dict):
            raise ConfigError(f"resume: {run.resume_path}: no {part} weights")
        problem = first_mismatch(layout, weights) if layout is not None else None
        if problem:
            raise ConfigError(
                f"resume: {run.resume_path} does not fit the model of {run.config_path} "
                f"(preset {cfg.preset}, image-size {cfg.image_size or 'default'}): {problem}; was "
                f"config.json edited?"
            )
    if not client_states or run.read_config().get("kind") != "federated":
        return
    state = blob.get("state") or {}
    rounds, token = state.get("state-rounds"), state.get("token")
    if rounds is None:  # the Flower-free loop keeps its clients' states inside resume.pt itself
        return
    if not isinstance(rounds, (list, tuple)):
        raise ConfigError(f"resume: {run.resume_path}: client state rounds unreadable ({type(rounds).__name__})")
    for partition, server_round in enumerate(rounds):
        if int(server_round) > 0:
            check_client_state(run, cfg, partition, int(server_round), token)


def check_client_state(run: RunDir, cfg: RunConfig, partition: int, server_round: int, token: str) -> None:
    path = run.client_state(partition, server_round, cfg.client_state_dir or None)
    who = f"resume: client {partition}'s state after round {server_round}"
    what = kind(path)
    if what != "file":
        raise ConfigError(
            f"{who}: {path} is {'missing' if what == 'missing' else what} (the next round starts "
            f"from it; its optimizer and memory bank cannot be rebuilt)"
        )
    try:
        blob = load_torch(path, "client state")  # weights_only
    except (OSError, ValueError) as e:  # unreadable, truncated, or not a torch file
        raise ConfigError(f"{who}: {e}") from None
    if not isinstance(blob, dict) or set(blob) != set(TrainState.fresh([]).to_dict()):
        raise ConfigError(f"{who}: {path} is not a client state of this version")
    if blob["token"] != token:
        raise ConfigError(f"{who}: {path} belongs to another run (token {blob['token']!r}, this run's {token!r})")
