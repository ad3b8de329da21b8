"""Flower 1.41's other Message-API rules as run-config choices: each one's arithmetic on IET's raw + EMA replies,
computed here by hand in numpy, and the one-line refusals where a rule cannot apply."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fl_ietagc.settings.config import ConfigError, parse_config
from strategies.registry import build_strategy
from strategies.state import export_state, import_state
from tests.test_aggregation import reply
from tests.test_strategies import FakeGrid, arrays, built

# five clients: (net, ema) each, and their shard sizes; client 4 is an outlier
NETS = [[0.0, 0.0], [0.2, 0.0], [0.0, 0.3], [0.1, 0.1], [5.0, -4.0]]
EMAS = [[1.0, 1.0], [1.1, 1.0], [1.0, 0.9], [1.2, 1.1], [-3.0, 6.0]]
SIZES = [10, 20, 30, 40, 50]


def replies():
    return [reply(i, n, net, ema) for i, (n, net, ema) in enumerate(zip(SIZES, NETS, EMAS))]


def krum_scores(vectors, f):
    """Blanchard et al.: each vector's sum of squared distances to its K-f-2 nearest others."""
    d = np.array([[np.sum((a - b) ** 2) for b in vectors] for a in vectors])
    nearest = max(1, len(vectors) - f - 2)
    return np.array([np.sort(np.delete(row, i))[:nearest].sum() for i, row in enumerate(d)])


def flat(i):
    return np.concatenate([NETS[i], EMAS[i]])  # one reply = raw and EMA as one vector


def test_krum_keeps_the_one_reply_closest_to_its_neighbours_raw_and_ema_together(flower_identity):
    scores = krum_scores([flat(i) for i in range(5)], f=1)
    best = int(np.argmin(scores))
    # client 1 [0.2, 0 | 1.1, 1]: its K-f-2 = 2 nearest are clients 3 and 0, 0.04 and 0.05 away (squared)
    assert best == 1 and scores[1] == pytest.approx(0.09) and scores[4] > 100
    out, _ = built("krum", 5, **{"malicious-clients": 1}).aggregate_train(1, replies())
    np.testing.assert_allclose(out["net.w"].numpy(), NETS[best], rtol=1e-6)
    np.testing.assert_allclose(out["ema.w"].numpy(), EMAS[best], rtol=1e-6)


def test_multikrum_averages_the_m_best_by_shard_size(flower_identity):
    scores = krum_scores([flat(i) for i in range(5)], f=1)
    chosen = np.argsort(scores)[:3]
    assert sorted(chosen.tolist()) == [0, 1, 3]
    w = np.array([SIZES[i] for i in chosen], float)
    want_net = sum(w_i * np.array(NETS[i]) for w_i, i in zip(w, chosen)) / w.sum()
    want_ema = sum(w_i * np.array(EMAS[i]) for w_i, i in zip(w, chosen)) / w.sum()
    s = built("multikrum", 5, **{"malicious-clients": 1, "multikrum-select": 3})
    out, outcome = s.aggregate_round(1, replies())
    np.testing.assert_allclose(out["net.w"].numpy(), want_net, rtol=1e-6)
    np.testing.assert_allclose(out["ema.w"].numpy(), want_ema, rtol=1e-6)
    assert [c.partition_id for c in outcome.clients] == [0, 1, 2, 3, 4]  # every client's round is still reported


def test_bulyan_trims_around_the_median_of_the_multikrum_selection(flower_identity):
    nets = NETS + [[0.3, 0.2], [-7.0, 9.0]]
    emas = [[1.0, 1.0], [1.13, 1.04], [0.95, 0.87], [1.21, 1.11], [-3.0, 6.0], [0.88, 1.26], [8.0, -8.0]]  # no ties
    k, f = 7, 1
    vectors = [np.concatenate([n, e]) for n, e in zip(nets, emas)]
    theta, beta = k - 2 * f, k - 4 * f  # 5 selected by MultiKrum, then per coordinate the 3 nearest the median
    selected = np.argsort(krum_scores(vectors, f))[:theta]
    assert 4 not in selected and 6 not in selected
    stack = np.stack([vectors[i] for i in selected])
    med = np.median(stack, axis=0)
    want = np.array([np.mean(col[np.argsort(np.abs(col - m))[:beta]]) for col, m in zip(stack.T, med)])
    out, _ = built("bulyan", k, **{"malicious-clients": f}).aggregate_train(
        1, [reply(i, 10, n, e) for i, (n, e) in enumerate(zip(nets, emas))]
    )
    np.testing.assert_allclose(out["net.w"].numpy(), want[:2], rtol=1e-6)
    np.testing.assert_allclose(out["ema.w"].numpy(), want[2:], rtol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.5])
