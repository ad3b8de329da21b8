"""Dataset loading: embedded digits, Fashion-MNIST raw idx files, image folders."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fl_ietagc.config import ConfigError, parse_config
from fl_ietagc.data import load_splits


def test_digits_embedded_upscaled_with_class_balanced_holdout():
    s = load_splits(parse_config({}))
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 16, 16)
    assert len(s.train) + len(s.heldout) == 1797
    assert s.train.images.max() > 200  # 0..16 scaled to 0..255
    held = np.bincount(s.heldout.labels.numpy(), minlength=10)
    assert held.min() >= 17 and held.max() <= 19  # ceil(0.1 * ~180) per class


def test_max_images_takes_the_first_n():
    full = load_splits(parse_config({}))
    cut = load_splits(parse_config({"max-images": 100}))
    assert len(cut.train) == 100 and torch.equal(cut.train.images, full.train.images[:100])


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_raw_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    s = load_splits(parse_config({"dataset": "fashion-mnist", "data-root": str(tmp_path)}))
    assert s.train.images.shape == (30, 1, 32, 32) and s.heldout.images.shape == (10, 1, 32, 32)
    assert s.train.labels.tolist() == [i % 10 for i in range(30)]
    native = load_splits(parse_config({"dataset": "fashion-mnist", "data-root": str(tmp_path), "image-size": 0}))
    assert native.train.images.shape[-1] == 32


def test_image_folder_with_classes_resized_and_cropped(tmp_path):
    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / cls / f"{i}.png")
    cfg = parse_config({"dataset": "folder", "data-root": str(tmp_path), "image-size": 8, "holdout-fraction": 0.0})
    s = load_splits(cfg)
    assert s.train.images.shape == (6, 3, 8, 8)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.train.images[0, 0].float().mean() > 250 and s.train.images[3, 2].float().mean() > 250


def test_empty_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        load_splits(parse_config({"dataset": "folder", "data-root": str(tmp_path), "image-size": 8}))


def test_cifar_without_local_copy_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="data-root.*cifar10 not found.*data-download"):
        load_splits(parse_config({"dataset": "cifar10", "data-root": str(tmp_path)}))
