"""Evaluate a run directory: generate samples, measure memorization and quality, write results and report.

    fl-ietagc evaluate RUN_DIR [--num-samples N] [--sampler ddim|ddpm] [--steps 50] [--weights raw|ema]
                               [--round R] [--seed S] [--batch-size B] [--device auto|cpu|cuda] [--k 50]
                               [--fid-weights PATH] [--quality fid,kid] [--no-fid] [--out DIR]

Works for federated and centralized runs alike (same run-directory layout); a run with model-type = latent-t2i is
evaluated by fl_ietagc/evaluation/t2i_evaluate.py instead (`fl-ietagc evaluate` dispatches on the run's config). Steps:
0. `prepare` checks every option and the run directory first (completed run, checkpoint, metrics and skip
   counts readable, --k within the training set, Inception weights safe and of the right network, --out
   writable): bad input fails at once with one line naming the option or the file, before any sampling;
1. samples from the final (or round R's) global weights, raw by default (the paper evaluates raw weights),
   quantised to uint8 as saved images are;
2. one exact nearest-neighbour pass of the samples against the run's whole training set (all shards), and
   one of held-out real images (the null rate): MQ at every tau, the 1/3 rule, Carlini's rule;
3. FID (optionally IS/KID/precision-recall) through torch-fidelity against the training set, if Inception
   weights can be had; otherwise the report says why FID is missing;
4. the paper's figures and the run's per-round curves (fl_ietagc/evaluation/report.py);
5. `results.json`, `report.html` (figures embedded) and `samples.npz` (the generated uint8 images, their
   nearest training images' indices and exact squared distances, and the same for the held-out null) in the
   run directory (or --out): `load_samples` reads it back, so metrics can be recomputed without sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.data.pixels import to_model_range, to_uint8
from fl_ietagc.evaluation.inception_quality import FidUnavailable, compute_quality, preflight_weights
from fl_ietagc.evaluation.memorization import TAUS, nearest_neighbours, ratios, summarize
from fl_ietagc.runs.checkpoints import atomic_write_bytes, atomic_write_json, load_checkpoint, read_json
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, config_keys, parse_config
from fl_ietagc.training.diffusion import Diffusion, sample
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.run_model import build_for_config
from fl_ietagc.training.trainer import pick_device


@dataclass
class EvalOptions:
    num_samples: int = 1024
    sampler: str = "ddim"
    steps: int = 50
    weights: str = "raw"
    server_round: int | None = None  # --round
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    k: int = 50
    fid: bool = True
    fid_weights: str | None = None
    quality: tuple[str, ...] = ("fid",)
    precision: str | None = None  # fp32 | bf16 for sampling; None = the run's own `precision` key
    memorized_tau: float = 0.2  # a training image is "memorized" if a sample with MQ r < this has it as NN
    # (where MQ is unreliable, i.e. the training set is small, the 1/3 rule decides instead)
    loss_images: int = 64  # per group (memorized / not) for the loss-by-timestep figure
    out: str | None = None

    def validate(self) -> None:
        """The checks that need no run directory; every problem found, on one line, naming the option."""
        problems = []
        if self.num_samples < 1:
            problems.append(f"--num-samples {self.num_samples}: must be >= 1")
        elif self.fid and self.num_samples < 2:
            problems.append(f"--num-samples {self.num_samples}: quality metrics need >= 2 samples (or pass --no-fid)")
        if self.sampler not in ("ddim", "ddpm"):
            problems.append(f"--sampler {self.sampler}: must be ddim or ddpm")
        problems += shared_problems(self)
        if self.precision not in (None, "fp32", "bf16"):
            problems.append(f"--precision {self.precision}: must be fp32 or bf16")
        if self.k < 2:
            problems.append(f"--k {self.k}: must be >= 2 (the 1/3 rule needs 2 neighbours)")
        bad = set(self.quality) - {"fid", "isc", "kid", "prc"}
        if bad:
            problems.append(f"--quality {','.join(sorted(bad))}: must be among fid, isc, kid, prc")
        elif self.fid and not self.quality:
            problems.append("--quality: names no metric; give some of fid, isc, kid, prc (or pass --no-fid)")
        if not (math.isfinite(self.memorized_tau) and self.memorized_tau > 0):
            problems.append(f"--memorized-tau {self.memorized_tau}: must be a number > 0")
        if self.loss_images < 1:
            problems.append(f"loss_images {self.loss_images}: must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


def shared_problems(opts) -> list[str]:
    """Problems with the options every kind of run shares (steps, weights, round, seed, batch size, device)."""
    problems = []
    if opts.steps < 1:
        problems.append(f"--steps {opts.steps}: must be >= 1")
    if opts.weights not in ("raw", "ema"):
        problems.append(f"--weights {opts.weights}: must be raw or ema")
    if opts.server_round is not None and opts.server_round < 1:
        problems.append(f"--round {opts.server_round}: must be >= 1")
    if not 0 <= opts.seed < 2**63:
        problems.append(f"--seed {opts.seed}: must be in [0, 2**63)")
    if opts.batch_size < 1:
        problems.append(f"--batch-size {opts.batch_size}: must be >= 1")
    if opts.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device {opts.device}: must be auto, cpu or cuda")
    elif opts.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible to this process; use --device cpu or auto")
    return problems


def load_run(run_dir: str | Path):
    """(RunDir, RunConfig, extra config.json fields) of a run directory; a missing, corrupt or invalid
    config.json raises an error naming it."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a run directory (no config.json)")
    raw = run.read_config()  # ValueError naming config.json if it is not JSON
    if not isinstance(raw, dict):
        raise ValueError(f"{run.config_path}: corrupt run config (expected a JSON object, got {type(raw).__name__})")
    known = {f.metadata["key"] for f in config_keys()}
    try:
        cfg = parse_config({k: v for k, v in raw.items() if k in known})
    except ConfigError as e:
        raise ValueError(f"{run.config_path}: invalid run config ({e})") from e
    return run, cfg, {k: v for k, v in raw.items() if k not in known}


