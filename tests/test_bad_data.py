"""Bad data is a one-line ConfigError naming the file and what is wrong; a corrupt on-disk cache is rebuilt;
images of every bit depth and mode are converted exactly (16-bit scaled by 1/257, never clipped).

Every image here is a few pixels, written with Pillow (or by hand for the 16-bit RGB PNG) in tmp_path.
"""

import gzip
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from fl_ietagc.data import datasets as data
from fl_ietagc.data.datasets import load_splits
from fl_ietagc.settings.config import ConfigError, parse_config


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FL_IETAGC_CACHE", str(path))
    return path


def folder_cfg(root, size=8, **extra):
    return parse_config(
        {"dataset": "folder", "data-root": str(root), "image-size": size, "holdout-fraction": 0.0, **extra}
    )


def load_folder(root, size=8, **extra):
    return load_splits(folder_cfg(root, size, **extra))


def refused(cfg, *fragments):
    """load_splits(cfg) raises ConfigError; its message is one line and contains every fragment (literally)."""
    data._load_splits_cached.cache_clear()
    with pytest.raises(ConfigError) as info:
        load_splits(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


def root_key(root):
    return f"data-root = {str(root)!r}"


def image_dir(tmp_path, n=3, size=(6, 5)):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", size, (10 * i, 20, 30)).save(root / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# image folders: unreadable files, empty and too small folders, a data-root that is a file


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_the_file(tmp_path, suffix):
    root = image_dir(tmp_path)
    good = tmp_path / f"full{suffix}"
    Image.effect_noise((24, 24), 60).convert("RGB").save(good)
    blob = good.read_bytes()
    bad = root / f"cut{suffix}"
    bad.write_bytes(blob[: len(blob) // 2])
    refused(folder_cfg(root), root_key(root), str(bad), "truncated image file")


def test_text_file_with_an_image_suffix_is_not_an_image(tmp_path):
    root = image_dir(tmp_path)
    bad = root / "notes.jpeg"
    bad.write_text("these are my notes, not a photo\n")
    refused(folder_cfg(root), root_key(root), str(bad), "not an image", "'.jpeg'")


def test_empty_image_file_is_named(tmp_path):
    root = image_dir(tmp_path)
    (root / "sub").mkdir()
    bad = root / "sub" / "zero.webp"
    bad.write_bytes(b"")
    refused(folder_cfg(root), root_key(root), str(bad), "empty file (0 bytes)")


def test_broken_symlink_is_named(tmp_path):
    root = image_dir(tmp_path)
    bad = root / "gone.png"
    bad.symlink_to(tmp_path / "nowhere.png")
    refused(folder_cfg(root), root_key(root), f"{bad}: cannot be read ([Errno 2] No such file or directory")


def test_png_with_corrupt_pixel_data_is_named(tmp_path):
    root = image_dir(tmp_path)
    good = tmp_path / "noise.png"
    Image.effect_noise((32, 32), 60).convert("RGB").save(good, compress_level=0)
    blob = bytearray(good.read_bytes())
    idat = blob.index(b"IDAT")
    blob[idat + 4 : idat + 14] = b"\xff" * 10  # the zlib header and first bytes of the pixel data
    bad = root / "broken.png"
    bad.write_bytes(bytes(blob))
    msg = refused(folder_cfg(root), root_key(root), str(bad))
    assert re.search(r"(corrupt|truncated) image file", msg), msg


def test_empty_folder_names_the_folder(tmp_path):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "readme.txt").write_text("no images here")
    (root / "dir.png").mkdir()  # a folder with an image suffix is not an image
    refused(folder_cfg(root), root_key(root), "no images (.png, .jpg, .jpeg, .bmp, .webp) found in", str(root))


def test_afhq_dog_with_an_empty_val_folder_names_it(tmp_path):
    (tmp_path / "afhq" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "afhq" / "val" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "afhq" / "train" / "dog" / "a.jpg")
    root = tmp_path / "afhq"
    refused(
        parse_config({"dataset": "afhq-dog", "data-root": str(root), "image-size": 8}),
        root_key(root),
        f"no images (.png, .jpg, .jpeg, .bmp, .webp) found in {root / 'val' / 'dog'}",
    )


def test_one_image_per_class_is_too_few_to_hold_out(tmp_path):
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(root / cls / "only.png")
    refused(
        folder_cfg(root, **{"holdout-fraction": 0.1}),
        root_key(root),
        "too few images: 2 image(s), at most 1 "
        "per class folder; holdout-fraction = 0.1 needs a class with at least 2 images",
    )
    assert len(load_folder(root).train) == 2  # holdout-fraction = 0 needs no held-out image
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "b" / "second.png")
    data._load_splits_cached.cache_clear()
    s = load_folder(root, **{"holdout-fraction": 0.1})
    assert len(s.train) == 2 and len(s.heldout) == 1 and s.heldout.labels.tolist() == [1]


@pytest.mark.parametrize("dataset", ["folder", "afhq-dog", "fashion-mnist", "cifar10", "cifar100"])
def test_data_root_that_is_a_file(tmp_path, dataset):
    root = tmp_path / "train-images-idx3-ubyte.gz"
    root.write_bytes(b"not a folder")
    refused(
        parse_config({"dataset": dataset, "data-root": str(root)}),
        root_key(root),
        f"is a file, not a folder; dataset {dataset} needs a folder",
    )


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST idx files


def idx_bytes(array, magic=None):
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def fashion_dir(tmp_path, n_train=6, n_test=2, gz=True):
    root = tmp_path / "fmnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for name, arr in (
            (f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28))),
            (f"{split}-labels-idx1-ubyte", np.arange(n) % 10),
        ):
            blob = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
    return root


