"""A run directory and its life: create or reopen, record config and shards, commit each round
atomically, mark the run completed / failed / interrupted, and resume it from its last round.

The ServerApp, centralized training and the Flower-free loop all write their runs through this
one object, so every kind of run has the same layout and the same rules:

    <output-dir>/<run-name>/
        config.json          resolved run config (+ kind: federated | centralized, num-clients, ...)
        status.json          running | completed | failed | interrupted, round, pid/host of the writer,
                             a one-line error; a "running" status whose process is gone is stale
        metrics.json         one record per completed round (strict JSON: NaN is written as null)
        shards.npz           the training-set ids of every shard (RET keeps it current)
        skip_counts.npy      per training image: how often AGC skipped it, summed over the run
        checkpoints/round_0001.pt ... and final.pt   {"net": state_dict, "ema": state_dict, ...}
        resume.pt            the commit point: last completed round, its global weights and everything
                             else the next round depends on (strategy state, RNG, shards, skip totals, ...)
        samples.png          grid of samples from the final global (raw) weights
        logs/                failure.log (full traceback of a failed run), client-p<P>-r<R>.log
        client-state/p<P>/round_<R>.pt   a client's state after round R (the last two are kept)

Committing round r writes, in order: metrics.json (rounds <= r), skip_counts.npy, the round's
checkpoint (every `checkpoint-every` rounds), resume.pt (the commit), status.json. A crash before
resume.pt is replaced leaves round r uncommitted: `reopen` rolls the directory back to round r-1
(metrics, checkpoints and final files of later rounds are dropped) and round r is trained again from
the client states of round r-1, so no client's steps are applied twice.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np

from fl_ietagc.runs.checkpoints import (
    BackgroundWrite,
    atomic_write_bytes,
    atomic_write_json,
    cpu_state,
    load_torch,
    read_json,
    save_checkpoint,
    save_torch,
)
from fl_ietagc.settings.config import ConfigError

RESUME_FORMAT = "fl-ietagc-resume/1"
WRITE_TIMEOUT_S = 600.0  # a checkpoint write that takes longer fails the commit, named

# runs this process is writing now: a signal handler marks them interrupted before the process exits
ACTIVE_RUNS: set[RunDir] = set()
ANNOUNCE_ENV = "FL_IETAGC_RUN_DIR_FILE"  # a supervising process (flower-simulation) learns the run dir here


def register_active(run: RunDir) -> None:
    """This process now writes `run`: remember it for signal handlers, and tell a supervisor where it is."""
    ACTIVE_RUNS.add(run)
    if os.environ.get(ANNOUNCE_ENV):
        atomic_write_bytes(Path(os.environ[ANNOUNCE_ENV]), lambda f: f.write(str(run.path).encode()))


class RunExistsError(ConfigError):
    """The run directory a new run would write to is already taken (says how to resume it)."""


def _process_start(pid: int) -> str | None:
    """Start time of a live process (from /proc), to tell a reused pid from the original; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]  # a zombie (dead, not yet reaped) is gone
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return ""  # alive, start time unknown (no /proc)
        except OSError:
            return None


def _this_process() -> dict:
    return {"pid": os.getpid(), "pid-start": _process_start(os.getpid()), "host": socket.gethostname()}