@dataclass
class EvalPlan:
    """Everything `evaluate_run` needs, checked before any sampling (see `prepare`)."""

    run: RunDir
    cfg: object
    meta: dict
    ckpt_path: Path
    ckpt: dict
    model: torch.nn.Module
    splits: object
    device: torch.device
    out_dir: Path
    fid_weights: str | None  # verified local Inception weights, None if they would have to be downloaded


def _saved_rounds(run: RunDir) -> str:
    rounds = sorted(
        int(p.stem.split("_")[1])
        for p in (run.path / "checkpoints").glob("round_*.pt")
        if p.stem.split("_")[1].isdigit()
    )
    return ", ".join(map(str, rounds)) if rounds else "none"


def _check_writable(out: Path, what: str) -> None:
    """`out` is (or can be created as) a writable directory; ValueError "<what>: ..." otherwise."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {probe} is not writable")


def select_checkpoint(run: RunDir, server_round: int | None, weights: str) -> tuple[Path, dict, dict]:
    """(path, checkpoint, its raw or EMA state dict): the final checkpoint of a completed run, or round R's; an
    unfinished run, a missing round, a corrupt file or absent weights raise ValueError naming the file or option."""
    if server_round is None:
        state = run.read_status().get("status", "missing")
        if state != "completed":
            raise ValueError(
                f"{run.path}: the run is {state}, not completed; evaluate a saved round of it with "
                f"--round R (saved rounds: {_saved_rounds(run)})"
            )
        ckpt_path = run.final_checkpoint
        if not ckpt_path.is_file():
            raise ValueError(f"{ckpt_path}: missing; the completed run has no final checkpoint")
    else:
        ckpt_path = run.checkpoint(server_round)
        if not ckpt_path.is_file():
            raise ValueError(
                f"--round {server_round}: no checkpoint of round {server_round} in "
                f"{ckpt_path.parent} (saved rounds: {_saved_rounds(run)})"
            )
    ckpt = load_checkpoint(ckpt_path)  # ValueError naming the file if empty, corrupt or refused
    key = "net" if weights == "raw" else "ema"
    if not isinstance(ckpt.get(key), dict):
        raise ValueError(f"{ckpt_path}: no {key!r} weights (--weights {weights})")
    return ckpt_path, ckpt, ckpt[key]


def output_dir(run: RunDir, out: str | None) -> Path:
    """Where results go (--out, else the run directory), checked to be writable."""
    out_dir = Path(out) if out else run.path
    _check_writable(out_dir, f"--out {out}" if out else f"{run.path} (use --out DIR to write elsewhere)")
    return out_dir


def prepare(run_dir: str | Path, opts: EvalOptions) -> EvalPlan:
    """Check every option and the run directory before any work: raises ValueError / FileNotFoundError with one
    line naming the option (and its allowed range) or the file (and what is wrong with it). Loads the checkpoint,
    the model, the data and (when quality is on) verifies the Inception weights."""
    opts.validate()
    run, cfg, meta = load_run(run_dir)
    ckpt_path, ckpt, state = select_checkpoint(run, opts.server_round, opts.weights)
    model = build_for_config(cfg)
    load_weights(model, state, f"{ckpt_path} ({opts.weights})")
    if opts.sampler == "ddim" and opts.steps > cfg.diffusion_steps:
        raise ValueError(f"--steps {opts.steps}: must be <= {cfg.diffusion_steps} (the run's diffusion-steps)")
    out_dir = output_dir(run, opts.out)
    from fl_ietagc.evaluation import report  # (matplotlib: compare and export import this module, make no report)

    report.read_round_metrics(run)  # a corrupt metrics.json fails now, not after sampling
    fid_weights = None
    if opts.fid:
        try:
            fid_weights = preflight_weights(opts.fid_weights)
        except FidUnavailable as e:
            raise ValueError(str(e)) from None
    try:
        splits = load_splits(cfg)
    except ConfigError as e:
        raise ValueError(f"{run.config_path}: {e}") from e
    num_train = len(splits.train.images)
    if opts.k > num_train:
        raise ValueError(f"--k {opts.k}: must be <= {num_train} (the run's training set size)")
    report.read_skip_counts(run, num_train)  # likewise skip_counts.npy
    device = pick_device(opts.device)
    return EvalPlan(
        run=run,
        cfg=cfg,
        meta=meta,
        ckpt_path=ckpt_path,
        ckpt=ckpt,
        model=model,
        splits=splits,
        device=device,
        out_dir=out_dir,
        fid_weights=fid_weights,
    )


@torch.no_grad()
def loss_by_timestep(
    model,
    diffusion: Diffusion,
    images: torch.Tensor,
    timesteps: np.ndarray,
    *,
    seed: int,
    device,
    batch_size: int = 256,
) -> np.ndarray:
    """(n_images, n_timesteps) per-sample epsilon loss, fixed noise per (image, timestep), model in eval mode."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = np.zeros((images.shape[0], len(timesteps)))
    for j, t in enumerate(timesteps):
        for s in range(0, images.shape[0], batch_size):
            x0 = to_model_range(images[s : s + batch_size].to(device))
            noise = torch.randn(x0.shape, generator=gen, device=device)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            out[s : s + batch_size, j] = diffusion.per_sample_loss(model, x0, tt, noise).cpu().numpy()
    return out