def fashion_cfg(root):
    return parse_config({"dataset": "fashion-mnist", "data-root": str(root)})


def test_valid_fashion_dir_loads(tmp_path):
    for gz in (True, False):
        s = load_splits(fashion_cfg(fashion_dir(tmp_path / str(gz), gz=gz)))
        assert len(s.train) == 6 and len(s.heldout) == 2


@pytest.mark.parametrize(
    "name", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
)
def test_missing_idx_file_is_named(tmp_path, name):
    root = fashion_dir(tmp_path)
    (root / f"{name}.gz").unlink()
    refused(fashion_cfg(root), root_key(root), f"missing Fashion-MNIST file {root / name}(.gz)")


def test_idx_files_under_torchvision_layout_missing_one(tmp_path):
    root = tmp_path / "tv"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(2)))
    refused(fashion_cfg(root), root_key(root), f"missing Fashion-MNIST file {raw / 'train-images-idx3-ubyte'}(.gz)")


@pytest.mark.parametrize(
    "content, problem",
    [
        (idx_bytes(np.zeros(6)), "wrong magic number 0x00000801 (expected 0x00000803"),  # a labels file
        (
            idx_bytes(np.zeros((6, 28, 28)), magic=0x0D03),
            "wrong magic number 0x00000D03 (expected 0x00000803",
        ),  # floats
        (b"PK\x03\x04" + bytes(100), "wrong magic number 0x504B0304 (expected 0x00000803"),  # a zip
        (b"\x00\x00", "truncated idx file (2 bytes, shorter than the 4-byte magic number)"),
        (idx_bytes(np.zeros((6, 28, 28)))[:10], "truncated idx file (10 bytes, shorter than its 16-byte header)"),
        (
            idx_bytes(np.zeros((6, 28, 28)))[:-100],
            "truncated idx file: sizes 6x28x28 need 4720 bytes, the file has 4620",
        ),
        (
            idx_bytes(np.zeros((6, 28, 28))) + b"\x00",
            "idx file longer than its sizes say: sizes 6x28x28 need 4720 bytes, the file has 4721",
        ),
    ],
)
def test_corrupt_idx_file(tmp_path, content, problem):
    root = fashion_dir(tmp_path, gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(content)
    refused(fashion_cfg(root), root_key(root), f"{path}: {problem}")


def test_truncated_gzip_idx_file(tmp_path):
    root = fashion_dir(tmp_path)
    path = root / "t10k-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    refused(fashion_cfg(root), root_key(root), f"{path}: truncated or corrupt gzip data")


def test_gz_file_that_is_not_gzip(tmp_path):
    root = fashion_dir(tmp_path)
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.arange(6) % 10))  # uncompressed bytes under a .gz name
    refused(fashion_cfg(root), root_key(root), f"{path}: truncated or corrupt gzip data")


def test_image_and_label_counts_differ(tmp_path):
    root = fashion_dir(tmp_path)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(5))))
    refused(
        fashion_cfg(root),
        root_key(root),
        f"{root / 'train-images-idx3-ubyte.gz'} has 6 images but {root / 'train-labels-idx1-ubyte.gz'} has 5 labels",
    )


