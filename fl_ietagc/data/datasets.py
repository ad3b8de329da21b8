"""Datasets as in-memory uint8 tensors.

Every dataset loads to an `ImageSet`: images (N, C, H, W) uint8 at the model resolution and
integer labels (N,). `load_splits(cfg)` returns the training set and a held-out set (the
dataset's test split, or a fixed class-balanced tail of the training data when the dataset has
none) used by evaluation for the memorization null rate.

Loading is cached per process, so a Ray actor that hosts several clients, or one client over
several rounds, reads and resizes the data once. Image folders are also cached on disk (one .npz per
folder, size and file list, with a SHA-256 of its arrays); a cache that cannot be read, has the wrong
shape or fails its checksum is reported with a warning and rebuilt.

Bad input is a `ConfigError` (the CLIs exit 2) whose one-line message starts with `data-root = ...`
and names the file and what is wrong with it: a file that is not an image or is truncated, an empty
folder, too few images to hold some out, an idx file with a wrong magic number or a length that does
not match its sizes, a missing idx file, a torchvision file that fails its checksum, a data-root that
is a file.

Image modes (`_to_rgb`): 8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...) go through Pillow's own
conversion to RGB; alpha (LA, PA, RGBA, P with transparency) is dropped, not composited, as
torchvision's ImageFolder loader does (and as this loader always did); 16-bit grayscale (I;16*) and
32-bit integer (I, read on the 16-bit scale 0..65535, which is how Pillow decodes 16-bit files) become
round(value / 257); 32-bit float (F, Pillow's scale 0..255) becomes round(value). Values outside the
mode's range are an error, never clipped. Pillow itself reads 16-bit RGB(A) PNGs at 8 bits (the high
byte, i.e. floor(value / 256)).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fl_ietagc.data.captions import load_captioned
from fl_ietagc.data.imagesets import ImageSet, Splits, holdout_tail
from fl_ietagc.runs.checkpoints import atomic_write_bytes
from fl_ietagc.settings.cache import cache_root
from fl_ietagc.settings.config import ConfigError, RunConfig

DEFAULT_IMAGE_SIZE = {
    "digits": 16,
    "fashion-mnist": 32,
    "cifar10": 32,
    "cifar100": 32,
    "afhq-dog": 64,
    "folder": 64,
    "captions": 512,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_size(cfg: RunConfig) -> int:
    return cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset]


def load_splits(cfg: RunConfig) -> Splits:
    """Training and held-out images for `cfg` (cached per process)."""
    return _load_splits_cached(
        cfg.dataset, cfg.data_root, cfg.data_download, image_size(cfg), cfg.max_images, cfg.holdout_fraction
    )


@functools.lru_cache(maxsize=4)
def _load_splits_cached(dataset, root, download, size, max_images, holdout_fraction) -> Splits:
    if root and not os.path.exists(root):
        raise ConfigError(f"data-root = {root!r}: path does not exist")
    if root and not os.path.isdir(root) and dataset != "captions":
        raise ConfigError(f"data-root = {root!r}: is a file, not a folder; dataset {dataset} needs a folder")
    loader = _LOADERS[dataset]
    train, test = loader(root, download, size)
    if len(train) == 0:
        raise ConfigError(f"data-root = {root!r}: the {dataset} training set has no images")
    if test is None:
        train, test = holdout_tail(train, holdout_fraction)
        if holdout_fraction > 0 and len(test) == 0:
            counts = np.bincount(train.labels.numpy())
            raise ConfigError(
                f"data-root = {root!r}: too few images: {len(train)} image(s), at most "
                f"{counts.max()} per class folder; holdout-fraction = {holdout_fraction} needs a "
                f"class with at least 2 images (one held out, one to train on), or use "
                f"holdout-fraction = 0"
            )
    if max_images:
        train = train.subset(np.arange(min(max_images, len(train))))
    return Splits(train, test)


# ---------------------------------------------------------------------------------------------
# per-dataset loaders: (root, download, size) -> (train ImageSet, test ImageSet | None)


def _digits(root, download, size):
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    return _to_imageset(images, d.target, size), None


FASHION_MNIST_CLASSES = 10


def _fashion_mnist(root, download, size):
    raw = _find_idx_dir(root) if root else None
    if raw is not None:
        parts = []
        for split in ("train", "t10k"):
            imgs, img_path = _read_idx(raw / f"{split}-images-idx3-ubyte", 3, root)
            labels, label_path = _read_idx(raw / f"{split}-labels-idx1-ubyte", 1, root)
            if len(imgs) != len(labels):
                raise ConfigError(
                    f"data-root = {root!r}: {img_path} has {len(imgs)} images but {label_path} has {len(labels)} labels"
                )
            if len(labels) and labels.max() >= FASHION_MNIST_CLASSES:
                raise ConfigError(
                    f"data-root = {root!r}: {label_path}: label {int(labels.max())} is out of range "
                    f"(Fashion-MNIST labels are 0..{FASHION_MNIST_CLASSES - 1})"
                )
            parts.append(_to_imageset(torch.from_numpy(imgs.astype(np.float32))[:, None], labels, size))
        return parts[0], parts[1]
    from torchvision.datasets import FashionMNIST

    out = []
    for train in (True, False):
        ds = _torchvision(FashionMNIST, root, train, download, "fashion-mnist")
        out.append(_to_imageset(ds.data.float()[:, None], ds.targets.numpy(), size))
    return out[0], out[1]


def _cifar(cls_name):
    def load(root, download, size):
        import torchvision.datasets as tvd

        out = []
        for train in (True, False):
            ds = _torchvision(getattr(tvd, cls_name), root, train, download, cls_name.lower())
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float()
            out.append(_to_imageset(images, np.asarray(ds.targets), size))
        return out[0], out[1]

    return load


def _afhq_dog(root, download, size):
    base = Path(root)
    if (base / "train" / "dog").is_dir():
        test_dir = base / "val" / "dog"
        test = _image_folder(test_dir, size, root) if test_dir.is_dir() else None
        return _image_folder(base / "train" / "dog", size, root), test
    return _image_folder(base, size, root), None


def _folder(root, download, size):
    return _image_folder(Path(root), size, root), None


def _captions(root, download, size):
    data = load_captioned(root, size)
    return ImageSet(data.images, torch.zeros(len(data), dtype=torch.long), tuple(data.captions)), None


_LOADERS = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
    "cifar10": _cifar("CIFAR10"),
    "cifar100": _cifar("CIFAR100"),
    "afhq-dog": _afhq_dog,
    "folder": _folder,
    "captions": _captions,
}


# ---------------------------------------------------------------------------------------------
# helpers


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _torchvision(cls, root, train, download, name):
    root = root or str(cache_root("datasets"))
    try:
        return cls(root=root, train=train, download=download)
    except Exception as e:  # torchvision: "Dataset not found or corrupted...", a failed download, a bad file
        missing, corrupt = _torchvision_files_problem(cls, root)
        if corrupt:
            raise ConfigError(
                f"data-root = {root!r}: {name} file {corrupt} is corrupt (fails its MD5 checksum); "
                f"delete it and set data-download = true on a machine with network, or copy an "
                f"intact {name} there"
            ) from e
        where = f"; {missing} is missing" if missing else ""
        if download:
            raise ConfigError(
                f"data-root = {root!r}: {name} could not be downloaded there ({_one_line(e)}{where}); "
                f"check the network, or point data-root at a local copy with "
                f"data-download = false"
            ) from e
        raise ConfigError(
            f"data-root = {root!r}: {name} not found there ({_one_line(e)}{where}); set "
            f"data-download = true on a machine with network, or point data-root at a local copy"
        ) from e


def _torchvision_files_problem(cls, root) -> tuple[str | None, str | None]:
    """(first missing file, first corrupt file) of a torchvision dataset that lists its files with MD5s (CIFAR)."""
    base = getattr(cls, "base_folder", None)
    listed = list(getattr(cls, "train_list", [])) + list(getattr(cls, "test_list", []))
    meta = getattr(cls, "meta", None)
    if isinstance(meta, dict) and "filename" in meta:
        listed.append([meta["filename"], meta.get("md5")])
    if not base or not listed:
        return None, None
    from torchvision.datasets.utils import check_integrity

    missing = None
    for fname, md5 in listed:
        path = os.path.join(root, base, fname)
        if not os.path.exists(path):
            missing = missing or path
        elif md5 and not check_integrity(path, md5):
            return missing, path
    return missing, None


def _to_imageset(images: torch.Tensor, labels, size: int) -> ImageSet:
    """float (N, C, h, w) in [0, 255] -> uint8 at size x size (antialiased bilinear)."""
    if images.shape[-1] != size or images.shape[-2] != size:
        chunks = [
            F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            for c in images.split(4096)
        ]
        images = torch.cat(chunks)
    images = images.round().clamp(0, 255).to(torch.uint8).contiguous()
    return ImageSet(images, torch.as_tensor(np.asarray(labels), dtype=torch.long))


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx_dir(root: str) -> Path | None:
    """The folder holding the raw Fashion-MNIST idx files: root or root/FashionMNIST/raw (any one file decides)."""
    for cand in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        if any((cand / f"{name}{ext}").exists() for name in IDX_FILES for ext in ("", ".gz")):
            return cand
    return None


def _read_idx(path: Path, ndim: int, root: str) -> tuple[np.ndarray, Path]:
    """Read an MNIST-style unsigned-byte idx file (optionally .gz) of `ndim` dimensions; checks its header."""
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        raise ConfigError(f"data-root = {root!r}: missing Fashion-MNIST file {path.with_suffix('')}(.gz)")
    if path.is_dir():
        raise ConfigError(f"data-root = {root!r}: {path} is a folder, not an idx file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        what = "truncated or corrupt gzip data" if opener is gzip.open else "cannot be read"
        raise ConfigError(f"data-root = {root!r}: {path}: {what} ({_one_line(e)})") from e
    expected_magic = 0x0800 | ndim
    if len(raw) < 4:
        raise ConfigError(
            f"data-root = {root!r}: {path}: truncated idx file ({len(raw)} bytes, shorter than the 4-byte magic number)"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ConfigError(
            f"data-root = {root!r}: {path}: wrong magic number 0x{magic:08X} (expected "
            f"0x{expected_magic:08X}: unsigned bytes, {ndim} dimension(s)); not a Fashion-MNIST idx file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(
            f"data-root = {root!r}: {path}: truncated idx file ({len(raw)} bytes, shorter than its "
            f"{header}-byte header)"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != need:
        what = "truncated idx file" if len(raw) < need else "idx file longer than its sizes say"
        raise ConfigError(
            f"data-root = {root!r}: {path}: {what}: sizes {'x'.join(map(str, shape))} need {need} "
            f"bytes, the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy(), path


def _image_folder(folder: Path, size: int, data_root: str) -> ImageSet:
    """Images under folder, resized (shorter side) and centre-cropped to size. Sub-folders are classes."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not files:
        raise ConfigError(
            f"data-root = {data_root!r}: no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder} or its sub-folders"
        )
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    class_of = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_of[p.parent.relative_to(folder).as_posix()] for p in files], np.int64)
    cache = _folder_cache_path(folder, files, size, data_root)
    images = _read_folder_cache(cache, len(files), size, labels)
    if images is None:
        images = np.empty((len(files), 3, size, size), np.uint8)
        for i, p in enumerate(files):
            images[i] = _load_image(p, size, data_root)
        _write_folder_cache(cache, images, labels)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def _load_image(path: Path, size: int, data_root: str) -> np.ndarray:
    """One image file -> (3, size, size) uint8: to RGB, resized (shorter side, bicubic), centre-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated or corrupt file fails here, not later
            rgb = _to_rgb(im, path, data_root)
    except ConfigError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise ConfigError(f"data-root = {data_root!r}: {path}: {_image_problem(path, e)}") from e
    scale = size / min(rgb.size)
    w, h = max(size, round(rgb.size[0] * scale)), max(size, round(rgb.size[1] * scale))
    rgb = rgb.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb).transpose(2, 0, 1)


def _image_problem(path: Path, e: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    reason = _one_line(e)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes), not an image"
    except OSError:
        pass
    if isinstance(e, UnidentifiedImageError):
        return f"not an image (Pillow cannot identify its format; suffix {path.suffix!r})"
    if isinstance(e, Image.DecompressionBombError):
        return f"image too large to decode ({reason})"
    if "truncated" in reason.lower():
        return f"truncated image file ({reason})"
    if isinstance(e, PermissionError):
        return f"cannot be read ({reason})"
    return f"corrupt image file ({type(e).__name__}: {reason})"


_PILLOW_RGB_MODES = ("1", "L", "P", "RGBX", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def _to_rgb(im, path: Path, data_root: str):
    """A decoded Pillow image -> 8-bit RGB Pillow image, whatever its mode (see the module docstring).

    Alpha is dropped (the colour channels are kept as they are), as torchvision's ImageFolder does.
    High bit depths are scaled, never clipped: 16-bit (I;16*, and I on the same 0..65535 scale) by
    round(v / 257), float (F, 0..255) by round(v). Values outside the range are a ConfigError.
    """
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first, then drop alpha like LA / RGBA
        im, mode = im.convert(mode.upper()), mode.upper()
    if mode in _PILLOW_RGB_MODES:
        if mode == "P" and "transparency" in im.info:
            return im.convert("RGBA").convert("RGB")  # same colours; avoids Pillow's transparency warning
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise ConfigError(
                f"data-root = {data_root!r}: {path}: mode {mode} pixel values {lo}..{hi} are outside "
                f"0..65535 (mode {mode} is read as 16-bit and is not clipped); save it as an 8- or "
                f"16-bit image"
            )
        grey = (values * 2 + 257) // 514  # round(v / 257) in integers (no ties: 257 is odd)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(im).astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            raise ConfigError(f"data-root = {data_root!r}: {path}: mode F (float) image has NaN or infinite pixels")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 255:
            raise ConfigError(
                f"data-root = {data_root!r}: {path}: mode F (float) pixel values {lo:g}..{hi:g} are "
                f"outside 0..255 (Pillow's scale for mode F; not clipped); save it as an 8-bit image"
            )
        return Image.fromarray(np.floor(values + 0.5).astype(np.uint8), "L").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ConfigError(f"data-root = {data_root!r}: {path}: unsupported image mode {mode!r} ({_one_line(e)})") from e


FOLDER_CACHE_VERSION = 2  # 2: SHA-256 in the file; 16-bit images scaled, not clipped


def _folder_cache_path(root: Path, files: list[Path], size: int, data_root: str) -> Path:
    h = hashlib.sha256(f"v{FOLDER_CACHE_VERSION}|{root.resolve()}|{size}".encode())
    for p in files:
        try:
            st = p.stat()
        except OSError as e:  # a broken symlink, a file removed meanwhile, no permission on its folder
            raise ConfigError(f"data-root = {data_root!r}: {p}: cannot be read ({_one_line(e)})") from e
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_root("folders") / f"{h.hexdigest()[:24]}.npz"


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _read_folder_cache(cache: Path, n: int, size: int, labels: np.ndarray) -> np.ndarray | None:
    """The cached images, or None when there is no cache or it is corrupt (then warn: it will be rebuilt)."""
    if not cache.exists():
        return None
    try:
        with open(cache, "rb") as f, np.load(f, allow_pickle=False) as blob:  # np.load leaks the file on a bad zip
            images, cached_labels, digest = blob["images"], blob["labels"], str(blob["sha256"])
        if images.dtype != np.uint8 or images.shape != (n, 3, size, size):
            problem = f"images are {images.dtype} {tuple(images.shape)}, expected uint8 {(n, 3, size, size)}"
        elif cached_labels.dtype != np.int64 or not np.array_equal(cached_labels, labels):
            problem = "its labels do not match the folder's classes"
        elif digest != _arrays_sha256(images, cached_labels):
            problem = "SHA-256 checksum mismatch"
        else:
            return images
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        problem = f"unreadable: {_one_line(e)}"
    warnings.warn(f"data cache {cache} is corrupt ({problem}); rebuilding it", RuntimeWarning, stacklevel=2)
    return None


def _write_folder_cache(cache: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically (checkpoints.atomic_write_bytes); a cache that cannot be written is a warning."""
    try:
        atomic_write_bytes(
            cache, lambda f: np.savez(f, images=images, labels=labels, sha256=np.array(_arrays_sha256(images, labels)))
        )
    except OSError as e:
        warnings.warn(
            f"data cache {cache} could not be written ({_one_line(e)}); the folder will be read again next time",
            RuntimeWarning,
            stacklevel=2,
        )