def resume_command(path: Path) -> str:
    return f"fl-ietagc resume {path}"


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
    resume_path = property(lambda self: self.path / "resume.pt")
    logs_dir = property(lambda self: self.path / "logs")
    final_checkpoint = property(lambda self: self.path / "checkpoints" / "final.pt")

    def checkpoint(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round_{server_round:04d}.pt"

    def client_state_dir(self, partition_id: int, state_root: str | Path | None = None) -> Path:
        """Where partition P keeps its state files: <run>/client-state/pP, or <state_root>/<run name>/pP."""
        root = Path(state_root) / self.path.name if state_root else self.path / "client-state"
        return root / f"p{partition_id}"

    def client_state(self, partition_id: int, server_round: int, state_root: str | Path | None = None) -> Path:
        """Partition P's state after round R (round 0 = never trained)."""
        return self.client_state_dir(partition_id, state_root) / f"round_{server_round:04d}.pt"

    # --- creation and reopening ---
    @staticmethod
    def new_path(output_dir: str, run_name: str, default_name: str) -> Path:
        base = Path(output_dir).expanduser()
        if run_name:
            return base / run_name
        name = f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, suffix = base / name, 1
        while path.exists():  # auto names never collide
            suffix += 1
            path = base / f"{name}-{suffix}"
        return path

    @classmethod
    def check_new(cls, path: Path) -> None:
        """Refuse a directory that holds a run, saying what it holds and how to go on."""
        path = Path(path)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return
        if not path.is_dir():
            raise RunExistsError(f"run-name: {path} exists and is not a directory")
        run = cls(path)
        state = run.liveness()
        advice = {
            "completed": "it holds a completed run; choose another run-name",
            "running": f"a run is still writing it ({run.read_status().get('host')} pid "
            f"{run.read_status().get('pid')}); choose another run-name",
            "stale": f"it holds a run whose process is gone (killed?); continue it with: {resume_command(run.path)}",
            "failed": f"it holds a failed run; fix the cause and continue it with: {resume_command(run.path)}",
            "interrupted": f"it holds an interrupted run; continue it with: {resume_command(run.path)}",
        }.get(state, "it is not empty; choose another run-name")
        raise RunExistsError(f"run-name = {path.name!r}: {path} already exists: {advice}")

    @classmethod
    def create(cls, output_dir: str, run_name: str, default_name: str) -> RunDir:
        path = cls.new_path(output_dir, run_name, default_name)
        cls.check_new(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output-dir = {output_dir!r}: cannot create {path} ({e.strerror or e})") from e
        return cls(path)

    @classmethod
    def reopen(cls, path: str | Path) -> RunDir:
        """An existing run to continue, rolled back to its last committed round."""
        run = cls.check_resumable(path)
        run.roll_back(run.committed_round())
        return run

    @classmethod
    def check_resumable(cls, path: str | Path) -> RunDir:
        """The run must be failed, interrupted or stale (its process gone), and have a commit point."""
        run = cls(path)
        if not run.config_path.is_file():
            raise ConfigError(f"resume: {run.path} is not a run directory (no config.json)")
        run.read_config()  # a corrupt one is named here
        state = run.liveness()
        if state == "completed":
            raise ConfigError(f"resume: {run.path} holds a completed run; nothing to resume")
        if state == "running":
            s = run.read_status()
            raise ConfigError(
                f"resume: {run.path} is still being written by {s.get('host')} pid {s.get('pid')}; "
                f"stop that process first"
            )
        if not run.resume_path.is_file():
            raise ConfigError(
                f"resume: {run.path} has no resume.pt (the run stopped before it started training); "
                f"start it again under a new run-name"
            )
        try:
            run.committed_round()
        except ValueError as e:
            raise ConfigError(f"resume: {e}") from e
        return run

    def liveness(self) -> str:
        """completed | failed | interrupted | running (its process is alive, or on another host) | stale | missing"""
        status = self.read_status()
        state = status.get("status", "missing")
        if state != "running":
            return state
        if status.get("host") != socket.gethostname():
            return "running"
        start = _process_start(int(status.get("pid", -1)))
        alive = start is not None and (not start or not status.get("pid-start") or start == status["pid-start"])
        return "running" if alive else "stale"

    # --- records ---
    def write_config(self, config: dict, **extra) -> None:
        atomic_write_json(self.config_path, {**config, **extra})

    def read_config(self) -> dict:
        return read_json(self.config_path, "run config")

    def write_status(self, status: str, **fields) -> None:
        atomic_write_json(
            self.status_path,
            {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **_this_process(), **fields},
        )

    def read_status(self) -> dict:
        if not self.status_path.exists():
            return {"status": "missing"}
        return read_json(self.status_path, "status file")

    def read_metrics(self) -> list[dict]:
        return read_json(self.metrics_path, "metrics file") if self.metrics_path.exists() else []

    def write_shards(self, shards: list[np.ndarray]) -> None:
        atomic_write_bytes(self.shards_path, lambda f: np.savez(f, **{f"shard_{i}": s for i, s in enumerate(shards)}))

    def read_shards(self) -> list[np.ndarray]:
        with np.load(self.shards_path) as z:
            return [z[f"shard_{i}"] for i in range(len(z.files))]

    def write_skip_counts(self, counts: np.ndarray) -> None:
        atomic_write_bytes(self.skip_counts_path, lambda f: np.save(f, counts))

    def write_log(self, name: str, text: str) -> Path:
        path = self.logs_dir / name
        atomic_write_bytes(path, lambda f: f.write(text.encode()))
        return path

    # --- the life of a run ---
    def begin(self, config: dict, shards: list[np.ndarray], num_rounds: int, **extra) -> None:
        """Record a new run's config and shards; status running at round 0."""
        self.write_config(config, **extra)
        self.write_shards(shards)
        self.write_status("running", round=0, num_rounds=num_rounds)

    def commit_round(
        self,
        server_round: int,
        record: dict,
        *,
        net: dict,
        ema: dict,
        state: dict,
        config: dict,
        skip_counts: np.ndarray | None,
        keep_checkpoint: bool,
        num_rounds: int,
        write_status: bool = True,
    ) -> None:
        """Make round `server_round` durable: metrics, skip counts, checkpoint, then the commit point (and, unless
        `write_status` is False, status.json's round)."""
        from fl_ietagc.runs.faults import fault_point

        metrics = [m for m in self.read_metrics() if m["round"] < server_round] + [record]
        atomic_write_json(self.metrics_path, metrics)
        if skip_counts is not None:
            self.write_skip_counts(skip_counts)
        # the checkpoint is written on a thread while resume.pt goes to its temporary file (the two overlap their
        # serialization and fsync); resume.pt, the commit point, replaces the old one only once the checkpoint is
        # in place, so a committed round always has its checkpoint
        checkpoint = (
            BackgroundWrite(
                lambda: save_checkpoint(
                    self.checkpoint(server_round), net, ema, server_round=server_round, config=config
                ),
                f"checkpoint {self.checkpoint(server_round)}",
            )
            if keep_checkpoint
            else None
        )

        def checkpoint_in_place():
            if checkpoint is not None:
                checkpoint.wait(WRITE_TIMEOUT_S)
            fault_point("mid-commit", server_round)

        self.write_resume(server_round, net, ema, state, before_replace=checkpoint_in_place)
        if write_status:
            self.write_status("running", round=server_round, num_rounds=num_rounds)

    def write_resume(self, server_round: int, net: dict, ema: dict, state: dict, before_replace=None) -> None:
        save_torch(
            self.resume_path,
            {
                "format": RESUME_FORMAT,
                "round": server_round,
                "net": cpu_state(net),
                "ema": cpu_state(ema),
                "state": state,
            },
            before_replace,
        )

    def read_resume(self) -> dict:
        blob = load_torch(self.resume_path, "resume point")
        if not isinstance(blob, dict) or blob.get("format") != RESUME_FORMAT:
            raise ValueError(f"{self.resume_path}: not an fl-ietagc resume point (expected {RESUME_FORMAT})")
        return blob

    def committed_round(self) -> int:
        return int(self.read_resume()["round"])

    def roll_back(self, server_round: int) -> None:
        """Drop whatever a crash left of rounds after `server_round` (metrics, checkpoints, final files)."""
        atomic_write_json(self.metrics_path, [m for m in self.read_metrics() if m["round"] <= server_round])
        for path in (self.path / "checkpoints").glob("round_*.pt"):
            if int(path.stem.split("_")[1]) > server_round:
                path.unlink()
        for path in (self.final_checkpoint, self.samples_path):
            path.unlink(missing_ok=True)
        for tmp in self.path.rglob(".*.tmp*"):  # temporary files of a write the crash cut short
            tmp.unlink(missing_ok=True)

    def finish(self, net: dict, ema: dict, server_round: int, config: dict) -> None:
        """The final weights (the run is marked completed once its samples are written too)."""
        save_checkpoint(self.final_checkpoint, net, ema, server_round=server_round, config=config)

    def mark_completed(self, server_round: int, **fields) -> None:
        self.write_status("completed", round=server_round, num_rounds=server_round, **fields)

    def mark_failed(self, exc: BaseException, **fields) -> None:
        """Status failed with a one-line error; the full traceback goes to logs/failure.log."""
        log = self.write_log("failure.log", "".join(traceback.format_exception(exc)))
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.write_status(
            "failed",
            error=f"{type(exc).__name__}: {line}",
            log=str(log),
            round=self._committed_or_zero(),
            resume=resume_command(self.path),
            **fields,
        )

    def mark_interrupted(self, why: str) -> None:
        self.write_status("interrupted", error=why, round=self._committed_or_zero(), resume=resume_command(self.path))

    def _committed_or_zero(self) -> int:
        try:
            return self.committed_round()
        except (FileNotFoundError, ValueError):
            return 0
