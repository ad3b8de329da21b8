"""Sampling and memorization evaluation of the text-conditional latent model (fl_ietagc/data/latent.py).

- `sample_from_captions`: DDIM samples for every (caption, seed), decoded through the VAE to uint8, with optional
  classifier-free guidance against the empty caption.
- `memorization_scores`: each generation's nearest training image by cosine similarity of embeddings, from
  `SSCDEmbedder` (a local TorchScript SSCD model), or the fallbacks `PixelEmbedder` and `LatentEmbedder`. Every
  result names its embedder ("sscd", "pixel-cosine", "latent-cosine"), so a fallback is never reported as SSCD.
- `ClipScorer` / `clip_score`: CLIP score of images against their captions, from a local CLIP folder.
- `similar_pairs_grid`: the most similar (generation, nearest training image) pairs as one PNG (written
  atomically).
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from fl_ietagc.data.latent import LatentParts
from fl_ietagc.data.pixels import to_model_range, to_uint8, uint8_to_unit_range
from fl_ietagc.runs.checkpoints import atomic_write_bytes
from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.diffusion import Diffusion

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ddim_for(schedule: Diffusion | Mapping) -> DDIMScheduler:
    """diffusers' DDIMScheduler (eta = 0) on the training schedule's betas, without x0 clipping.

    DDIMScheduler is what `diffusion.sample` uses, built from the same `scheduler_config` as the training loss's
    DDPMScheduler, so sampler and training read the same alphas_cumprod. `schedule` is the run's `Diffusion`
    (final step to alpha_bar = 1, as `diffusion.sample`) or a diffusers scheduler config (e.g. a checkpoint's
    scheduler/scheduler_config.json, which also carries its prediction type). Clipping the predicted x0 to [-1, 1]
    is for pixels; latents are not bounded, so it is off.
    """
    if isinstance(schedule, Diffusion):
        return DDIMScheduler(**{**schedule.scheduler_config, "clip_sample": False}, set_alpha_to_one=True)
    return DDIMScheduler.from_config({**schedule, "clip_sample": False})


def image_seed(seed: int, caption_index: int, sample_index: int) -> int:
    """The initial-noise seed of image (caption i, sample j): not the batch size's or the device's."""
    return int(np.random.SeedSequence([seed, caption_index, sample_index]).generate_state(1)[0])


@torch.no_grad()
def text_embeddings(parts: LatentParts, captions: list[str], device) -> torch.Tensor:
    """(N, L, D) float32: the text encoder's last hidden states, padded to the tokenizer's length as `encode`."""
    ids = parts.tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=parts.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    return parts.text_encoder.to(device)(ids.to(device)).last_hidden_state.float()


@torch.no_grad()
def sample_from_captions(
    parts: LatentParts,
    schedule: Diffusion | Mapping,
    captions: list[str],
    seeds_per_caption: int = 1,
    *,
    steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    latent_size: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, H, W), caption index (N,) int64), N = len(captions) x seeds_per_caption, caption-major.

    Image (i, j) starts from noise seeded by `image_seed(seed, i, j)` (drawn on the CPU), so it is the same whatever
    the batch. `guidance_scale` g != 1: eps = eps(empty) + g (eps(caption) - eps(empty)); at 1 the empty caption is
    not run. `latent_size`: side of the latents (a run's image-size / the VAE's factor; default the UNet's
    sample_size). `progress`: a tqdm bar, one tick per denoising step of a batch.
    """
    if not captions or seeds_per_caption < 1:
        raise ValueError(f"nothing to sample: {len(captions)} captions x {seeds_per_caption} seeds")
    sched = ddim_for(schedule)
    sched.set_timesteps(steps)
    unet = parts.unet.to(device)
    was_training = unet.training
    unet.eval()
    guided = guidance_scale != 1.0
    empty = text_embeddings(parts, [""], device) if guided else None
    jobs = [(i, j) for i in range(len(captions)) for j in range(seeds_per_caption)]
    shape = parts.latent_shape if latent_size is None else (parts.latent_shape[0], latent_size, latent_size)
    out = []
    bar = None
    if progress:
        bar = tqdm(
            total=-(-len(jobs) // batch_size) * len(sched.timesteps),
            unit="step",
            desc=f"sampling {len(jobs)} ({len(captions)} captions x {seeds_per_caption})",
        )
    try:
        for s in range(0, len(jobs), batch_size):
            batch = jobs[s : s + batch_size]
            cond = text_embeddings(parts, [captions[i] for i, _ in batch], device)
            if guided:
                cond = torch.cat([empty.expand_as(cond), cond])
            x = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i, j))) for i, j in batch]
            ).to(device)
            for t in sched.timesteps:
                eps = unet(torch.cat([x, x]) if guided else x, t.to(device), encoder_hidden_states=cond).sample
                if guided:
                    uncond, conditional = eps.float().chunk(2)
                    eps = uncond + guidance_scale * (conditional - uncond)
                x = sched.step(eps.float(), t, x, eta=0.0).prev_sample
                if bar is not None:
                    bar.update(1)
            out.append(decode(parts, x))
    finally:
        if bar is not None:
            bar.close()
        unet.train(was_training)
    index = torch.tensor([i for i, _ in jobs], dtype=torch.long)
    return torch.cat(out), index


