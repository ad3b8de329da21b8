"""Evaluate a run directory: generate samples, measure memorization and quality, write results and report.

    fl-ietagc evaluate RUN_DIR [--num-samples N] [--sampler ddim|ddpm] [--steps 50] [--weights raw|ema]
                               [--round R] [--seed S] [--batch-size B] [--device auto|cpu|cuda] [--k 50]
                               [--fid-weights PATH] [--quality fid,kid] [--no-fid] [--out DIR]

Works for federated and centralized runs alike (same run-directory layout). Steps:
1. samples from the final (or round R's) global weights, raw by default (the paper evaluates raw weights),
   quantised to uint8 as saved images are;
2. one exact nearest-neighbour pass of the samples against the run's whole training set (all shards), and
   one of held-out real images (the null rate): MQ at every tau, the 1/3 rule, Carlini's rule;
3. FID (optionally IS/KID/precision-recall) through torch-fidelity against the training set, if Inception
   weights can be had; otherwise the report says why FID is missing;
4. the paper's figures and the run's per-round curves (fl_ietagc/report.py);
5. `results.json` and `report.html` (figures embedded) in the run directory (or --out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoints import atomic_write_json, load_checkpoint
from .rundir import RunDir
from .config import config_keys, parse_config
from .data import image_size, load_splits
from .diffusion import Diffusion, sample
from .memorization import TAUS, nearest_neighbours, ratios, summarize
from .models import build_for_config, load_weights
from .trainer import pick_device, to_model_range


@dataclass
class EvalOptions:
    num_samples: int = 1024
    sampler: str = "ddim"
    steps: int = 50
    weights: str = "raw"
    round: int | None = None
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    k: int = 50
    fid: bool = True
    fid_weights: str | None = None
    quality: tuple[str, ...] = ("fid",)
    memorized_tau: float = 0.2  # a training image is "memorized" if a sample with MQ r < this has it as NN
    # (where MQ is unreliable, i.e. the training set is small, the 1/3 rule decides instead)
    loss_images: int = 64  # per group (memorized / not) for the loss-by-timestep figure
    out: str | None = None

    def validate(self) -> None:
        problems = []
        if self.num_samples < 1:
            problems.append(f"--num-samples {self.num_samples}: must be >= 1")
        if self.sampler not in ("ddim", "ddpm"):
            problems.append(f"--sampler {self.sampler}: must be ddim or ddpm")
        if self.steps < 1:
            problems.append(f"--steps {self.steps}: must be >= 1")
        if self.weights not in ("raw", "ema"):
            problems.append(f"--weights {self.weights}: must be raw or ema")
        if self.k < 2:
            problems.append(f"--k {self.k}: must be >= 2")
        bad = set(self.quality) - {"fid", "isc", "kid", "prc"}
        if bad:
            problems.append(f"--quality {','.join(sorted(bad))}: must be among fid, isc, kid, prc")
        if problems:
            raise ValueError("; ".join(problems))


def load_run(run_dir: str | Path):
    """(RunDir, RunConfig, extra config.json fields) of a finished run directory."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a run directory (no config.json)")
    raw = run.read_config()
    known = {f.metadata["key"] for f in config_keys()}
    cfg = parse_config({k: v for k, v in raw.items() if k in known})
    return run, cfg, {k: v for k, v in raw.items() if k not in known}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], as writing a PNG would."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def loss_by_timestep(model, diffusion: Diffusion, images: torch.Tensor, timesteps: np.ndarray, *, seed: int,
                     device, batch_size: int = 256) -> np.ndarray:
    """(n_images, n_timesteps) per-sample epsilon loss, fixed noise per (image, timestep), model in eval mode."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = np.zeros((images.shape[0], len(timesteps)))
    for j, t in enumerate(timesteps):
        for s in range(0, images.shape[0], batch_size):
            x0 = to_model_range(images[s:s + batch_size].to(device))
            noise = torch.randn(x0.shape, generator=gen, device=device)
            tt = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            out[s:s + batch_size, j] = diffusion.per_sample_loss(model, x0, tt, noise).cpu().numpy()
    return out


def evaluate_run(run_dir: str | Path, opts: EvalOptions, progress: bool = True) -> dict:
    opts.validate()
    run, cfg, meta = load_run(run_dir)
    out_dir = Path(opts.out) if opts.out else run.path
    device = pick_device(opts.device)
    timings: dict[str, float] = {}
    ckpt_path = run.checkpoint(opts.round) if opts.round else run.final_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    model = build_for_config(cfg)
    load_weights(model, ckpt["net" if opts.weights == "raw" else "ema"], f"{ckpt_path} ({opts.weights})")
    model.to(device).eval()
    splits = load_splits(cfg)
    train, heldout = splits.train.images, splits.heldout.images
    diffusion = Diffusion(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end)
    size, channels = image_size(cfg), splits.train.channels

    t0 = time.perf_counter()
    samples = to_uint8(sample(model, diffusion, opts.num_samples, (channels, size, size), sampler=opts.sampler,
                              steps=opts.steps, seed=opts.seed, batch_size=opts.batch_size, device=device,
                              progress=progress))
    timings["sampling_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    nb = nearest_neighbours(samples, train, opts.k, device=device, progress=progress)
    nb_null = nearest_neighbours(heldout, train, opts.k, device=device)
    timings["nearest_neighbours_s"] = time.perf_counter() - t0
    memorization = summarize(nb, len(train))
    null = summarize(nb_null, len(train))

    t0 = time.perf_counter()
    quality = compute_quality_or_reason(samples, train, cfg, opts, device)
    timings["quality_s"] = time.perf_counter() - t0

    results = {
        "run": str(run.path), "kind": meta.get("kind", "unknown"), "checkpoint": str(ckpt_path),
        "round": int(ckpt.get("round", 0)), "weights": opts.weights, "sampler": opts.sampler,
        "steps": opts.steps if opts.sampler == "ddim" else cfg.diffusion_steps, "num_samples": opts.num_samples,
        "seed": opts.seed, "dataset": cfg.dataset, "image_size": size, "num_train": len(train),
        "num_heldout": len(heldout), "taus": list(TAUS), "memorization": memorization, "null": null,
        "quality": quality, "timings": timings, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                            for k, v in dataclasses.asdict(opts).items()},
    }

    t0 = time.perf_counter()
    from . import report  # matplotlib is imported only when a report is made

    r = ratios(nb)
    if memorization["mq_reliable"]:
        rule, flagged = f"MQ r < {opts.memorized_tau:g}", r["mq"] < opts.memorized_tau
    else:  # small training set: MQ is unreliable, use the 1/3 rule
        rule, flagged = "l2 1st / 2nd < 1/3 (MQ unreliable here)", r["gu"] < 1 / 3
    memorized_ids = np.unique(nb.index[:, 0].numpy()[flagged])
    loss_curves = _loss_curves(model, diffusion, train, memorized_ids, opts, device)
    figures = report.make_figures(out_dir / "report", run=run, samples=samples, train=train, nb=nb, mq=r["mq"],
                                  loss_curves=loss_curves)
    results["memorized_train_images"] = int(len(memorized_ids))
    results["memorized_rule"] = rule
    results["figures"] = {k: str(v) for k, v in figures.items()}
    timings["report_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    report.write_html(out_dir / "report.html", results, figures)
    return results


def _loss_curves(model, diffusion, train, memorized_ids, opts: EvalOptions, device) -> dict | None:
    """Loss by timestep for (up to loss_images) memorized and non-memorized training images (paper Fig. 2)."""
    rng = np.random.default_rng(opts.seed)
    others = np.setdiff1d(np.arange(len(train)), memorized_ids)
    groups = {"memorized": rng.permutation(memorized_ids)[:opts.loss_images],
              "not memorized": rng.permutation(others)[:opts.loss_images]}
    timesteps = np.unique(np.linspace(0, diffusion.num_timesteps - 1, 25).round().astype(int))
    curves = {}
    for name, ids in groups.items():
        if len(ids):
            losses = loss_by_timestep(model, diffusion, train[torch.from_numpy(ids)], timesteps, seed=opts.seed,
                                      device=device, batch_size=opts.batch_size)
            curves[name] = {"n": len(ids), "mean": losses.mean(0), "p15": np.quantile(losses, 0.15, axis=0),
                            "p85": np.quantile(losses, 0.85, axis=0)}
    return {"timesteps": timesteps, "groups": curves} if curves else None


def compute_quality_or_reason(samples, train, cfg, opts: EvalOptions, device) -> dict:
    """FID etc. through torch-fidelity, or {"computed": False, "reason": ...} when it cannot be had."""
    if not opts.fid:
        return {"computed": False, "reason": "disabled (--no-fid)"}
    from .fid import FidUnavailable, compute_quality

    key = f"{cfg.dataset}-{image_size(cfg)}-n{len(train)}-{_tensor_digest(train)}"
    try:
        values = compute_quality(samples, train, reference_key=key, weights_path=opts.fid_weights,
                                 metrics=tuple(opts.quality), device=str(device), batch_size=opts.batch_size)
    except FidUnavailable as e:
        return {"computed": False, "reason": str(e)}
    return {"computed": True, **values}


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json; run `fl-ietagc evaluate {run_dir}` first")
    return json.loads(path.read_text())
