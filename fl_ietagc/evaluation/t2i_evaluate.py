"""Evaluate a text-to-image run (model-type = latent-t2i): generate from its training captions, score copying.

    fl-ietagc evaluate RUN_DIR [--num-captions 256] [--seeds-per-caption 4] [--steps 50] [--guidance-scale 7.5]
                               [--weights raw|ema] [--round R] [--seed S] [--batch-size B] [--device auto|cpu|cuda]
                               [--sscd SSCD.torchscript.pt] [--clip-dir CLIP_DIR] [--out DIR]

0. `prepare_t2i` checks every option and the run directory before any sampling (completed run or saved round,
   checkpoint, --out writable, the SSCD and CLIP files, pretrained-dir, the caption data): one line naming the option
   or the file;
1. the run's UNet (final or round R's, raw or EMA weights) in pretrained-dir's parts; DDIM with classifier-free
   guidance from `--num-captions` training captions (a subset drawn with --seed; 0 = all) x `--seeds-per-caption`,
   at the run's image size, on the run's noise schedule (`Diffusion.for_config`);
2. each generation's nearest training image (the training pairs rebuilt with `captioned_splits`) under the primary
   embedder (SSCD with --sscd, else latent-cosine) and always pixel-cosine: top-1 similarity, the fraction above the
   threshold, the fraction whose nearest image is the one its caption belongs to; the same for the held-out real
   images (the null rate, as the pixel path reports one); every score names its embedder;
3. CLIP score of the generations against their captions with --clip-dir, else "not measured" (never 0);
4. `results.json` ("model-type": "latent-t2i"; "memorization" and "null" are the primary embedder's,
   "by_embedder" every embedder's with its most similar generations), `samples.npz` (uint8 generations, caption
   indices into the training set, nearest indices and similarities per embedder, for generations and the null),
   `report/similar_pairs.png` and `report.html`, each written atomically into the run directory (or --out).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_ietagc.data.captions import CaptionedImages, captioned_splits
from fl_ietagc.data.datasets import image_size
from fl_ietagc.data.latent import DTYPES, LatentParts, load_components, vae_factor
from fl_ietagc.evaluation.evaluate import load_run, output_dir, select_checkpoint, shared_problems
from fl_ietagc.evaluation.t2i_eval import (
    ClipScorer,
    CopyScores,
    LatentEmbedder,
    PixelEmbedder,
    SSCDEmbedder,
    memorization_scores,
    sample_from_captions,
    similar_pairs_grid,
)
from fl_ietagc.runs.checkpoints import atomic_write_bytes, atomic_write_json
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.diffusion import Diffusion
from fl_ietagc.training.lora import add_lora
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.trainer import pick_device

MODEL_TYPE = "latent-t2i"
SAMPLES_FILE = "samples.npz"


@dataclass
class T2IOptions:
    num_captions: int = 256  # training captions generated from (a seeded subset); 0 = all
    seeds_per_caption: int = 4
    steps: int = 50
    guidance_scale: float = 7.5
    weights: str = "raw"
    server_round: int | None = None  # --round
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    sscd: str | None = None  # SSCD TorchScript file; None = the latent-cosine fallback
    clip_dir: str | None = None  # local CLIP folder; None = CLIP score not measured
    out: str | None = None

    def validate(self) -> None:
        """The checks that need no run directory; every problem found, on one line, naming the option."""
        problems = []
        if self.num_captions < 0:
            problems.append(f"--num-captions {self.num_captions}: must be >= 0 (0 = every training caption)")
        if self.seeds_per_caption < 1:
            problems.append(f"--seeds-per-caption {self.seeds_per_caption}: must be >= 1")
        if not math.isfinite(self.guidance_scale):
            problems.append(f"--guidance-scale {self.guidance_scale}: must be a finite number")
        problems += shared_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def run_model_type(run_dir: str | Path) -> str:
    """The run's model-type from its config.json as stored ("pixel" when absent, or when there is no config.json:
    the pixel path then says the directory is not a run)."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        return "pixel"
    raw = run.read_config()  # ValueError naming config.json if it is not JSON
    return raw.get("model-type", "pixel") if isinstance(raw, dict) else "pixel"


@dataclass
class T2IPlan:
    """Everything `evaluate_t2i` needs, checked and loaded before any sampling (see `prepare_t2i`)."""

    run: RunDir
    cfg: object
    meta: dict
    ckpt_path: Path
    ckpt: dict
    parts: LatentParts  # the run's UNet weights loaded
    schedule: Diffusion
    latent_size: int
    train: CaptionedImages
    heldout: CaptionedImages
    chosen: np.ndarray  # training indices of the captions generated from
    device: torch.device
    out_dir: Path
    embedder: object  # SSCDEmbedder or LatentEmbedder
    clip: ClipScorer | None


