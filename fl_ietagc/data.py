"""Datasets as in-memory uint8 tensors.

Every dataset loads to an `ImageSet`: images (N, C, H, W) uint8 at the model resolution and
integer labels (N,). `load_splits(cfg)` returns the training set and a held-out set (the
dataset's test split, or a fixed class-balanced tail of the training data when the dataset has
none) used by evaluation for the memorization null rate.

Loading is cached per process, so a Ray actor that hosts several clients, or one client over
several rounds, reads and resizes the data once.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, RunConfig

DEFAULT_IMAGE_SIZE = {"digits": 16, "fashion-mnist": 32, "cifar10": 32, "cifar100": 32, "afhq-dog": 64, "folder": 64}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    heldout: ImageSet


def image_size(cfg: RunConfig) -> int:
    return cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset]


def load_splits(cfg: RunConfig) -> Splits:
    """Training and held-out images for `cfg` (cached per process)."""
    return _load_splits_cached(cfg.dataset, cfg.data_root, cfg.data_download, image_size(cfg),
                               cfg.max_images, cfg.holdout_fraction)


@functools.lru_cache(maxsize=4)
def _load_splits_cached(dataset, root, download, size, max_images, holdout_fraction) -> Splits:
    if root and not os.path.exists(root):
        raise ConfigError(f"data-root = {root!r}: path does not exist")
    loader = _LOADERS[dataset]
    train, test = loader(root, download, size)
    if test is None:
        train, test = _holdout_tail(train, holdout_fraction)
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


def _fashion_mnist(root, download, size):
    raw = _find_idx_dir(root) if root else None
    if raw is not None:
        parts = []
        for split in ("train", "t10k"):
            imgs = _read_idx(raw / f"{split}-images-idx3-ubyte")
            labels = _read_idx(raw / f"{split}-labels-idx1-ubyte")
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
        test = _image_folder(test_dir, size) if test_dir.is_dir() else None
        return _image_folder(base / "train" / "dog", size), test
    return _image_folder(base, size), None


def _folder(root, download, size):
    return _image_folder(Path(root), size), None


_LOADERS = {"digits": _digits, "fashion-mnist": _fashion_mnist, "cifar10": _cifar("CIFAR10"),
            "cifar100": _cifar("CIFAR100"), "afhq-dog": _afhq_dog, "folder": _folder}


# ---------------------------------------------------------------------------------------------
# helpers


def _torchvision(cls, root, train, download, name):
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "fl-ietagc", "datasets")
    try:
        return cls(root=root, train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        raise ConfigError(f"data-root = {root!r}: {name} not found there ({e}); set data-download = true "
                          f"on a machine with network, or point data-root at a local copy") from e


def _to_imageset(images: torch.Tensor, labels, size: int) -> ImageSet:
    """float (N, C, h, w) in [0, 255] -> uint8 at size x size (antialiased bilinear)."""
    if images.shape[-1] != size or images.shape[-2] != size:
        chunks = [F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                  for c in images.split(4096)]
        images = torch.cat(chunks)
    images = images.round().clamp(0, 255).to(torch.uint8).contiguous()
    return ImageSet(images, torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _holdout_tail(data: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """Hold out the last ceil(fraction * n_c) images of every class c (independent of the seed)."""
    labels = data.labels.numpy()
    held = np.zeros(len(labels), bool)
    if fraction > 0:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            n_out = min(len(idx) - 1, int(np.ceil(fraction * len(idx))))
            held[idx[len(idx) - n_out:]] = True
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))


def _find_idx_dir(root: str) -> Path | None:
    for cand in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        if any((cand / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
            return cand
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-style idx file (optionally .gz)."""
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    if not path.exists():
        raise ConfigError(f"data-root: missing {path.name}(.gz) in {path.parent}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _image_folder(root: Path, size: int) -> ImageSet:
    """Images under root, resized (shorter side) and centre-cropped to size. Sub-folders are classes."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data-root = {str(root)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    cache = _folder_cache_path(root, files, size)
    if cache.exists():
        blob = np.load(cache)
        return ImageSet(torch.from_numpy(blob["images"]), torch.from_numpy(blob["labels"]))
    from PIL import Image

    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    class_of = {c: i for i, c in enumerate(classes)}
    images = np.empty((len(files), 3, size, size), np.uint8)
    for i, p in enumerate(files):
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            images[i] = np.asarray(im).transpose(2, 0, 1)
    labels = np.array([class_of[p.parent.relative_to(root).as_posix()] for p in files], np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def _folder_cache_path(root: Path, files: list[Path], size: int) -> Path:
    h = hashlib.sha256(f"{root.resolve()}|{size}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_root = Path(os.environ.get("FL_IETAGC_CACHE", Path.home() / ".cache" / "fl-ietagc"))
    return cache_root / "folders" / f"{h.hexdigest()[:24]}.npz"
