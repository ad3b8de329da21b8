"""The latent text-to-image model's parts: a UNet2DConditionModel that trains, and a frozen VAE, CLIP text encoder
and tokenizer whose outputs are computed once per dataset and cached.

- `load_components(DIR)` reads a local Stable Diffusion checkpoint in diffusers' layout (`unet/`, `vae/`,
  `text_encoder/`, `tokenizer/`, `scheduler/`), e.g. a local copy of SD 2.1 base: local files only, safetensors only
  (a `.bin` pickle is refused, never unpickled), frozen parts in bf16 on request. Errors name the folder.
- `tiny_components()` builds random, tiny versions of the same four classes from small configs (a 2-level UNet, a
  2-level VAE, a 2-layer CLIP text model, a character-level CLIP tokenizer), so the whole path runs on a CPU in
  seconds without a download; `save_components` writes them in the same layout, so tests exercise the loader.
- `encode(parts, data)`: VAE latents (the posterior mean x scaling factor, deterministic) and the text encoder's
  last hidden states for every image/caption; `cached_encoding` keeps them under `$FL_IETAGC_CACHE/latents/`,
  keyed by the frozen parts' file digests (`frozen_parts_key`, hashed once per process) and the data, so every
  round of every client reuses them; `training_pairs(cfg)` gives them for a run's training set.
- `Diffusion.per_sample_loss(unet, latents, t, noise, cond=text_embeddings)` is the per-sample loss on latents;
  AGC's memory bank and skip rule apply to it unchanged (`fl_ietagc/training/agc.py`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_ietagc.data.datasets import load_splits
from fl_ietagc.data.pixels import to_model_range
from fl_ietagc.runs.checkpoints import load_torch, save_torch
from fl_ietagc.settings.cache import cache_root
from fl_ietagc.settings.config import ConfigError

PARTS = ("unet", "vae", "text_encoder", "tokenizer")
TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class LatentParts:
    unet: torch.nn.Module  # diffusers UNet2DConditionModel (trains)
    vae: torch.nn.Module  # diffusers AutoencoderKL (frozen)
    text_encoder: torch.nn.Module  # transformers CLIPTextModel (frozen)
    tokenizer: object  # transformers CLIPTokenizer

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)


def tiny_components(seed: int = 0, image_size: int = 16, vocab_chars: str = TINY_CHARS) -> LatentParts:
    """Random tiny parts of the real classes (about 1M parameters in all): latents 4 x size/2 x size/2."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in vocab_chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return _frozen(LatentParts(unet, vae, text, tokenizer), torch.float32)


def save_components(parts: LatentParts, directory: str | Path) -> Path:
    """diffusers' layout: unet/, vae/, text_encoder/ (safetensors) and tokenizer/."""
    d = Path(directory)
    parts.unet.save_pretrained(d / "unet", safe_serialization=True)
    parts.vae.save_pretrained(d / "vae", safe_serialization=True)
    with _no_transformers_bars():  # a "Writing model shards" bar for a few kB
        parts.text_encoder.save_pretrained(d / "text_encoder", safe_serialization=True)
    parts.tokenizer.save_pretrained(d / "tokenizer")
    return d


