"""Sample quality in Inception features (FID, and optionally IS, KID, precision/recall) through torch-fidelity,
offline-capable. (The offline stand-in without Inception weights is classifier_quality.py.)

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

Safe loading. No file is ever unpickled with code execution allowed. torch-fidelity itself loads its weights and
its cache files with pickle loading allowed (code in the file would run); here instead:
- the weights file is read once, hashed (``weights_sha256`` is the hash of exactly the bytes used) and loaded with
  ``weights_only=True``; it must be a plain {name: tensor} dict with exactly the keys and shapes of torch-fidelity's
  InceptionV3, else ``InceptionWeightsError`` names the file (a pickle that would run code is *refused*). Only
  this verified state dict, re-serialised in memory, is handed to torch-fidelity, never the file's path;
- torch-fidelity's two cache functions are replaced (``install_safe_cache``) by versions that write
  ``{"format": CACHE_FORMAT, ...}`` files of tensors only and read them with ``weights_only=True``. A cache file
  that cannot be read that way (corrupt, truncated, of another format, or a pickle that would run code) is
  ignored with a ``FidCacheWarning`` naming it, and rebuilt.
No SHA-256 is enforced for the official ``INCEPTION_FILENAME``: neither torch-fidelity nor its release names the
file's full hash, and the "6726825d" in its name is also in pytorch-fid's differently converted file name, so it
is not known to be a prefix of this file's SHA-256 (torch.hub's ``check_hash`` convention); refusing files on that
guess could refuse the genuine one. The hash actually used is recorded in every result instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import socket
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fl_ietagc.runs.checkpoints import save_torch
from fl_ietagc.settings.cache import cache_root


class FidUnavailable(RuntimeError):
    """No Inception weights could be found or fetched; the message says how to provide them."""


class InceptionWeightsError(FidUnavailable):
    """An Inception weights file is unusable: refused (loading it would run code), unreadable, or not
    torch-fidelity's InceptionV3. The message names the file (and the option or variable that named it)."""


class UnsafeFileError(ValueError):
    """A file was refused without being loaded: unpickling it would run code or build non-tensor objects."""


class FidCacheWarning(UserWarning):
    """A cache file could not be loaded safely and is being rebuilt; the message names it."""


INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
WEIGHTS_ENV = "FL_IETAGC_INCEPTION_WEIGHTS"
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
            raise FidUnavailable(
                f"Inception weights file not found: {env_path} (from {WEIGHTS_ENV}). {_how_to_provide()}"
            )
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
        raise FidUnavailable(
            f"Inception weights for FID are unavailable: {INCEPTION_FILENAME} is not in the torch "
            f"hub cache and downloading it failed ({type(exc).__name__}: {exc}). "
            f"{_how_to_provide()}"
        ) from exc
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


def _first_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


def safe_torch_load(source, name: str | Path, what: str):
    """torch.load(weights_only=True) of `source` (a path or bytes): no code can run while loading.

    A file whose unpickling needs anything but tensors and plain containers raises UnsafeFileError
    ("<name>: refused: ..."); any other failure (empty, truncated, not a torch file) raises ValueError
    ("<name>: not a readable <what> (...)"). Both name the file.
    """
    data = source if isinstance(source, (bytes, bytearray)) else None
    if data is not None and not data or data is None and os.path.getsize(source) == 0:
        raise ValueError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "Detected pickle protocol N" notice
            return torch.load(io.BytesIO(data) if data is not None else source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n|$)", str(e))
            detail = found.group(1).strip().rstrip(".") if found else "unsupported content"
            if detail.startswith("Unsupported global"):  # it names a function or class to call while unpickling
                raise UnsafeFileError(
                    f"{name}: refused: unpickling this {what} would run code or build objects "
                    f"other than tensors ({detail}); only plain tensor files are loaded"
                ) from None
            raise UnsafeFileError(
                f"{name}: refused: not a plain tensor file ({detail}); only plain tensor files are loaded"
            ) from None
        raise ValueError(f"{name}: not a readable {what} (UnpicklingError: {_first_line(e)})") from None
    except Exception as e:  # truncated zip, random bytes, ...
        raise ValueError(f"{name}: not a readable {what} ({type(e).__name__}: {_first_line(e)})") from None