def evaluate_run(run_dir: str | Path, opts: EvalOptions, progress: bool = True, plan: EvalPlan | None = None) -> dict:
    """Evaluate a run (see the module docstring). `plan` is `prepare(run_dir, opts)`, made here if not given:
    every check runs before any sampling."""
    plan = plan or prepare(run_dir, opts)
    run, cfg, meta, ckpt_path, ckpt = plan.run, plan.cfg, plan.meta, plan.ckpt_path, plan.ckpt
    model, splits, device, out_dir = plan.model, plan.splits, plan.device, plan.out_dir
    timings: dict[str, float] = {}
    model.to(device).eval()
    train, heldout = splits.train.images, splits.heldout.images
    diffusion = Diffusion.for_config(cfg)
    size, channels = image_size(cfg), splits.train.channels

    t0 = time.perf_counter()
    samples = to_uint8(
        sample(
            model,
            diffusion,
            opts.num_samples,
            (channels, size, size),
            sampler=opts.sampler,
            steps=opts.steps,
            seed=opts.seed,
            batch_size=opts.batch_size,
            device=device,
            progress=progress,
            precision=opts.precision or cfg.precision,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            compile_mode=cfg.compile_mode,
        )
    )
    timings["sampling_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    nb = nearest_neighbours(samples, train, opts.k, device=device, progress=progress)
    nb_null = nearest_neighbours(heldout, train, opts.k, device=device)
    timings["nearest_neighbours_s"] = time.perf_counter() - t0
    memorization = summarize(nb, len(train))
    null = summarize(nb_null, len(train))

    t0 = time.perf_counter()
    quality = compute_quality_or_reason(samples, train, cfg, opts, device, weights_path=plan.fid_weights)
    timings["quality_s"] = time.perf_counter() - t0

    results = {
        "run": str(run.path),
        "kind": meta.get("kind", "unknown"),
        "checkpoint": str(ckpt_path),
        "round": int(ckpt.get("round", 0)),
        "weights": opts.weights,
        "sampler": opts.sampler,
        "steps": opts.steps if opts.sampler == "ddim" else cfg.diffusion_steps,
        "num_samples": opts.num_samples,
        "seed": opts.seed,
        "dataset": cfg.dataset,
        "image_size": size,
        "num_train": len(train),
        "num_heldout": len(heldout),
        "taus": list(TAUS),
        "memorization": memorization,
        "null": null,
        "quality": quality,
        "timings": timings,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
    }

    t0 = time.perf_counter()
    from fl_ietagc.evaluation import report  # (matplotlib, as in prepare)

    r = ratios(nb)
    if memorization["mq_reliable"]:
        rule, flagged = f"MQ r < {opts.memorized_tau:g}", r["mq"] < opts.memorized_tau
    else:  # small training set: MQ is unreliable, use the 1/3 rule
        rule, flagged = "l2 1st / 2nd < 1/3 (MQ unreliable here)", r["gu"] < 1 / 3
    memorized_ids = np.unique(nb.index[:, 0].numpy()[flagged])
    loss_curves = _loss_curves(model, diffusion, train, memorized_ids, opts, device)
    figures = report.make_figures(
        out_dir / "report", run=run, samples=samples, train=train, nb=nb, mq=r["mq"], loss_curves=loss_curves
    )
    results["memorized_train_images"] = int(len(memorized_ids))
    results["memorized_rule"] = rule
    results["figures"] = {k: str(v) for k, v in figures.items()}
    timings["report_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_samples(out_dir / SAMPLES_FILE, samples, nb, nb_null)
    results["samples_file"] = str(out_dir / SAMPLES_FILE)
    atomic_write_json(out_dir / "results.json", results)
    report.write_html(out_dir / "report.html", results, figures)
    return results


SAMPLES_FILE = "samples.npz"


def save_samples(path: Path, samples: torch.Tensor, nb, nb_null=None) -> None:
    """The evaluation's raw material, so every metric can be recomputed without sampling again: the generated
    uint8 images, their k nearest training images (indices into the run's training set, all shards in id order)
    and exact squared distances (pixels in [0, 1]), and the same for the held-out real images (the null)."""
    arrays = {"samples": samples.numpy(), "index": nb.index.numpy(), "d2": nb.d2.numpy()}
    if nb_null is not None:
        arrays.update(null_index=nb_null.index.numpy(), null_d2=nb_null.d2.numpy())
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def load_samples(path: str | Path) -> dict[str, np.ndarray]:
    """What `save_samples` wrote (plain arrays; never unpickled)."""
    with np.load(path, allow_pickle=False) as blob:
        return {k: blob[k] for k in blob.files}


def _loss_curves(model, diffusion, train, memorized_ids, opts: EvalOptions, device) -> dict | None:
    """Loss by timestep for (up to loss_images) memorized and non-memorized training images (paper Fig. 2)."""
    rng = np.random.default_rng(opts.seed)
    others = np.setdiff1d(np.arange(len(train)), memorized_ids)
    groups = {
        "memorized": rng.permutation(memorized_ids)[: opts.loss_images],
        "not memorized": rng.permutation(others)[: opts.loss_images],
    }
    timesteps = np.unique(np.linspace(0, diffusion.num_timesteps - 1, 25).round().astype(int))
    curves = {}
    for name, ids in groups.items():
        if len(ids):
            losses = loss_by_timestep(
                model,
                diffusion,
                train[torch.from_numpy(ids)],
                timesteps,
                seed=opts.seed,
                device=device,
                batch_size=opts.batch_size,
            )
            curves[name] = {
                "n": len(ids),
                "mean": losses.mean(0),
                "p15": np.quantile(losses, 0.15, axis=0),
                "p85": np.quantile(losses, 0.85, axis=0),
            }
    return {"timesteps": timesteps, "groups": curves} if curves else None


def compute_quality_or_reason(samples, train, cfg, opts: EvalOptions, device, weights_path: str | None = None) -> dict:
    """FID etc. through torch-fidelity, or {"computed": False, "reason": ...} when it cannot be had.
    `weights_path` (the weights `prepare` verified) overrides opts.fid_weights."""
    if not opts.fid:
        return {"computed": False, "reason": "disabled (--no-fid)"}

    key = f"{cfg.dataset}-{image_size(cfg)}-n{len(train)}-{_tensor_digest(train)}"
    try:
        values = compute_quality(
            samples,
            train,
            reference_key=key,
            weights_path=weights_path or opts.fid_weights,
            metrics=tuple(opts.quality),
            device=str(device),
            batch_size=opts.batch_size,
        )
    except FidUnavailable as e:
        return {"computed": False, "reason": str(e)}
    return {"computed": True, **values}


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


RESULTS_KEYS = ("run", "kind", "memorization", "null", "quality")


def read_results(run_dir: str | Path) -> dict:
    """results.json of an evaluated run (or that file's path); a missing, corrupt or incomplete one raises an
    error naming it."""
    path = Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json; run `fl-ietagc evaluate {run_dir}` first")
    results = read_json(path, "evaluation results")
    if not isinstance(results, dict):
        raise ValueError(f"{path}: corrupt evaluation results (expected a JSON object, got {type(results).__name__})")
    needed = RESULTS_KEYS if results.get("model-type") != "latent-t2i" else RESULTS_KEYS[:-1]  # (no pixel quality)
    missing = [k for k in needed if k not in results]
    if missing:
        raise ValueError(f"{path}: incomplete evaluation results (no {', '.join(missing)}); evaluate the run again")
    return results