def test_qfedavg_follows_the_q_ffl_step_on_raw_and_ema(q, flower_identity):
    lr = 0.01
    s = built("qfedavg", 3, **{"qfedavg-q": q, "lr": lr})
    w = np.array([1.0, -1.0, 0.5, 0.5])  # global [net | ema]
    s.configure_train(1, arrays(w[:2], w[2:]), ConfigRecord(), FakeGrid())
    out, _ = s.aggregate_train(1, replies()[:3])
    L = 1 / lr
    num, den = np.zeros(4), 0.0
    for pid in range(3):
        loss = 0.1 * (pid + 1)  # the reply's "loss" metric (tests/test_aggregation.reply)
        g = L * (w - flat(pid))  # Li et al. 2020: Delta w_k = L (w - w_k)
        num += loss**q * g
        den += q * loss ** (q - 1) * np.sum(g**2) + L * loss**q  # (the 1e-10 Flower adds is below float32)
    want = w - num / den
    np.testing.assert_allclose(out["net.w"].numpy(), want[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["ema.w"].numpy(), want[2:], rtol=1e-5, atol=1e-6)
    if q == 0:  # q = 0: the unweighted mean of the replies
        np.testing.assert_allclose(want, np.mean([flat(i) for i in range(3)], axis=0), rtol=1e-9)


def test_fedadagrad_accumulates_squared_pseudo_gradients_per_key(flower_identity):
    eta, tau = 0.05, 0.01
    s = built("fedadagrad", 2, **{"fedopt-eta": eta, "fedopt-tau": tau})
    x = {"net.w": np.array([1.0, -2.0]), "ema.w": np.array([0.5, 0.5])}
    v = {k: np.zeros(2) for k in x}
    for rnd, (a, b) in enumerate(
        [(([1.2, -2.0], [0.5, 1.5]), ([1.6, -1.0], [0.9, 0.1])), (([0.0, 0.0], [0.4, 0.4]), ([2.0, -4.0], [0.6, 0.6]))],
        start=1,
    ):
        s.configure_train(rnd, arrays(x["net.w"], x["ema.w"]), ConfigRecord(), FakeGrid())
        out, _ = s.aggregate_train(rnd, [reply(0, 10, *a), reply(1, 30, *b)])
        for i, k in enumerate(("net.w", "ema.w")):
            delta = (10 * np.array(a[i]) + 30 * np.array(b[i])) / 40 - x[k]  # beta_1 = 0: m = delta
            v[k] = v[k] + delta**2
            x[k] = x[k] + eta * delta / (np.sqrt(v[k]) + tau)
            np.testing.assert_allclose(out[k].numpy(), x[k], rtol=1e-5, atol=1e-6, err_msg=f"round {rnd} {k}")


def test_adaptive_dp_clipping_moves_the_norm_and_survives_resume(flower_identity):
    c0, lr, quantile = 1.0, 0.2, 0.5
    keys = {"dp-clip-norm": c0, "dp-clipping": "adaptive", "dp-clip-norm-lr": lr, "dp-target-quantile": quantile}
    s = built("iet", 2, **keys)
    s.configure_train(1, arrays([0.0, 0.0], [0.0, 0.0]), ConfigRecord(), FakeGrid())
    # client 1's update [3, 0 | 0, 4] (norm 5 over raw + EMA) is clipped to norm 1; client 0's (norm 0.5) is not
    out, _ = s.aggregate_train(1, [reply(1, 10, [3.0, 0.0], [0.0, 4.0]), reply(0, 30, [0.3, 0.0], [0.0, 0.4])])
    np.testing.assert_allclose(out["net.w"].numpy(), [(10 * 0.6 + 30 * 0.3) / 40, 0.0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["ema.w"].numpy(), [0.0, (10 * 0.8 + 30 * 0.4) / 40], rtol=1e-5, atol=1e-9)
    c1 = c0 * np.exp(-lr * (1 / 2 - quantile))  # one of two clipped = the target: the norm stays
    assert s.clipping_norm == pytest.approx(c1)
    s.configure_train(2, out, ConfigRecord(), FakeGrid())
    s.aggregate_train(2, [reply(0, 30, [5.0, 0.0], [0.0, 5.0]), reply(1, 10, [5.0, 5.0], [5.0, 5.0])])
    c2 = c1 * np.exp(-lr * (2 / 2 - quantile))  # both clipped: the norm grows... by exp(-0.1): it shrinks
    assert s.clipping_norm == pytest.approx(c2)
    fresh = built("iet", 2, **keys)
    import_state(fresh, export_state(s))
    assert fresh.clipping_norm == s.clipping_norm and fresh.clipping_norm != c0


def test_rules_that_cannot_apply_are_refused_in_one_line_naming_the_key():
    cases = [
        (
            {"strategy": "bulyan", "malicious-clients": 1},
            6,
            "^malicious-clients = 1: bulyan needs K >= 4f\\+3 = 7 clients, K is 6$",
        ),
        ({"strategy": "krum", "malicious-clients": 1}, 4, "^malicious-clients = 1: krum needs K >= 2f\\+3 = 5"),
        ({"strategy": "multikrum", "multikrum-select": 5}, 4, "^multikrum-select = 5: must be <= K = 4$"),
        (
            {"dp-clip-norm": 1.0, "dp-clipping": "adaptive", "dp-noise-multiplier": 0.5},
            4,
            "^dp-noise-multiplier = 0.5: adaptive clipping with K = 4 needs it < K/10 = 0.4",
        ),
    ]
    for keys, k, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_strategy(parse_config(keys), k)
    with pytest.raises(ConfigError, match="^qfedavg-q = 1.0: only used by strategy qfedavg, not iet$"):
        parse_config({"qfedavg-q": 1.0})
    with pytest.raises(ConfigError, match="^malicious-clients = 1: only used by strategy bulyan / krum / multikrum"):
        parse_config({"strategy": "fedavg", "malicious-clients": 1})
    with pytest.raises(ConfigError, match="^dp-clipping = 'adaptive': needs dp-clip-norm > 0"):
        parse_config({"dp-clipping": "adaptive"})
    with pytest.raises(ConfigError, match='^dp-target-quantile = 0.9: only used with dp-clipping = "adaptive"$'):
        parse_config({"dp-clip-norm": 1.0, "dp-target-quantile": 0.9})
