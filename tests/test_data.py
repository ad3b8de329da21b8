"""Dataset loading: embedded digits, Fashion-MNIST raw idx files, image folders."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fl_ietagc.data.datasets import load_splits
from fl_ietagc.settings.config import ConfigError, parse_config


def test_digits_embedded_upscaled_with_class_balanced_holdout():
    s = load_splits(parse_config({}))
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 16, 16)
    assert len(s.train) + len(s.heldout) == 1797
    assert s.train.images.max() > 200  # 0..16 scaled to 0..255
    held = np.bincount(s.heldout.labels.numpy(), minlength=10)
    assert held.min() >= 17 and held.max() <= 19  # ceil(0.1 * ~180) per class
    # digits has 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 images per class
    assert held.tolist() == [18, 19, 18, 19, 19, 19, 19, 18, 18, 18]
    assert s.train.images.max() == 255 and len(s.train) == 1797 - 185


def digits_source():
    """sklearn's digits as the loader scales them (0..16 -> 0..255, rounded), and the indices it keeps for
    training: all but the last ceil(0.1 * n_c) images of every class c, in dataset order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    held = np.zeros(len(d.target), bool)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        held[idx[len(idx) - int(np.ceil(0.1 * len(idx))) :]] = True
    return pixels, d.target, np.flatnonzero(~held), np.flatnonzero(held)


def test_digits_at_native_resolution_are_the_source_pixels():
    s = load_splits(parse_config({"image-size": 8}))  # 8x8: no resampling
    pixels, target, train_idx, held_idx = digits_source()
    assert s.train.images.shape == (len(train_idx), 1, 8, 8) and s.heldout.images.shape == (len(held_idx), 1, 8, 8)
    np.testing.assert_array_equal(s.train.images[:, 0].numpy(), pixels[train_idx])
    np.testing.assert_array_equal(s.heldout.images[:, 0].numpy(), pixels[held_idx])
    np.testing.assert_array_equal(s.train.labels.numpy(), target[train_idx])
    assert sorted(np.unique(s.train.images.numpy()).tolist()) == [round(v * 255 / 16) for v in range(17)]


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


def test_fashion_mnist_pixels_native_and_resized(tmp_path):
    rng = np.random.default_rng(1)
    native_dir, small_dir = tmp_path / "native", tmp_path / "small"
    native_dir.mkdir(), small_dir.mkdir()
    source = {}
    for split, n in (("train", 12), ("t10k", 4)):
        source[split] = rng.integers(0, 256, (n, 32, 32)).astype(np.uint8)  # already at the model resolution
        write_idx(native_dir / f"{split}-images-idx3-ubyte.gz", source[split])
        write_idx(native_dir / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
        flat = np.broadcast_to((np.arange(n) * 20 + 7)[:, None, None], (n, 28, 28))  # one grey level per image
        write_idx(small_dir / f"{split}-images-idx3-ubyte.gz", flat)
        write_idx(small_dir / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    native = load_splits(parse_config({"dataset": "fashion-mnist", "data-root": str(native_dir)}))
    assert native.train.images.shape == (12, 1, 32, 32) and native.heldout.images.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(native.train.images[:, 0].numpy(), source["train"])
    np.testing.assert_array_equal(native.heldout.images[:, 0].numpy(), source["t10k"])
    resized = load_splits(parse_config({"dataset": "fashion-mnist", "data-root": str(small_dir)}))
    assert resized.train.images.shape == (12, 1, 32, 32)
    expected = np.broadcast_to((np.arange(12) * 20 + 7)[:, None, None, None], (12, 1, 32, 32))
    np.testing.assert_array_equal(resized.train.images.numpy(), expected)  # a flat image stays flat when resized


def test_image_folder_with_classes_resized_and_cropped(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / cls / f"{i}.png")
    cfg = parse_config({"dataset": "folder", "data-root": str(tmp_path), "image-size": 8, "holdout-fraction": 0.0})
    s = load_splits(cfg)
    assert s.train.images.shape == (6, 3, 8, 8)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.train.images[0, 0].float().mean() > 250 and s.train.images[3, 2].float().mean() > 250
    red, blue = torch.tensor([255, 0, 0]), torch.tensor([0, 0, 255])
    for i, colour in enumerate([red] * 3 + [blue] * 3):  # flat colours stay exact through resize and crop
        assert torch.equal(s.train.images[i], colour[:, None, None].expand(3, 8, 8).to(torch.uint8)), i


def test_empty_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        load_splits(parse_config({"dataset": "folder", "data-root": str(tmp_path), "image-size": 8}))


def test_cifar_without_local_copy_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="data-root.*cifar10 not found.*data-download"):
        load_splits(parse_config({"dataset": "cifar10", "data-root": str(tmp_path)}))