@torch.no_grad()
def decode(parts: LatentParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as `encode` makes them) -> uint8 images on the CPU."""
    vae = parts.vae.to(latents.device)
    dtype = next(vae.parameters()).dtype
    return to_uint8(vae.decode((latents / parts.scaling_factor).to(dtype)).sample.float().cpu())


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) float32 with unit L2 rows."""
    return torch.nn.functional.normalize(x.reshape(x.shape[0], -1).float(), dim=1)


class PixelEmbedder:
    """Fallback: the flattened [-1, 1] pixels, L2-normalised."""

    name = "pixel-cosine"

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return _unit_rows(to_model_range(images_uint8))


class LatentEmbedder:
    """Fallback: the VAE posterior means, flattened and L2-normalised."""

    name = "latent-cosine"

    def __init__(self, parts: LatentParts, device: str | torch.device = "cpu", batch_size: int = 32):
        self.parts, self.device, self.batch_size = parts, device, batch_size

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        vae = self.parts.vae.to(self.device)
        dtype = next(vae.parameters()).dtype
        out = [
            vae.encode(to_model_range(images_uint8[s : s + self.batch_size].to(self.device)).to(dtype))
            .latent_dist.mean.float()
            .cpu()
            for s in range(0, images_uint8.shape[0], self.batch_size)
        ]
        return _unit_rows(torch.cat(out))


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript's constants.pkl (torch.save archives have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


