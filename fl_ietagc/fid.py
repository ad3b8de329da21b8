"""Sample quality (FID, and optionally IS, KID, precision/recall) through torch-fidelity, offline-capable.

Weights. Every metric here uses torch-fidelity's "inception-v3-compat" feature extractor (the TF-compatible
InceptionV3 of the original FID paper), whose weights are the single file ``INCEPTION_FILENAME``. It is taken
from, in this order: an explicit path (``--fid-weights PATH``), the ``FL_IETAGC_INCEPTION_WEIGHTS`` environment
variable, torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints/``), and only then a download from
torch-fidelity's release URL into that cache. Offline, with none of these, ``FidUnavailable`` says how to
provide the file. Precision/recall is pinned to the same extractor (torch-fidelity would otherwise fetch VGG16),
so one file serves every metric.

Cache. The reference set's features and FID statistics are cached by torch-fidelity in
``<cache_root>/<first 16 hex of the weights' sha256>/`` under a name derived from ``reference_key``.
torch-fidelity's own cache key is only (name, extractor, layer): it does not include the weights, hence the
per-weights subdirectory, and it does not include the images, hence ``reference_key`` must change whenever
the reference set does. Generated samples are never cached.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import Dataset


class FidUnavailable(RuntimeError):
    """No Inception weights could be found or fetched; the message says how to provide them."""


INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
WEIGHTS_ENV = "FL_IETAGC_INCEPTION_WEIGHTS"
CACHE_ENV = "FL_IETAGC_CACHE"
DOWNLOAD_TIMEOUT_S = 10.0

_FEATURE_EXTRACTOR = "inception-v3-compat"
_RESULT_KEYS = {  # our metric name -> (torch-fidelity result key -> our result key)
    "fid": {"frechet_inception_distance": "fid"},
    "isc": {"inception_score_mean": "isc_mean", "inception_score_std": "isc_std"},
    "kid": {"kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std"},
    "prc": {"precision": "precision", "recall": "recall"},
}
_fingerprints: dict[tuple[str, int, int], str] = {}


def _hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache: $TORCH_HOME/hub/checkpoints (TORCH_HOME defaults to ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _how_to_provide() -> str:
    return (
        f"Provide {INCEPTION_FILENAME} (torch-fidelity's InceptionV3, {INCEPTION_URL}) in one of three ways: "
        f"pass --fid-weights PATH, set {WEIGHTS_ENV}=PATH, or copy it to "
        f"{_hub_checkpoint_dir() / INCEPTION_FILENAME} (the torch hub cache)."
    )


def resolve_inception_weights(path: str | None = None) -> str:
    """Path of the Inception weights file: explicit path, else $FL_IETAGC_INCEPTION_WEIGHTS, else torch.hub's
    cache, else a download into that cache (bounded by a socket timeout so an offline machine fails fast).

    A path that was named (argument or env var) must exist: silently falling back to other weights would
    make scores incomparable. An empty string counts as not given. Raises FidUnavailable when nothing works.
    """
    if path:
        if not os.path.isfile(path):
            raise FidUnavailable(f"Inception weights file not found: {path}. {_how_to_provide()}")
        return str(path)
    env_path = os.environ.get(WEIGHTS_ENV)
    if env_path:
        if not os.path.isfile(env_path):
            raise FidUnavailable(f"Inception weights file not found: {env_path} (from {WEIGHTS_ENV}). "
                                 f"{_how_to_provide()}")
        return env_path
    cached = _hub_checkpoint_dir() / INCEPTION_FILENAME
    if cached.is_file():
        return str(cached)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # download_url_to_file is what load_state_dict_from_url uses underneath (temp file, then rename), minus
        # loading 95 MB we do not need yet. No hash check: torch-fidelity does none, and "6726825d" in the name
        # is also in pytorch-fid's differently converted pt_inception file, so it may not be this file's sha256.
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except Exception as exc:  # any network or file-system failure means "unavailable"
        raise FidUnavailable(f"Inception weights for FID are unavailable: {INCEPTION_FILENAME} is not in the torch "
                             f"hub cache and downloading it failed ({type(exc).__name__}: {exc}). "
                             f"{_how_to_provide()}") from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return str(cached)


def weights_fingerprint(path: str) -> str:
    """sha256 (hex) of a weights file, memoised per (path, size, mtime) so each file is hashed once per process."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


class _UInt8Images(Dataset):
    """(N, C, H, W) uint8 images as the 3xHxW uint8 tensors torch-fidelity expects (grayscale repeated)."""

    def __init__(self, images: torch.Tensor, what: str):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{what}: expected uint8 (N, C, H, W) with C in {{1, 3}}, "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(images) < 2:
            raise ValueError(f"{what}: need at least 2 images, got {len(images)}")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _cache_name(reference_key: str) -> str:
    """reference_key restricted to [A-Za-z0-9_-]; when characters had to be replaced, a short hash of the
    original key is appended so that distinct keys never share a cache entry."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", reference_key)
    if name != reference_key:
        name += "-" + hashlib.sha256(reference_key.encode()).hexdigest()[:8]
    return name


def _default_cache_root() -> Path:
    base = os.environ.get(CACHE_ENV)
    return Path(base) / "fid" if base else Path.home() / ".cache" / "fl-ietagc" / "fid"


def compute_quality(generated: torch.Tensor, reference: torch.Tensor, *, reference_key: str,
                    weights_path: str | None = None, metrics: tuple[str, ...] = ("fid",),
                    cache_root: str | None = None, device: str = "cpu", batch_size: int = 100,
                    kid_subset_size: int = 1000) -> dict:
    """Quality of `generated` against `reference` (uint8 (N, C, H, W), C in {1, 3}).

    `metrics` is any of "fid", "isc", "kid", "prc". Returns a flat dict with, for those asked, "fid",
    "isc_mean"/"isc_std", "kid_mean"/"kid_std", "precision"/"recall" (floats), plus "num_generated",
    "num_reference" and "weights_sha256". The reference features/statistics are cached (see module
    docstring), so `reference` is not even read when the cache already holds them for `reference_key`.
    Raises FidUnavailable when no weights can be had.
    """
    unknown = set(metrics) - set(_RESULT_KEYS)
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {sorted(_RESULT_KEYS)}, got {metrics}")
    generated_set, reference_set = _UInt8Images(generated, "generated"), _UInt8Images(reference, "reference")
    weights = resolve_inception_weights(weights_path)
    sha = weights_fingerprint(weights)
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    cache_dir = root / sha[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)

    import torch_fidelity  # deferred: heavy import, only needed here

    cuda = device.startswith("cuda")
    with torch.cuda.device(device) if cuda else nullcontext():  # torch-fidelity's .cuda() uses the current device
        raw = torch_fidelity.calculate_metrics(
            input1=generated_set, input2=reference_set, input2_cache_name=_cache_name(reference_key),
            cache=True, cache_root=str(cache_dir),
            feature_extractor=_FEATURE_EXTRACTOR, feature_extractor_weights_path=weights,
            fid="fid" in metrics, isc="isc" in metrics, kid="kid" in metrics, prc="prc" in metrics,
            kid_subset_size=min(kid_subset_size, len(generated_set), len(reference_set)),
            cuda=cuda, batch_size=batch_size, save_cpu_ram=True, verbose=False,
        )
    out: dict = {ours: float(raw[theirs]) for m in metrics for theirs, ours in _RESULT_KEYS[m].items()}
    out.update(num_generated=len(generated_set), num_reference=len(reference_set), weights_sha256=sha)
    return out
