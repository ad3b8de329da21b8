"""Run directories, global checkpoints and client-state files.

A run directory (written by the ServerApp and by the centralized baseline alike):

    <output-dir>/<run-name>/
        config.json          resolved run config (+ kind: federated | centralized, num-clients)
        status.json          {"status": running | completed | failed, "error": ..., "round": ...}
        metrics.json         one record per round (loss, skip rates, per-client stats, timings)
        shards.npz           the training-set ids of every shard (shard_0, shard_1, ...)
        skip_counts.npy      per training image: how often AGC skipped it, summed over the run
        checkpoints/round_0001.pt ... and final.pt   {"net": state_dict, "ema": state_dict, ...}
        samples.png          grid of samples from the final global (raw) weights
        client-state/p<i>.pt per-client optimizer state, memory bank, step counter, skip counts

Files are written atomically (temporary file, then rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "fl-ietagc-checkpoint/1"
NET, EMA = "net.", "ema."


def atomic_write_bytes(path: Path, writer) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        writer(f)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False).encode()))


def pack_weights(net: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat dict {net.<name>, ema.<name>} so raw and EMA weights travel (and average) side by side."""
    return {**{NET + k: v for k, v in net.items()}, **{EMA + k: v for k, v in ema.items()}}


def unpack_weights(packed: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    net = {k[len(NET):]: v for k, v in packed.items() if k.startswith(NET)}
    ema = {k[len(EMA):]: v for k, v in packed.items() if k.startswith(EMA)}
    if not net or not ema or len(net) + len(ema) != len(packed):
        raise ValueError("packed weights must hold only 'net.*' and 'ema.*' entries, both non-empty")
    return net, ema


def save_checkpoint(path: Path, net: dict, ema: dict, *, round: int, config: dict, **meta) -> None:
    blob = {"format": CHECKPOINT_FORMAT, "round": round, "config": config,
            "net": {k: v.detach().cpu() for k, v in net.items()},
            "ema": {k: v.detach().cpu() for k, v in ema.items()}, **meta}
    atomic_write_bytes(path, lambda f: torch.save(blob, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an fl-ietagc checkpoint (expected format {CHECKPOINT_FORMAT})")
    return blob


def save_client_state(path: Path, state_dict: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state_dict, f))


def load_client_state(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # --- layout ---
    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    shards_path = property(lambda self: self.path / "shards.npz")
    skip_counts_path = property(lambda self: self.path / "skip_counts.npy")
    samples_path = property(lambda self: self.path / "samples.png")
    final_checkpoint = property(lambda self: self.path / "checkpoints" / "final.pt")

    def checkpoint(self, round: int) -> Path:
        return self.path / "checkpoints" / f"round_{round:04d}.pt"

    def client_state(self, partition_id: int, state_root: str | Path | None = None) -> Path:
        root = Path(state_root) / self.path.name if state_root else self.path / "client-state"
        return root / f"p{partition_id}.pt"

    # --- creation ---
    @classmethod
    def create(cls, output_dir: str, run_name: str, default_name: str) -> "RunDir":
        """A new run directory; refuses to reuse an existing non-empty one."""
        base = Path(output_dir).expanduser()
        name = run_name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = base / name
        suffix = 1
        while not run_name and path.exists():  # auto names never collide
            suffix += 1
            path = base / f"{name}-{suffix}"
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"run-name = {run_name!r}: {path} already exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    # --- records ---
    def write_config(self, config: dict, **extra) -> None:
        atomic_write_json(self.config_path, {**config, **extra})

    def read_config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def write_status(self, status: str, **fields) -> None:
        atomic_write_json(self.status_path, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             **fields})

    def write_failure(self, exc: BaseException) -> None:
        self.write_status("failed", error=f"{type(exc).__name__}: {exc}",
                          traceback="".join(traceback.format_exception(exc)))

    def read_status(self) -> dict:
        return json.loads(self.status_path.read_text()) if self.status_path.exists() else {"status": "missing"}

    def append_metrics(self, record: dict) -> None:
        records = self.read_metrics()
        records.append(record)
        atomic_write_json(self.metrics_path, records)

    def read_metrics(self) -> list[dict]:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else []

    def write_shards(self, shards: list[np.ndarray]) -> None:
        atomic_write_bytes(self.shards_path, lambda f: np.savez(f, **{f"shard_{i}": s for i, s in enumerate(shards)}))

    def read_shards(self) -> list[np.ndarray]:
        with np.load(self.shards_path) as z:
            return [z[f"shard_{i}"] for i in range(len(z.files))]

    def write_skip_counts(self, counts: np.ndarray) -> None:
        atomic_write_bytes(self.skip_counts_path, lambda f: np.save(f, counts))