_expected_shapes: dict[str, tuple[int, ...]] = {}


def inception_state_shapes() -> dict[str, tuple[int, ...]]:
    """{key: shape} of torch-fidelity's InceptionV3 state dict (built once on the meta device: no weights)."""
    if not _expected_shapes:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        class _Skeleton(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                return None

        empty = io.BytesIO()
        torch.save({}, empty)  # our own bytes: the constructor's torch.load of them is harmless
        empty.seek(0)
        with torch.device("meta"):
            net = _Skeleton(_FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
        _expected_shapes.update({k: tuple(v.shape) for k, v in net.state_dict().items()})
    return dict(_expected_shapes)


def load_inception_weights(path: str, label: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file's bytes) of an Inception weights file, loaded with weights_only=True and
    checked against torch-fidelity's InceptionV3 (keys and shapes). Raises InceptionWeightsError
    "<label>: ..." (label defaults to "Inception weights <path>") when the file is refused or unusable."""
    label = label or f"Inception weights {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InceptionWeightsError(f"{label}: cannot read it ({e.strerror or e})") from None
    sha = hashlib.sha256(data).hexdigest()
    try:
        state = safe_torch_load(data, label, "Inception weights file")
    except ValueError as e:  # UnsafeFileError included
        raise InceptionWeightsError(str(e)) from None
    del data
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and type(v) in (torch.Tensor, torch.nn.Parameter) for k, v in state.items()
    ):
        raise InceptionWeightsError(
            f"{label}: not a state dict (expected a dict of name -> tensor, got {type(state).__name__})"
        )
    expected = inception_state_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} wrong shapes (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)}, expected "
            f"{expected[wrong[0]]})"
            if wrong
            else "",
        ]
        raise InceptionWeightsError(
            f"{label}: not torch-fidelity's InceptionV3 weights ({'; '.join(p for p in parts if p)})"
        )
    return state, sha


def preflight_weights(path: str | None, option: str = "--fid-weights") -> str | None:
    """Before any sampling: find the weights compute_quality would use (same order, no download) and verify
    them as load_inception_weights does. Returns their path, or None when none is local (compute_quality would
    then try a download). A named file that is missing, refused or unusable raises InceptionWeightsError whose
    message starts with what named it: "<option> PATH: ...", "$FL_IETAGC_INCEPTION_WEIGHTS=PATH: ..." or
    "PATH (torch hub cache): ..."."""
    env_path = os.environ.get(WEIGHTS_ENV)
    if path:
        label = f"{option} {path}"
    elif env_path:
        path, label = env_path, f"${WEIGHTS_ENV}={env_path}"
    else:
        cached = _hub_checkpoint_dir() / INCEPTION_FILENAME
        if not cached.is_file():
            return None
        path, label = str(cached), f"{cached} (torch hub cache)"
    if not os.path.exists(path):
        raise InceptionWeightsError(f"{label}: no such file. {_how_to_provide()}")
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"{label}: not a file")
    load_inception_weights(path, label)
    return str(path)


# --- torch-fidelity's feature/statistics cache, made safe -------------------------------------------------------

CACHE_FORMAT = "fl-ietagc-fidelity-cache/1"


def _encode(item):
    """A cache item (tensor, numpy array, or dict of them) as nested dicts of tensors only."""
    if torch.is_tensor(item):
        return {"tensor": item.detach().cpu()}
    if isinstance(item, np.ndarray) and item.dtype != object:
        return {"ndarray": torch.from_numpy(np.ascontiguousarray(item))}
    if isinstance(item, dict) and all(isinstance(k, str) for k in item):
        return {"dict": {k: _encode(v) for k, v in item.items()}}
    raise TypeError(f"cannot cache a {type(item).__name__}")


def _decode(blob):
    if isinstance(blob, dict) and len(blob) == 1:
        ((kind, value),) = blob.items()
        if kind == "tensor" and type(value) is torch.Tensor:
            return value
        if kind == "ndarray" and type(value) is torch.Tensor:
            return value.numpy()
        if kind == "dict" and isinstance(value, dict):
            return {k: _decode(v) for k, v in value.items()}
    raise ValueError("unexpected content")


def _check_item(name: str, item) -> None:
    """Shape checks of what torch-fidelity caches: features (N, D) tensors; FID statistics mu (D,), sigma (D, D)."""
    if "-stat-fid-" in name:
        ok = (
            isinstance(item, dict)
            and set(item) == {"mu", "sigma"}
            and all(isinstance(v, np.ndarray) for v in item.values())
            and item["mu"].ndim == 1
            and item["sigma"].shape == (len(item["mu"]),) * 2
            and np.isfinite(item["mu"]).all()
            and np.isfinite(item["sigma"]).all()
        )
    elif "-features-" in name:
        ok = torch.is_tensor(item) and item.dim() == 2 and item.shape[0] > 0
    else:
        ok = True
    if not ok:
        raise ValueError("unexpected content")


def _read_cached(path: str):
    """The item in cache file `path`, or None (after a FidCacheWarning naming the file) if it is unusable."""
    try:
        blob = safe_torch_load(path, path, "FID cache file")
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or "item" not in blob:
            raise ValueError(f"{path}: not an fl-ietagc FID cache file (expected format {CACHE_FORMAT})")
        try:
            item = _decode(blob["item"])
            _check_item(os.path.basename(path), item)
        except ValueError:
            raise ValueError(f"{path}: corrupt FID cache file (unexpected content)") from None
        return item
    except (ValueError, OSError) as e:  # UnsafeFileError included
        warnings.warn(f"{e}; ignoring it and rebuilding it", FidCacheWarning, stacklevel=2)
        return None


def _write_cached(path: str, item) -> None:
    save_torch(Path(path), {"format": CACHE_FORMAT, "item": _encode(item)})


def _cache_root(kwargs) -> str:
    from torch_fidelity.helpers import get_kwarg

    root = get_kwarg("cache_root", kwargs)
    if root is None:
        root = os.path.join(torch.hub._get_torch_home(), "fidelity_cache")
    os.makedirs(root, exist_ok=True)
    return root


def _safe_lookup_one(cached_filename, fn_recompute, **kwargs):
    """torch-fidelity's cache_lookup_one_recompute_on_miss, loading with weights_only=True."""
    from torch_fidelity.helpers import get_kwarg

    if not get_kwarg("cache", kwargs):
        return fn_recompute()
    path = os.path.join(_cache_root(kwargs), cached_filename + ".pt")
    if os.path.exists(path):
        item = _read_cached(path)
        if item is not None:
            return item
    item = fn_recompute()
    _write_cached(path, item)
    return item


def _safe_lookup_group(cached_filename_prefix, item_names, fn_recompute, **kwargs):
    """torch-fidelity's cache_lookup_group_recompute_all_on_any_miss, loading with weights_only=True."""
    from torch_fidelity.helpers import get_kwarg

    if not get_kwarg("cache", kwargs):
        return fn_recompute()
    root = _cache_root(kwargs)
    paths = {n: os.path.join(root, cached_filename_prefix + n + ".pt") for n in item_names}
    if all(os.path.exists(p) for p in paths.values()):
        out = {n: _read_cached(p) for n, p in paths.items()}
        if all(v is not None for v in out.values()):
            return out
    items = fn_recompute()
    for n, p in paths.items():
        _write_cached(p, items[n])
    return items


_SAFE_CACHE = {
    "cache_lookup_one_recompute_on_miss": _safe_lookup_one,
    "cache_lookup_group_recompute_all_on_any_miss": _safe_lookup_group,
}


def install_safe_cache() -> None:
    """Replace torch-fidelity's cache functions (in every module that holds them) by the safe ones above.
    Fails closed: if torch-fidelity's layout is not the one this was written for, nothing is computed."""
    import torch_fidelity.metric_fid
    import torch_fidelity.utils

    for module, names in (
        (torch_fidelity.utils, list(_SAFE_CACHE)),
        (torch_fidelity.metric_fid, ["cache_lookup_one_recompute_on_miss"]),
    ):
        for name in names:
            if not hasattr(module, name):
                raise RuntimeError(
                    f"torch-fidelity {torch_fidelity.__version__}: {module.__name__}.{name} not found; "
                    f"cannot make its cache loading safe"
                )
            setattr(module, name, _SAFE_CACHE[name])


class _UInt8Images(Dataset):
    """(N, C, H, W) uint8 images as the 3xHxW uint8 tensors torch-fidelity expects (grayscale repeated)."""

    def __init__(self, images: torch.Tensor, what: str):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"{what}: expected uint8 (N, C, H, W) with C in {{1, 3}}, got {images.dtype} {tuple(images.shape)}"
            )
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
    return cache_root("fid")


def compute_quality(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    reference_key: str,
    weights_path: str | None = None,
    metrics: tuple[str, ...] = ("fid",),
    cache_root: str | None = None,
    device: str = "cpu",
    batch_size: int = 100,
    kid_subset_size: int = 1000,
) -> dict:
    """Quality of `generated` against `reference` (uint8 (N, C, H, W), C in {1, 3}).

    `metrics` is any of "fid", "isc", "kid", "prc". Returns a flat dict with, for those asked, "fid",
    "isc_mean"/"isc_std", "kid_mean"/"kid_std", "precision"/"recall" (floats), plus "num_generated",
    "num_reference" and "weights_sha256". The reference features/statistics are cached (see module
    docstring), so `reference` is not even read when the cache already holds them for `reference_key`.
    Raises FidUnavailable when no weights can be had, InceptionWeightsError (a FidUnavailable) naming the file
    when the weights file is refused or unusable; torch-fidelity is then never called.
    """
    unknown = set(metrics) - set(_RESULT_KEYS)
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {sorted(_RESULT_KEYS)}, got {metrics}")
    generated_set, reference_set = _UInt8Images(generated, "generated"), _UInt8Images(reference, "reference")
    weights = resolve_inception_weights(weights_path)
    state, sha = load_inception_weights(weights)
    verified = io.BytesIO()  # torch-fidelity gets the verified tensors, re-serialised by us, never the file
    torch.save(state, verified)
    del state
    verified.seek(0)
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    cache_dir = root / sha[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)

    import torch_fidelity  # deferred: heavy import, only needed here

    install_safe_cache()

    cuda = device.startswith("cuda")
    with torch.cuda.device(device) if cuda else nullcontext():  # torch-fidelity's .cuda() uses the current device
        raw = torch_fidelity.calculate_metrics(
            input1=generated_set,
            input2=reference_set,
            input2_cache_name=_cache_name(reference_key),
            cache=True,
            cache_root=str(cache_dir),
            feature_extractor=_FEATURE_EXTRACTOR,
            feature_extractor_weights_path=verified,
            fid="fid" in metrics,
            isc="isc" in metrics,
            kid="kid" in metrics,
            prc="prc" in metrics,
            kid_subset_size=min(kid_subset_size, len(generated_set), len(reference_set)),
            cuda=cuda,
            batch_size=batch_size,
            save_cpu_ram=True,
            verbose=False,
        )
    out: dict = {ours: float(raw[theirs]) for m in metrics for theirs, ours in _RESULT_KEYS[m].items()}
    out.update(num_generated=len(generated_set), num_reference=len(reference_set), weights_sha256=sha)
    return out