def check_components_dir(directory: str | Path) -> Path:
    """The checkpoint folder has every part, each with safetensors weights; one line naming what is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(
            f"pretrained-dir = {str(d)!r}: not a directory (a local Stable Diffusion checkpoint in "
            f"diffusers' layout: {', '.join(p + '/' for p in PARTS)})"
        )
    for part in PARTS:
        sub = d / part
        if not sub.is_dir():
            raise ConfigError(f"pretrained-dir = {str(d)!r}: no {part}/ folder")
        if part != "tokenizer" and not list(sub.glob("*.safetensors")):
            pickles = [p.name for p in sub.glob("*.bin")]
            hint = (
                f" (found {', '.join(pickles)}: pickled weights are refused; convert them to safetensors)"
                if pickles
                else ""
            )
            raise ConfigError(f"pretrained-dir = {str(d)!r}: {part}/ has no .safetensors weights{hint}")
    return d


def load_components(directory: str | Path, frozen_dtype: torch.dtype = torch.float32) -> LatentParts:
    """The four parts from a local folder: local files only, safetensors only; VAE and text encoder frozen
    (eval, no grad) in `frozen_dtype` (bf16 halves their memory), the UNet in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = check_components_dir(directory)
    try:
        unet = UNet2DConditionModel.from_pretrained(d / "unet", **_load_args(), torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(d / "vae", **_load_args(), torch_dtype=frozen_dtype)
        with _no_transformers_bars():  # a "Loading weights" bar per load of a local file, dozens per study
            text = CLIPTextModel.from_pretrained(d / "text_encoder", use_safetensors=True, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"pretrained-dir = {str(d)!r}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    return _frozen(LatentParts(unet, vae, text, tokenizer), frozen_dtype)


def _frozen(parts: LatentParts, dtype: torch.dtype) -> LatentParts:
    for m in (parts.vae, parts.text_encoder):
        _cast(m, dtype).eval().requires_grad_(False)
    _cast(parts.unet, torch.float32).train()
    return parts


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module.to(dtype)` only when some parameter is not in `dtype` yet: a diffusers model logs a warning about
    float32-kept modules at every `.to(dtype)` (even with none to keep), and from_pretrained(torch_dtype=...)
    has already cast the parts loaded from disk."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' tqdm bars off for one call (restored after), not for the process."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_args() -> dict:
    """from_pretrained arguments: local safetensors only; without accelerate, low_cpu_mem_usage=False said
    explicitly (diffusers' default True would fall back to it with a multi-line 'install accelerate' warning)."""
    from diffusers.utils import is_accelerate_available

    return {"use_safetensors": True, "local_files_only": True, "low_cpu_mem_usage": is_accelerate_available()}


@torch.no_grad()
def encode(
    parts: LatentParts,
    images_uint8: torch.Tensor,
    captions: list[str],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, 4, h, w) float32 = VAE posterior mean x scaling factor, text embeddings (N, L, D) float32)."""
    if len(captions) != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {len(captions)} captions")
    vae, text = parts.vae.to(device), parts.text_encoder.to(device)
    dtype = next(vae.parameters()).dtype
    lat, emb = [], []
    for s in range(0, len(captions), batch_size):
        x = to_model_range(images_uint8[s : s + batch_size].to(device)).to(dtype)
        lat.append((vae.encode(x).latent_dist.mean * parts.scaling_factor).float().cpu())
        ids = parts.tokenizer(
            captions[s : s + batch_size],
            padding="max_length",
            truncation=True,
            max_length=parts.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        emb.append(text(ids.to(device)).last_hidden_state.float().cpu())
    return torch.cat(lat), torch.cat(emb)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def frozen_parts_key(directory: str | Path, frozen_dtype: str) -> str:
    """What decides the cached encodings besides the data: the bytes of the VAE, text encoder and tokenizer files
    (hashed once per process and file version, not the loaded weights; the tokenizer's files hold its maximum
    length) and their dtype."""
    h = hashlib.sha256(frozen_dtype.encode())
    for part in ("vae", "text_encoder", "tokenizer"):
        for path in sorted(p for p in (Path(directory) / part).rglob("*") if p.is_file()):
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            if key not in _DIGESTS:
                _DIGESTS[key] = _file_digest(path)
            h.update(f"{path.relative_to(directory)}\0{_DIGESTS[key]}\0".encode())
    return h.hexdigest()


def cached_encoding(
    images: torch.Tensor, captions: list[str], parts_key: str, load_parts, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode`, computed once per (frozen parts = `parts_key`, images, captions) and kept in
    `$FL_IETAGC_CACHE/latents/`; `load_parts()` gives the parts, called only when the cache misses (so a client
    whose encodings are cached never loads the VAE or the text encoder)."""
    h = hashlib.sha256(parts_key.encode())
    h.update(images.numpy().tobytes())
    h.update("\x00".join(captions).encode())
    path = cache_root("latents") / f"{h.hexdigest()[:24]}.pt"
    if path.is_file():
        blob = load_torch(path, "cached latents")
        return blob["latents"], blob["text"]
    latents, text = encode(load_parts(), images, captions, device=device)
    save_torch(path, {"latents": latents, "text": text})
    return latents, text


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scheduler_config(directory: str | Path) -> dict | None:
    """The checkpoint's noise schedule (scheduler/scheduler_config.json), or None when it has none."""
    path = Path(directory) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"pretrained-dir = {str(directory)!r}: {path} is not valid JSON ({e})") from None
    missing = [k for k in ("num_train_timesteps", "beta_start", "beta_end") if k not in config]
    if missing:
        raise ConfigError(f"pretrained-dir = {str(directory)!r}: {path} lacks {', '.join(missing)}")
    return config


@functools.lru_cache(maxsize=2)
def parts_for(directory: str, frozen_dtype: str) -> LatentParts:
    """The checkpoint's parts, loaded once per process (the UNet here is the pretrained one, never trained)."""
    return load_components(directory, DTYPES[frozen_dtype])


def unet_for(directory: str) -> torch.nn.Module:
    """A fresh UNet2DConditionModel with the checkpoint's pretrained weights (float32, train mode)."""
    from diffusers import UNet2DConditionModel

    check_components_dir(directory)
    return UNet2DConditionModel.from_pretrained(
        Path(directory) / "unet", **_load_args(), torch_dtype=torch.float32
    ).train()


def vae_factor(directory: str | Path) -> int:
    """How many image pixels one latent pixel covers (2 ^ (VAE levels - 1), from vae/config.json)."""
    config = json.loads((Path(directory) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


@functools.lru_cache(maxsize=1)
def training_pairs(cfg, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, text embeddings) of every training pair of `cfg` (dataset = captions): from the disk cache,
    kept in memory for the process's next rounds."""
    train = load_splits(cfg).train
    return cached_encoding(
        train.images,
        list(train.captions),
        frozen_parts_key(cfg.pretrained_dir, cfg.frozen_dtype),
        lambda: parts_for(cfg.pretrained_dir, cfg.frozen_dtype),
        device=device,
    )