def test_label_out_of_range(tmp_path):
    root = fashion_dir(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes([3, 12])))
    refused(fashion_cfg(root), root_key(root), f"{path}: label 12 is out of range (Fashion-MNIST labels are 0..9)")


# ---------------------------------------------------------------------------------------------
# torchvision datasets (CIFAR files carry MD5 checksums)


CIFAR10_FILES = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
]


def test_corrupt_cifar_file_is_named(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in CIFAR10_FILES:
        (base / name).write_bytes(b"garbage " + name.encode())
    refused(
        parse_config({"dataset": "cifar10", "data-root": str(tmp_path)}),
        root_key(tmp_path),
        f"cifar10 file {base / 'data_batch_1'} is corrupt (fails its MD5 checksum)",
        "data-download = true",
    )


def test_missing_cifar100_file_is_named(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    refused(
        parse_config({"dataset": "cifar100", "data-root": str(tmp_path)}),
        root_key(tmp_path),
        "cifar100 not found there",
        f"{tmp_path / 'cifar-100-python' / 'train'} is missing",
        "data-download = true",
    )


def test_failed_download_says_so(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    refused(
        parse_config({"dataset": "cifar10", "data-root": str(tmp_path), "data-download": True}),
        root_key(tmp_path),
        "cifar10 could not be downloaded there (<urlopen error [Errno -3] Temporary failure",
        f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_1'} is missing",
        "check the network",
    )


# ---------------------------------------------------------------------------------------------
# the on-disk folder cache: corrupt -> warn naming the file, rebuild


def cached_folder(tmp_path, cache_dir):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(root / f"{i}.png")
    first = load_folder(root)
    caches = list((cache_dir / "folders").glob("*.npz"))
    assert len(caches) == 1
    return root, first, caches[0]


def reload_warns(root, cache, first):
    data._load_splits_cached.cache_clear()
    with pytest.warns(RuntimeWarning, match=re.escape(f"data cache {cache} is corrupt")) as record:
        again = load_folder(root)
    assert np.array_equal(again.train.images.numpy(), first.train.images.numpy())
    assert again.train.labels.tolist() == first.train.labels.tolist()
    data._load_splits_cached.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is good: no warning now
        third = load_folder(root)
    assert np.array_equal(third.train.images.numpy(), first.train.images.numpy())
    return str(record[0].message)


def test_valid_cache_is_read_without_decoding_images(tmp_path, cache_dir, monkeypatch):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    with np.load(cache) as blob:
        assert sorted(blob.files) == ["images", "labels", "sha256"]
    data._load_splits_cached.cache_clear()

    def no_decoding(*args):
        raise AssertionError("decoded an image although the cache is valid")

    monkeypatch.setattr(data, "_load_image", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_folder(root)
    assert np.array_equal(again.train.images.numpy(), first.train.images.numpy())


def test_garbage_cache_is_rebuilt(tmp_path, cache_dir):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    cache.write_bytes(b"\x00garbage" * 10)
    assert "unreadable" in reload_warns(root, cache, first)


def test_truncated_cache_is_rebuilt(tmp_path, cache_dir):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    blob = cache.read_bytes()
    cache.write_bytes(blob[: len(blob) - 40])
    assert "rebuilding it" in reload_warns(root, cache, first)


def test_cache_with_wrong_shape_is_rebuilt(tmp_path, cache_dir):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    images, labels = np.zeros((3, 3, 4, 4), np.uint8), first.train.labels.numpy()
    np.savez(cache, images=images, labels=labels, sha256=np.array(data._arrays_sha256(images, labels)))
    cache.with_suffix(".npz.npz").unlink(missing_ok=True)
    message = reload_warns(root, cache, first)
    assert "images are uint8 (3, 3, 4, 4), expected uint8 (3, 3, 8, 8)" in message


def test_cache_with_wrong_checksum_is_rebuilt(tmp_path, cache_dir):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    with np.load(cache) as blob:
        images, labels, digest = blob["images"].copy(), blob["labels"], blob["sha256"]
    images[0, 0, 0, 0] ^= 1  # one bit flipped in the pixels
    with open(cache, "wb") as f:
        np.savez(f, images=images, labels=labels, sha256=digest)
    assert "SHA-256 checksum mismatch" in reload_warns(root, cache, first)


def test_cache_without_checksum_is_rebuilt(tmp_path, cache_dir):
    root, first, cache = cached_folder(tmp_path, cache_dir)
    with open(cache, "wb") as f:
        np.savez(f, images=first.train.images.numpy(), labels=first.train.labels.numpy())
    assert "unreadable" in reload_warns(root, cache, first)


def test_unwritable_cache_is_a_warning_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("FL_IETAGC_CACHE", str(blocker))
    root = image_dir(tmp_path)
    with pytest.warns(RuntimeWarning, match=re.escape(str(blocker / "folders")) + ".*could not be written"):
        s = load_folder(root)
    assert len(s.train) == 3


# ---------------------------------------------------------------------------------------------
# image modes and bit depths: exact pixels. Images are 8 x 8 (image-size 8, a multiple of 8), made of
# flat blocks, so they reach the loader's resize unchanged.


def up(a):
    """Blow a small (h, w, ...) array up to 8 x 8 by repeating every pixel into a block."""
    a = np.asarray(a)
    r = 8 // a.shape[0]
    return np.repeat(np.repeat(a, r, 0), 8 // a.shape[1], 1)


def one_image(tmp_path, name, save):
    root = tmp_path / "images"
    root.mkdir()
    save(root / name)
    return root


def loaded_rgb(root):
    s = load_folder(root, 8)
    assert s.train.images.shape == (1, 3, 8, 8)
    return s.train.images[0].numpy().transpose(1, 2, 0)  # (H, W, 3)


def grey(values):
    v = up(np.asarray(values, np.uint8))
    return np.stack([v, v, v], -1)


def test_16bit_grey_png_is_scaled_by_1_over_257_not_clipped(tmp_path):
    v16 = np.array(
        [[0, 128, 129, 257], [1000, 32896, 65280, 65535], [256, 385, 386, 12345], [40000, 50000, 60000, 65406]],
        np.uint16,
    )
    root = one_image(tmp_path, "deep.png", lambda p: Image.fromarray(up(v16)).save(p))
    with Image.open(root / "deep.png") as im:
        assert im.mode == "I;16"
    expected = [[0, 0, 1, 1], [4, 128, 254, 255], [1, 1, 2, 48], [156, 195, 233, 254]]
    assert np.array_equal(np.round(v16 / 257), expected)
    assert np.array_equal(loaded_rgb(root), grey(expected))


def test_1bit_png(tmp_path):
    root = one_image(tmp_path, "bits.png", lambda p: Image.fromarray(up(np.array([[0, 1], [1, 0]], bool))).save(p))
    with Image.open(root / "bits.png") as im:
        assert im.mode == "1"
    assert np.array_equal(loaded_rgb(root), grey([[0, 255], [255, 0]]))


def test_8bit_grey_png(tmp_path):
    root = one_image(tmp_path, "g.png", lambda p: Image.fromarray(up(np.array([[0, 7], [128, 255]], np.uint8))).save(p))
    assert np.array_equal(loaded_rgb(root), grey([[0, 7], [128, 255]]))


def palette_image(transparency=None):
    im = Image.fromarray(up(np.array([[0, 1], [2, 3]], np.uint8)), "L").convert("P")
    im.putpalette([10, 20, 30, 200, 100, 50, 1, 2, 3, 255, 255, 255] + [0] * 756)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


PALETTE_RGB = [[[10, 20, 30], [200, 100, 50]], [[1, 2, 3], [255, 255, 255]]]


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255, 255])])
def test_palette_png_with_and_without_transparency(tmp_path, transparency):
    root = one_image(tmp_path, "pal.png", lambda p: palette_image(transparency).save(p))
    with Image.open(root / "pal.png") as im:
        assert im.mode == "P" and (transparency is None) == ("transparency" not in im.info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about transparency either
        assert np.array_equal(loaded_rgb(root), up(np.array(PALETTE_RGB, np.uint8)))  # alpha dropped


def test_la_png_drops_alpha(tmp_path):
    la = np.array([[[40, 0], [200, 128]], [[0, 255], [255, 7]]], np.uint8)
    root = one_image(tmp_path, "la.png", lambda p: Image.fromarray(up(la)).save(p))
    with Image.open(root / "la.png") as im:
        assert im.mode == "LA"
    assert np.array_equal(loaded_rgb(root), grey([[40, 200], [0, 255]]))


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 128]], [[0, 0, 255, 255], [12, 34, 56, 1]]], np.uint8)
    root = one_image(tmp_path, "rgba.png", lambda p: Image.fromarray(up(rgba)).save(p))
    with Image.open(root / "rgba.png") as im:
        assert im.mode == "RGBA"
    assert np.array_equal(loaded_rgb(root), up(rgba[..., :3]))


