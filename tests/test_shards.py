"""Shards: disjoint, covering, class-balanced (balanced), deterministic across processes."""

import subprocess
import sys

import numpy as np
import pytest

from fl_ietagc.data.shards import make_shards
from fl_ietagc.settings.config import ConfigError


def labels_10x(n_per_class=500, classes=10):
    return np.repeat(np.arange(classes), n_per_class)[np.random.default_rng(1).permutation(classes * n_per_class)]


@pytest.mark.parametrize("method", ["balanced", "random", "dirichlet"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_disjoint_and_covering(method, k):
    labels = labels_10x(103)
    shards = make_shards(labels, k, method, seed=0, alpha=0.5)
    assert len(shards) == k
    allidx = np.concatenate(shards)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    assert all(np.all(np.diff(s) > 0) for s in shards)  # sorted, no repeats


def test_balanced_is_the_papers_per_class_contiguous_slices():
    labels = labels_10x(500)
    shards = make_shards(labels, 10, "balanced", seed=0)
    for i, s in enumerate(shards):
        assert len(s) == 5000 // 10
        for c in range(10):
            cls = np.flatnonzero(labels == c)  # dataset order
            np.testing.assert_array_equal(s[labels[s] == c], cls[i * 50 : (i + 1) * 50])


def test_balanced_spreads_leftovers():
    labels = np.repeat(np.arange(3), [7, 7, 7])  # 21 images, K = 4: 5 per class + 3 leftovers per class
    shards = make_shards(labels, 4, "balanced", seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 21
    for s in shards:
        counts = np.bincount(labels[s], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_random_and_dirichlet_depend_on_seed_only():
    labels = labels_10x(50)
    for method in ("random", "dirichlet"):
        a = make_shards(labels, 5, method, seed=3)
        b = make_shards(labels, 5, method, seed=3)
        c = make_shards(labels, 5, method, seed=4)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_is_skewed():
    labels = labels_10x(200)
    shards = make_shards(labels, 5, "dirichlet", seed=0, alpha=0.1, min_size=10)
    dominant = [np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]
    assert np.mean(dominant) > 0.3  # balanced would be 0.1
    assert min(len(s) for s in shards) >= 10


def test_identical_in_another_process():
    code = (
        "import numpy as np, hashlib; from fl_ietagc.data.shards import make_shards; "
        "L=np.repeat(np.arange(10),97)[np.random.default_rng(1).permutation(970)]; "
        "print(hashlib.sha256(b''.join(s.tobytes() for m in ('balanced','random','dirichlet') "
        "for s in make_shards(L,4,m,seed=7))).hexdigest())"
    )
    out = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    labels = np.repeat(np.arange(10), 97)[np.random.default_rng(1).permutation(970)]
    import hashlib

    here = hashlib.sha256(
        b"".join(s.tobytes() for m in ("balanced", "random", "dirichlet") for s in make_shards(labels, 4, m, seed=7))
    ).hexdigest()
    assert out[0].strip() == out[1].strip() == here


def test_impossible_dirichlet_names_alpha():
    labels = labels_10x(10)
    with pytest.raises(ConfigError, match="^dirichlet-alpha"):
        make_shards(labels, 10, "dirichlet", seed=0, alpha=0.001, min_size=9)
