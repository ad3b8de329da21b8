"""fl_ietagc.evaluation.inception_quality against stand-in Inception weights (the real ones are not downloadable offline).

The stand-in has the exact architecture and state-dict keys of torch-fidelity's InceptionV3, so the whole
torch-fidelity path (weights loading, feature extraction, caching, metrics) runs for real; only the features
are meaningless beyond "a fixed random conv net", which is enough to tell distributions apart.
Image counts are kept small: on CPU each image costs ~0.2 s (upsampled to 299x299) and each FID ~5 s
(eigenvalues of a 2048x2048 matrix).
"""

from __future__ import annotations

import math
import re
import socket

import pytest
import torch
import torch_fidelity.utils

from fl_ietagc.evaluation import inception_quality as fid
from fl_ietagc.evaluation.inception_quality import (
    INCEPTION_FILENAME,
    WEIGHTS_ENV,
    FidUnavailable,
    compute_quality,
    resolve_inception_weights,
    weights_fingerprint,
)
from tests.conftest import make_standin_weights  # noqa: E402


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> str:
    return str(make_standin_weights(tmp_path_factory.mktemp("inception") / "standin-1.pth", seed=1))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No weights anywhere: no env var, an empty torch hub cache, and every proxy pointed at a closed port."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch-home"


@pytest.fixture
def downloads(monkeypatch) -> list:
    """torch.hub downloads are recorded (url, destination, socket timeout during the call) and fail like an
    offline machine: no test reaches the network, and each can tell whether a download was attempted."""
    calls = []

    def fake_download(url, dst, *args, **kwargs):
        calls.append((url, dst, socket.getdefaulttimeout()))
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return calls


def blobs(n: int, channels: int, seed: int) -> torch.Tensor:
    """Distribution A: one Gaussian blob of random position, width and colour per 16x16 image."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    g = torch.Generator().manual_seed(seed)
    cx, cy, sigma = (torch.rand(n, 1, 1, 1, generator=g) * w + lo for lo, w in ((4, 8), (4, 8), (2, 2)))
    colour = torch.rand(n, channels, 1, 1, generator=g) * 0.5 + 0.5
    image = colour * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return (255 * image).round().to(torch.uint8)


def gratings(n: int, channels: int, seed: int) -> torch.Tensor:
    """Distribution B: sinusoidal stripes of random orientation, frequency, phase and colour."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    g = torch.Generator().manual_seed(seed)
    angle, freq, phase = (
        torch.rand(n, 1, 1, 1, generator=g) * w + lo for lo, w in ((0, math.pi), (0.5, 1.0), (0, 2 * math.pi))
    )
    colour = torch.rand(n, channels, 1, 1, generator=g) * 0.5 + 0.5
    image = colour * (0.5 + 0.5 * torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase))
    return (255 * image).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_same_distribution_scores_lower_than_a_different_one(weights, tmp_path, channels):
    n = 20  # kid_subset_size (default 1000) is clipped to 20
    reference = blobs(n, channels, seed=1)
    kwargs = dict(
        reference_key=f"blobs-{channels}",
        weights_path=weights,
        metrics=("fid", "kid"),
        cache_root=str(tmp_path),
        batch_size=50,
    )
    same = compute_quality(blobs(n, channels, seed=2), reference, **kwargs)
    different = compute_quality(gratings(n, channels, seed=3), reference, **kwargs)
    assert 0 <= same["fid"] < different["fid"] / 3
    assert same["kid_mean"] < different["kid_mean"]
    assert same["num_generated"] == same["num_reference"] == n
    assert same["weights_sha256"] == weights_fingerprint(weights)
    assert set(same) == {"fid", "kid_mean", "kid_std", "num_generated", "num_reference", "weights_sha256"}