def prepare_t2i(run_dir: str | Path, opts: T2IOptions) -> T2IPlan:
    """Check every option and the run directory, then load the parts, weights and pairs: ValueError /
    FileNotFoundError with one line naming the option or the file."""
    opts.validate()
    run, cfg, meta = load_run(run_dir)
    if cfg.model_type != MODEL_TYPE:
        raise ValueError(f"{run.config_path}: model-type = {cfg.model_type!r}, not a {MODEL_TYPE} run")
    ckpt_path, ckpt, state = select_checkpoint(run, opts.server_round, opts.weights)
    schedule = Diffusion.for_config(cfg)
    if opts.steps > schedule.num_timesteps:
        raise ValueError(f"--steps {opts.steps}: must be <= {schedule.num_timesteps} (the run's diffusion timesteps)")
    out_dir = output_dir(run, opts.out)
    device = pick_device(opts.device)
    try:
        embedder = SSCDEmbedder(opts.sscd, device) if opts.sscd else None
    except ConfigError as e:
        raise ValueError(f"--sscd: {e}") from None
    try:
        clip = ClipScorer(opts.clip_dir, device) if opts.clip_dir else None
    except ConfigError as e:
        raise ValueError(f"--clip-dir: {e}") from None
    try:
        parts = load_components(cfg.pretrained_dir, DTYPES[cfg.frozen_dtype])
        size, factor = image_size(cfg), vae_factor(cfg.pretrained_dir)
        train, heldout = captioned_splits(cfg.data_root, size, cfg.max_images, cfg.holdout_fraction)
    except ConfigError as e:
        raise ValueError(f"{run.config_path}: {e}") from None
    if cfg.lora_rank:  # a LoRA run's checkpoints hold its adapters: into the pretrained UNet they go
        parts = dataclasses.replace(parts, unet=add_lora(parts.unet, cfg))
    load_weights(parts.unet, state, f"{ckpt_path} ({opts.weights})")
    n = len(train)
    chosen = (
        np.arange(n)
        if opts.num_captions == 0 or opts.num_captions >= n
        else np.sort(np.random.default_rng(opts.seed).choice(n, opts.num_captions, replace=False))
    )
    return T2IPlan(
        run=run,
        cfg=cfg,
        meta=meta,
        ckpt_path=ckpt_path,
        ckpt=ckpt,
        parts=parts,
        schedule=schedule,
        latent_size=size // factor,
        train=train,
        heldout=heldout,
        chosen=chosen,
        device=device,
        out_dir=out_dir,
        embedder=embedder or LatentEmbedder(parts, device, opts.batch_size),
        clip=clip,
    )


def copy_scores(
    generated: torch.Tensor, caption_index: np.ndarray, train: torch.Tensor, heldout: torch.Tensor, embedder
) -> tuple[CopyScores, CopyScores | None]:
    """(scores of the generations, of the held-out real images = the null, None without any): one embedding pass
    over the training set for both."""
    n = len(generated)
    s = memorization_scores(
        torch.cat([generated, heldout]), np.concatenate([caption_index, np.full(len(heldout), -1)]), train, embedder
    )

    def part(rows: slice) -> CopyScores:
        return CopyScores(s.embedder, s.similarity[rows], s.nearest[rows], s.own_caption[rows], s.threshold)

    return part(slice(0, n)), (part(slice(n, None)) if len(heldout) else None)


def null_summary(null: CopyScores | None, embedder: str) -> dict:
    """The held-out images' summary (no caption of theirs was trained on, so no own-caption fraction)."""
    if null is None:
        return {"embedder": embedder, "measured": False, "reason": "holdout-fraction = 0: no held-out images"}
    s = null.summary()
    del s["fraction_nearest_own_caption"]
    s["num_heldout"] = s.pop("num_generations")
    return s


def most_similar(scores: CopyScores, caption_index: np.ndarray, train: CaptionedImages, n: int = 8) -> list[dict]:
    """The `n` generations most similar to a training image (descending, as the pairs grid): which generation,
    its caption, its nearest training image and whether that is its caption's own image."""
    order = np.argsort(-scores.similarity, kind="stable")[:n]
    return [
        {
            "generation": int(k),
            "caption_index": int(caption_index[k]),
            "caption": train.captions[caption_index[k]],
            "nearest": int(scores.nearest[k]),
            "nearest_file": train.files[scores.nearest[k]],
            "similarity": float(scores.similarity[k]),
            "own_caption": bool(scores.own_caption[k]),
        }
        for k in order
    ]


