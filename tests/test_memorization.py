"""Memorization metrics on planted copies: exact, slightly perturbed, and fresh images."""

import numpy as np
import pytest
import torch

from fl_ietagc.evaluation.memorization import Neighbours, nearest_neighbours, ratios, summarize


def dataset(n=600, dim=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *dim), generator=g, dtype=torch.uint8)


def test_nearest_neighbours_match_brute_force():
    train = dataset(300)
    queries = dataset(40, seed=1)
    nb = nearest_neighbours(queries, train, k=10, chunk=16)
    q = queries.reshape(40, -1).double() / 255
    x = train.reshape(300, -1).double() / 255
    full = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    ref_d2, ref_idx = full.sort(dim=1)
    torch.testing.assert_close(nb.d2, ref_d2[:, :10], rtol=1e-12, atol=1e-12)  # uint8: exact
    nb_float = nearest_neighbours(queries.float() / 255, train.float() / 255, k=10, chunk=16)
    torch.testing.assert_close(nb_float.d2, ref_d2[:, :10], rtol=1e-6, atol=1e-9)
    assert torch.equal(nb_float.index, ref_idx[:, :10])
    assert torch.equal(nb.index, ref_idx[:, :10])


def test_planted_copies_are_counted_exactly():
    train = dataset(2000)
    fresh = dataset(80, seed=7)
    exact = train[[5, 50, 500, 1500]].clone()  # 4 exact copies
    g = torch.Generator().manual_seed(3)
    noise = torch.randint(-3, 4, (6, 3, 8, 8), generator=g)
    near = (train[[10, 20, 30, 40, 60, 70]].int() + noise).clamp(0, 255).to(torch.uint8)  # 6 near copies
    queries = torch.cat([fresh, exact, near])
    nb = nearest_neighbours(queries, train, k=50, chunk=32)
    assert nb.d2[80:84, 0].tolist() == [0.0] * 4  # exact copies: distance exactly 0 after the exact pass
    assert nb.index[80:84, 0].tolist() == [5, 50, 500, 1500]
    assert nb.index[84:, 0].tolist() == [10, 20, 30, 40, 60, 70]
    s = summarize(nb, num_train=2000)
    assert s["exact_copies"]["count"] == 4
    assert s["one_third_rule"]["count"] == 10  # the 4 exact + 6 near copies, no fresh image
    assert s["mq"]["0.15"]["count"] == 10 and s["mq"]["0.15"]["fraction"] == pytest.approx(10 / 90)
    assert s["carlini"]["count"] == 10
    # uniform-noise images: distances concentrate, so a fresh image's r sits near 0.9 (MQ's loosest tau
    # counts such images too, which is why the report shows a held-out null rate beside it)
    r = ratios(nb)
    assert (r["mq"][:80] > 0.8).all() and (r["mq"][80:] < 0.01).all()
    assert s["mq"]["0.7"]["count"] == 10


def test_ratio_definitions_on_hand_made_distances():
    d2 = torch.tensor([[1.0, 4.0, 4.0, 7.0], [0.0, 0.0, 9.0, 9.0]], dtype=torch.float64)
    nb = Neighbours(d2=d2, index=torch.zeros(2, 4, dtype=torch.long), dim=4)
    r = ratios(nb)
    np.testing.assert_allclose(r["mq"], [1.0 / 4.0, 0.0])  # mean d2 = 16/4 = 4; copy -> 0
    np.testing.assert_allclose(r["gu"], [1.0 / 2.0, 0.0])  # sqrt(1)/sqrt(4)
    np.testing.assert_allclose(r["carlini"], [1.0 / (0.5 * (1 + 2 + 2 + 7**0.5) / 4), 0.0])


def test_reliability_flag_depends_on_training_set_size():
    nb = nearest_neighbours(dataset(5), dataset(200), k=50)
    assert summarize(nb, 200)["mq_reliable"] is False
    assert summarize(nb, 5000)["mq_reliable"] is True


def test_k_is_capped_by_the_training_set():
    nb = nearest_neighbours(dataset(3), dataset(20), k=50)
    assert nb.k == 20


def tiny_train():
    """Four 1x1x2 images whose squared distances (pixels / 255) are easy to write down."""
    return torch.tensor([[0, 0], [255, 0], [0, 51], [255, 255]], dtype=torch.uint8).view(4, 1, 1, 2)


def test_k_equal_1_gives_the_nearest_and_its_ratios():
    queries = torch.tensor([[0, 0], [255, 51], [51, 51]], dtype=torch.uint8).view(3, 1, 1, 2)
    nb = nearest_neighbours(queries, tiny_train(), k=1)
    assert nb.k == 1 and nb.index.tolist() == [[0], [1], [2]]
    # (255-255)^2 + (51-0)^2 = 51^2 -> 0.04; q2 to image 2: 51^2 -> 0.04
    torch.testing.assert_close(nb.d2, torch.tensor([[0.0], [0.04], [0.04]], dtype=torch.float64), rtol=0, atol=1e-15)
    r = ratios(nb)
    # one neighbour: r = d1 / mean(d1) = 1 (0 for a copy), 1st / 2nd falls back to 1st / 1st, Carlini 2
    np.testing.assert_allclose(r["mq"], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(r["gu"], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(r["carlini"], [0.0, 2.0, 2.0])
    s = summarize(nb, num_train=4)
    assert s["exact_copies"] == {"count": 1, "fraction": pytest.approx(1 / 3)}
    assert s["one_third_rule"]["count"] == 1 and s["carlini"]["count"] == 1 and s["mq"]["0.9"]["count"] == 1


def test_zero_queries_give_empty_neighbours_and_an_empty_summary():
    nb = nearest_neighbours(tiny_train()[:0], tiny_train(), k=2)
    assert nb.d2.shape == (0, 2) and nb.index.shape == (0, 2) and nb.d2.dtype == torch.float64
    s = summarize(nb, num_train=4)
    assert s["num_queries"] == 0 and s["exact_copies"] == {"count": 0, "fraction": 0.0}
    assert s["mq"]["0.2"] == {"count": 0, "fraction": 0.0} and s["quantiles"] == {}
    assert s["mean_l2_nearest_per_pixel"] == 0.0


@pytest.mark.parametrize("mix", ["float queries", "float train"])
def test_mixed_uint8_and_float_inputs_give_the_uint8_distances(mix):
    train = dataset(50)
    queries = torch.cat([train[[3, 17]], dataset(5, seed=4)])
    exact = nearest_neighbours(queries, train, k=5)
    q, x = (queries.double() / 255, train) if mix == "float queries" else (queries, train.double() / 255)
    mixed = nearest_neighbours(q, x, k=5)
    torch.testing.assert_close(mixed.d2, exact.d2, rtol=0, atol=1e-12)
    assert torch.equal(mixed.index, exact.index)
    assert mixed.d2[:2, 0].tolist() == [0.0, 0.0] and mixed.index[:2, 0].tolist() == [3, 17]