def test_reference_statistics_are_cached_per_reference_key_and_weights(weights, other_weights, tmp_path, monkeypatch):
    # Generated and reference sets differ in size, so the spy tells which one went through the network.
    passes: list[int] = []
    extract = torch_fidelity.utils.get_featuresdict_from_dataset

    def spy(dataset, *args, **kwargs):
        passes.append(len(dataset))
        return extract(dataset, *args, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
    generated, reference = blobs(6, 1, seed=2), blobs(8, 1, seed=1)
    wrong_reference = gratings(8, 1, seed=3)
    key = "digits-16-train-0123abcd"

    first = compute_quality(generated, reference, reference_key=key, weights_path=weights, cache_root=str(tmp_path))
    assert passes == [6, 8]
    sha16 = weights_fingerprint(weights)[:16]
    assert sorted(p.name for p in tmp_path.iterdir()) == [sha16]
    assert any(p.name.startswith(key) for p in (tmp_path / sha16).iterdir())

    # Same key and weights: the reference is not read again, so even wrong content gives the identical score.
    again = compute_quality(
        generated, wrong_reference, reference_key=key, weights_path=weights, cache_root=str(tmp_path)
    )
    assert passes == [6, 8, 6]
    assert again["fid"] == first["fid"]

    # Other weights: their own subdirectory, and the reference goes through the network again.
    other = compute_quality(
        generated, reference, reference_key=key, weights_path=other_weights, cache_root=str(tmp_path)
    )
    assert passes == [6, 8, 6, 6, 8]
    other16 = weights_fingerprint(other_weights)[:16]
    assert other16 != sha16 and sorted(p.name for p in tmp_path.iterdir()) == sorted([sha16, other16])
    assert other["weights_sha256"] != first["weights_sha256"]


def unbiased_kid(x, y) -> float:
    """KID (Binkowski et al.): unbiased MMD^2 with the kernel (x.y / d + 1)^3, one subset holding every image."""
    x, y = x.double(), y.double()
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_env_var_weights_are_used_and_kid_subset_is_clipped(weights, tmp_path, monkeypatch, captured_features):
    features = captured_features
    monkeypatch.setenv(WEIGHTS_ENV, weights)
    assert resolve_inception_weights() == weights
    assert resolve_inception_weights("") == weights  # an empty --fid-weights means "not given"
    # Default kid_subset_size=1000 > 5 images: torch-fidelity would reject it unless clipped.
    out = compute_quality(
        blobs(5, 3, seed=2), blobs(5, 3, seed=1), reference_key="kid", metrics=("kid",), cache_root=str(tmp_path)
    )
    assert out["weights_sha256"] == weights_fingerprint(weights)
    assert set(out) == {"kid_mean", "kid_std", "num_generated", "num_reference", "weights_sha256"}
    assert math.isfinite(out["kid_mean"])
    # subset size clipped to 5 = both set sizes: every one of torch-fidelity's subsets is the whole set, so KID is
    # the MMD^2 of all features, with zero spread
    assert len(features) == 2 and features[0].shape == features[1].shape == (5, 2048)
    assert out["kid_mean"] == pytest.approx(unbiased_kid(features[0], features[1]), rel=1e-4, abs=1e-9)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-3 * abs(out["kid_mean"]))  # float32 summation order only


def test_explicit_missing_path_is_named(tmp_path, downloads):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FidUnavailable, match="nope.pth"):
        resolve_inception_weights(missing)
    with pytest.raises(FidUnavailable, match=f"^Inception weights file not found: {re.escape(missing)}\\. Provide "):
        resolve_inception_weights(missing)
    assert downloads == []  # a named file that is missing is an error, not a reason to download


def test_env_var_pointing_nowhere_is_an_error(offline, tmp_path, monkeypatch, downloads):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FidUnavailable, match="gone.pth"):
        resolve_inception_weights()
    with pytest.raises(FidUnavailable, match=f"^Inception weights file not found: .*gone.pth \\(from {WEIGHTS_ENV}\\)"):
        resolve_inception_weights()
    assert downloads == []


def test_torch_hub_cache_is_used(offline, downloads):
    cached = offline / "hub" / "checkpoints" / INCEPTION_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")
    assert resolve_inception_weights() == str(cached)
    assert downloads == []


def test_no_weights_anywhere_fails_fast_with_instructions(offline, tmp_path, downloads, monkeypatch):
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(FidUnavailable) as excinfo:
        resolve_inception_weights()
    # one download of the release file into the hub cache, under a socket timeout so that offline it fails fast
    target = offline / "hub" / "checkpoints" / INCEPTION_FILENAME
    assert downloads == [(fid.INCEPTION_URL, str(target), fid.DOWNLOAD_TIMEOUT_S)]
    message = str(excinfo.value)
    assert message.startswith(
        f"Inception weights for FID are unavailable: {INCEPTION_FILENAME} is not in the torch "
        f"hub cache and downloading it failed (OSError: [Errno 101] Network is unreachable). "
    )
    for needle in (WEIGHTS_ENV, INCEPTION_FILENAME, fid.INCEPTION_URL, "--fid-weights", str(offline)):
        assert needle in message
    assert socket.getdefaulttimeout() == timeout_before
    assert not list((offline / "hub" / "checkpoints").glob("*"))  # no partial download left behind
    # compute_quality surfaces the same error before any feature extraction.
    import torch_fidelity

    def no_metrics(*args, **kwargs):
        raise AssertionError("torch-fidelity was called without weights")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", no_metrics)
    with pytest.raises(FidUnavailable) as again:
        compute_quality(blobs(2, 1, 0), blobs(2, 1, 1), reference_key="x", cache_root=str(tmp_path / "c"))
    assert str(again.value) == message and len(downloads) == 2
    assert not (tmp_path / "c").exists()  # nothing cached either