class SSCDEmbedder:
    """SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) from a local `*.torchscript.pt` of SSCD's release.

    Loaded with torch.jit.load: a TorchScript archive holds TorchScript code and tensors, no pickled Python
    objects. Preprocessing is SSCD README's batched one ("skew_320"): resize to `size` x `size` (bilinear,
    antialiased), ImageNet mean/std. Descriptors are L2-normalised.
    """

    name = "sscd"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", size: int = 320, batch_size: int = 32):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"SSCD model {str(p)!r}: not found (a local *.torchscript.pt from SSCD's release)")
        if not _is_torchscript(p):
            raise ConfigError(f"SSCD model {str(p)!r}: not a TorchScript archive (SSCD's *.torchscript.pt files are)")
        try:
            with warnings.catch_warnings():
                # SSCD is released only as TorchScript, so torch's deprecation of torch.jit.load is nothing a user
                # can act on here; the day torch removes it, this line fails loudly instead
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
                self.model = torch.jit.load(str(p), map_location=device).eval()
        except RuntimeError as e:
            raise ConfigError(f"SSCD model {str(p)!r}: cannot be loaded ({' '.join(str(e).split())[:200]})") from None
        self.device, self.size, self.batch_size = device, size, batch_size

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(
            uint8_to_unit_range(images_uint8),
            size=(self.size, self.size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = [
            self.model(self.preprocess(images_uint8[s : s + self.batch_size]).to(self.device)).float().cpu()
            for s in range(0, images_uint8.shape[0], self.batch_size)
        ]
        return _unit_rows(torch.cat(out))


@dataclass
class CopyScores:
    embedder: str  # "sscd", "pixel-cosine" or "latent-cosine"
    similarity: np.ndarray  # (N,) cosine similarity to the nearest training image
    nearest: np.ndarray  # (N,) its index in the training set
    own_caption: np.ndarray  # (N,) bool: the nearest is the training image whose caption prompted the generation
    threshold: float

    def summary(self) -> dict:
        """JSON-ready: mean and 95th percentile of the top-1 similarity, how many are above the threshold."""
        n = len(self.similarity)
        above = int(np.count_nonzero(self.similarity > self.threshold))
        return {
            "embedder": self.embedder,
            "num_generations": n,
            "threshold": self.threshold,
            "mean_top1": float(self.similarity.mean()) if n else 0.0,
            "q95_top1": float(np.quantile(self.similarity, 0.95)) if n else 0.0,
            "count_above": above,
            "fraction_above": above / n if n else 0.0,
            "fraction_nearest_own_caption": float(self.own_caption.mean()) if n else 0.0,
        }


def memorization_scores(
    generated_uint8: torch.Tensor,
    gen_caption_idx,
    train_uint8: torch.Tensor,
    embedder,
    threshold: float = 0.5,
    chunk: int = 1024,
) -> CopyScores:
    """Nearest training image of each generation by embedding cosine similarity (exact, all pairs).

    `gen_caption_idx[k]`: the training index of the image whose caption prompted generation k (the caption index
    of `sample_from_captions` when it was given the training captions). `embedder(images_uint8)` -> unit rows, with
    a `name`. `threshold`: SSCD papers count similarity > 0.5 as a copy.
    """
    train = embedder(train_uint8)
    gen = embedder(generated_uint8)
    sims, idx = [], []
    for s in range(0, gen.shape[0], chunk):
        best = (gen[s : s + chunk] @ train.T).clamp_(-1, 1).max(dim=1)
        sims.append(best.values)
        idx.append(best.indices)
    similarity = torch.cat(sims).numpy() if sims else np.zeros(0, np.float32)
    nearest = torch.cat(idx).numpy() if idx else np.zeros(0, np.int64)
    return CopyScores(embedder.name, similarity, nearest, nearest == np.asarray(gen_caption_idx), threshold)


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) CLIP score = 100 x max(cos(image, text), 0) (Hessel et al. 2021, w = 100 as torchmetrics)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=1)
    return 100 * cos.clamp(min=0)


class ClipScorer:
    """CLIP score of images against their captions, with the CLIPModel + CLIPProcessor in `clip_dir` (local files
    only, safetensors only); a missing or unloadable folder raises ConfigError naming it."""

    def __init__(self, clip_dir: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        d = Path(clip_dir)
        if not d.is_dir() or not list(d.glob("*.safetensors")):
            raise ConfigError(
                f"CLIP directory {str(d)!r}: "
                f"{'no .safetensors weights' if d.is_dir() else 'not a directory'} (a local CLIPModel "
                f"and CLIPProcessor saved with save_pretrained)"
            )
        try:
            self.model = CLIPModel.from_pretrained(d, use_safetensors=True, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"CLIP directory {str(d)!r}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, captions: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N,) CLIP score of image k against caption k."""
        out = []
        for s in range(0, len(captions), batch_size):
            images = [im.permute(1, 2, 0).numpy() for im in images_uint8[s : s + batch_size]]
            inputs = self.processor(
                text=captions[s : s + batch_size], images=images, return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            res = self.model(**inputs)
            out.append(clip_score_from_embeddings(res.image_embeds, res.text_embeds).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def clip_score(
    images_uint8: torch.Tensor,
    captions: list[str],
    clip_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> torch.Tensor:
    """(N,) CLIP score of each image against its caption, with the CLIP in `clip_dir` (see `ClipScorer`)."""
    return ClipScorer(clip_dir, device)(images_uint8, captions, batch_size)


def similar_pairs_grid(
    generated: torch.Tensor,
    train: torch.Tensor,
    nearest_idx,
    scores,
    path: str | Path,
    n: int = 8,
    metric: str = "similarity",
) -> Path:
    """PNG of the `n` generations most similar to a training image (descending), each beside its nearest
    training image; titles give the score, named by `metric` (e.g. the embedder's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, nearest_idx = np.asarray(scores), np.asarray(nearest_idx)
    order = np.argsort(-scores, kind="stable")[:n]
    fig, axes = plt.subplots(max(len(order), 1), 2, figsize=(4, 2 * max(len(order), 1)), squeeze=False)
    for row, k in zip(axes, order):
        j = int(nearest_idx[k])
        for ax, image, title in (
            (row[0], generated[k], f"gen {k}: {metric} {scores[k]:.3f}"),
            (row[1], train[j], f"train {j}"),
        ):
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    path = Path(path)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