def test_cmyk_jpeg(tmp_path):
    c, m, y, k = 10, 20, 30, 40
    root = one_image(tmp_path, "print.jpg", lambda p: Image.new("CMYK", (8, 8), (c, m, y, k)).save(p, quality=100))
    with Image.open(root / "print.jpg") as im:
        assert im.mode == "CMYK"
    expected = [round((255 - v) * (255 - k) / 255) for v in (c, m, y)]
    assert expected == [207, 198, 190]
    assert np.array_equal(loaded_rgb(root), np.broadcast_to(np.array(expected, np.uint8), (8, 8, 3)))


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_16bit_rgb_png_is_read_at_8_bits_not_clipped(tmp_path):
    rgb16 = up(np.array([[[0, 32896, 65535], [1000, 65280, 300]]], ">u2"))  # 8 x 8, big-endian 16-bit samples
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )
    root = tmp_path / "images"
    root.mkdir()
    (root / "deep-rgb.png").write_bytes(png)
    # Pillow has no 16-bit RGB mode: it keeps the high byte, floor(v / 256), within 1 of round(v / 257)
    with Image.open(root / "deep-rgb.png") as im:
        assert im.mode == "RGB"
    assert np.array_equal(loaded_rgb(root), up(np.array([[[0, 128, 255], [3, 255, 1]]], np.uint8)))


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I", [[0, 128], [129, 65535]], [[0, 0], [1, 255]]),  # 32-bit int, on the 16-bit scale
        ("I;16", [[257, 1000], [32896, 65280]], [[1, 4], [128, 254]]),
        ("F", [[0.0, 0.49], [127.5, 255.0]], [[0, 0], [128, 255]]),  # float, Pillow's 0..255 scale, round half up
    ],
)
def test_deep_modes_saved_as_tiff(tmp_path, mode, values, expected):
    path = tmp_path / f"{mode.replace(';', '_')}.tif"  # TIFF keeps I and F; .tif is not a folder suffix
    dtype = {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]
    Image.fromarray(np.array(values, dtype), mode if mode != "I;16" else None).save(path)
    with Image.open(path) as im:
        im.load()
        assert im.mode == mode
        rgb = data._to_rgb(im, path, str(tmp_path))
    v = np.asarray(expected, np.uint8)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.stack([v, v, v], -1))