def evaluate_t2i(run_dir: str | Path, opts: T2IOptions, progress: bool = True, plan: T2IPlan | None = None) -> dict:
    """Evaluate a latent-t2i run (see the module docstring). `plan` is `prepare_t2i(run_dir, opts)`, made here if
    not given: every check runs before any sampling."""
    plan = plan or prepare_t2i(run_dir, opts)
    train, heldout, out_dir = plan.train, plan.heldout, plan.out_dir
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generated, index = sample_from_captions(
        plan.parts,
        plan.schedule,
        [train.captions[i] for i in plan.chosen],
        opts.seeds_per_caption,
        steps=opts.steps,
        guidance_scale=opts.guidance_scale,
        seed=opts.seed,
        device=plan.device,
        batch_size=opts.batch_size,
        latent_size=plan.latent_size,
        progress=progress,
    )
    caption_index = plan.chosen[index.numpy()]
    timings["sampling_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    arrays = {"samples": generated.numpy(), "caption_index": caption_index}
    by_embedder, primary = {}, None
    for embedder in (plan.embedder, PixelEmbedder()):  # the primary score first
        gen, null = copy_scores(generated, caption_index, train.images, heldout.images, embedder)
        if primary is None:
            primary = gen
        by_embedder[gen.embedder] = {
            "generated": gen.summary(),
            "null": null_summary(null, gen.embedder),
            "most_similar": most_similar(gen, caption_index, train),
        }
        tag = gen.embedder.replace("-", "_")
        arrays.update({f"nearest_{tag}": gen.nearest, f"similarity_{tag}": gen.similarity})
        if null is not None:
            arrays.update({f"null_nearest_{tag}": null.nearest, f"null_similarity_{tag}": null.similarity})
    timings["scores_s"] = time.perf_counter() - t0

    clip_score = "not measured (no --clip-dir)"
    if plan.clip is not None:
        t0 = time.perf_counter()
        scores = plan.clip(generated, [train.captions[i] for i in caption_index], opts.batch_size)
        arrays["clip_score"] = scores.numpy()
        clip_score = float(scores.mean())
        timings["clip_s"] = time.perf_counter() - t0

    headline = by_embedder[primary.embedder]
    results = {
        "model-type": MODEL_TYPE,
        "run": str(plan.run.path),
        "kind": plan.meta.get("kind", "unknown"),
        "checkpoint": str(plan.ckpt_path),
        "round": int(plan.ckpt.get("round", 0)),
        "weights": opts.weights,
        "sampler": "ddim",
        "steps": opts.steps,
        "guidance_scale": opts.guidance_scale,
        "seed": opts.seed,
        "num_captions": len(plan.chosen),
        "seeds_per_caption": opts.seeds_per_caption,
        "num_generations": len(generated),
        "image_size": int(train.images.shape[-1]),
        "num_train": len(train),
        "num_heldout": len(heldout),
        "pretrained_dir": plan.cfg.pretrained_dir,
        "embedder": primary.embedder,
        "memorization": headline["generated"],
        "null": headline["null"],
        "by_embedder": by_embedder,
        "clip_score": clip_score,
        "clip_dir": opts.clip_dir,
        "timings": timings,
        "options": dataclasses.asdict(opts),
    }
    figures = {
        "similar_pairs": similar_pairs_grid(
            generated,
            train.images,
            primary.nearest,
            primary.similarity,
            out_dir / "report" / "similar_pairs.png",
            metric=primary.embedder,
        )
    }
    results["figures"] = {k: str(v) for k, v in figures.items()}
    results["samples_file"] = str(out_dir / SAMPLES_FILE)
    atomic_write_bytes(out_dir / SAMPLES_FILE, lambda f: np.savez(f, **arrays))
    atomic_write_json(out_dir / "results.json", results)
    write_report(out_dir / "report.html", results, figures)
    return results


def report_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, generated, held-out real = null) rows: every embedder's scores, then the CLIP score."""
    rows = []
    for name, scores in results["by_embedder"].items():
        gen, null = scores["generated"], scores["null"]
        measured = null.get("measured", True)

        def both(fmt):
            return fmt(gen), (fmt(null) if measured else "not measured")

        rows += [
            (f"{name}: mean top-1 similarity", *both(lambda s: f"{s['mean_top1']:.4f}")),
            (f"{name}: 95th percentile top-1", *both(lambda s: f"{s['q95_top1']:.4f}")),
            (
                f"{name}: similarity > {gen['threshold']}",
                *both(lambda s: f"{s['count_above']} ({100 * s['fraction_above']:.2f}%)"),
            ),
            (f"{name}: nearest is its caption's own image", f"{100 * gen['fraction_nearest_own_caption']:.2f}%", ""),
        ]
    clip = results["clip_score"]
    rows.append(("CLIP score (mean)", f"{clip:.2f}" if isinstance(clip, float) else clip, ""))
    return rows


def write_report(path: Path, results: dict, figures: dict[str, Path]) -> Path:
    """report.html in report.py's layout: the settings, notes, the score table, the figures."""
    from fl_ietagc.evaluation.report import write_page  # (matplotlib)

    notes = []
    if results["embedder"] != "sscd":
        notes.append(
            f"No --sscd model was given: the primary score is {results['embedder']}, a fallback; its "
            f"threshold is SSCD's (0.5 for copies), not calibrated for it. Compare with the null column."
        )
    if not results["null"].get("measured", True):
        notes.append("No null rate: " + results["null"]["reason"])
    if not isinstance(results["clip_score"], float):
        notes.append(f"CLIP score {results['clip_score']}.")
    info = (
        f"{results['num_generations']} generations ({results['num_captions']} training captions x "
        f"{results['seeds_per_caption']} seeds), DDIM {results['steps']} steps, guidance scale "
        f"{results['guidance_scale']}, {results['weights']} weights of round {results['round']} "
        f"({results['checkpoint']}), seed {results['seed']}; {results['num_train']} training pairs, "
        f"{results['num_heldout']} held-out, {results['image_size']} px"
    )
    return write_page(path, results, info, notes, report_rows(results), figures)