@pytest.mark.parametrize(
    "mode, values, problem",
    [
        (
            "I",
            [[0, 70000]],
            "mode I pixel values 0..70000 are outside 0..65535 (mode I is read as 16-bit and is not "
            "clipped); save it as an 8- or 16-bit image",
        ),
        (
            "I",
            [[-1, 5]],
            "mode I pixel values -1..5 are outside 0..65535 (mode I is read as 16-bit and is not clipped); "
            "save it as an 8- or 16-bit image",
        ),
        (
            "F",
            [[0.0, 300.5]],
            "mode F (float) pixel values 0..300.5 are outside 0..255 (Pillow's scale for mode F; not "
            "clipped); save it as an 8-bit image",
        ),
        (
            "F",
            [[-0.5, 1.0]],
            "mode F (float) pixel values -0.5..1 are outside 0..255 (Pillow's scale for mode F; not "
            "clipped); save it as an 8-bit image",
        ),
        ("F", [[np.nan, 1.0]], "mode F (float) image has NaN or infinite pixels"),
    ],
)
def test_deep_modes_out_of_range_are_refused_not_clipped(tmp_path, mode, values, problem):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array(values, np.int32 if mode == "I" else np.float32), mode).save(path)
    with Image.open(path) as im:
        im.load()
        with pytest.raises(ConfigError) as info:
            data._to_rgb(im, path, str(tmp_path))
    assert str(info.value) == f"data-root = {str(tmp_path)!r}: {path}: {problem}"


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "YCbCr", "La", "RGBa"])
def test_every_pillow_mode_gives_8bit_rgb(tmp_path, mode):
    im = Image.new(mode, (2, 2))
    rgb = data._to_rgb(im, tmp_path / "x.png", str(tmp_path))
    assert rgb.mode == "RGB" and rgb.size == (2, 2)
