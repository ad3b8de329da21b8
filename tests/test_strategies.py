"""Swappable strategies: the aggregation math of Flower's classes as this app uses them, and key checks."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_ietagc.settings.config import ConfigError, parse_config
from fl_ietagc.training.trainer import proximal_term
from strategies.registry import build_strategy
from tests.backends import ONE_ACTOR_JSON
from tests.test_aggregation import reply


class FakeGrid:
    def get_node_ids(self):
        return [101, 102, 103, 104, 105]


def built(name, k, **keys):
    s = build_strategy(parse_config({"strategy": name, **keys}), k)
    s.setup_app(k)
    return s


def arrays(net, ema):
    return ArrayRecord({"net.w": Array(np.asarray(net, np.float32)), "ema.w": Array(np.asarray(ema, np.float32))})


def test_fedavgm_applies_server_momentum_to_raw_and_ema(flower_identity):
    s = built("fedavgm", 2, **{"fedavgm-lr": 0.5, "fedavgm-momentum": 0.9})
    w0 = np.array([1.0, 1.0])
    s.configure_train(1, arrays(w0, w0), ConfigRecord(), FakeGrid())
    out1, _ = s.aggregate_train(1, [reply(0, 10, [0.0, 2.0], [0.0, 2.0]), reply(1, 30, [0.4, 2.4], [0.4, 2.4])])
    avg1 = np.array([0.3, 2.3])  # (10 * [0, 2] + 30 * [0.4, 2.4]) / 40
    v1 = w0 - avg1  # pseudo-gradient; first round: momentum buffer = it
    w1 = w0 - 0.5 * v1
    for key in ("net.w", "ema.w"):
        np.testing.assert_allclose(out1[key].numpy(), w1, rtol=1e-6)
    s.configure_train(2, out1, ConfigRecord(), FakeGrid())
    out2, _ = s.aggregate_train(2, [reply(0, 10, [1.0, 1.0], [1.0, 1.0]), reply(1, 30, [1.0, 1.0], [1.0, 1.0])])
    v2 = 0.9 * v1 + (w1 - np.array([1.0, 1.0]))
    np.testing.assert_allclose(out2["net.w"].numpy(), w1 - 0.5 * v2, rtol=1e-6)
    np.testing.assert_allclose(out2["ema.w"].numpy(), w1 - 0.5 * v2, rtol=1e-6)


def test_fedavgm_keeps_a_separate_momentum_for_raw_and_ema(flower_identity):
    s = built("fedavgm", 2, **{"fedavgm-lr": 0.5, "fedavgm-momentum": 0.9})
    net0, ema0 = np.array([1.0, 1.0]), np.array([0.0, 2.0])
    s.configure_train(1, arrays(net0, ema0), ConfigRecord(), FakeGrid())
    out1, _ = s.aggregate_train(1, [reply(0, 10, [0.0, 2.0], [1.0, 1.0]), reply(1, 30, [0.4, 2.4], [-1.0, 3.0])])
    v_net = net0 - np.array([0.3, 2.3])
    v_ema = ema0 - np.array([-0.5, 2.5])  # (10 * [1, 1] + 30 * [-1, 3]) / 40
    net1, ema1 = net0 - 0.5 * v_net, ema0 - 0.5 * v_ema
    np.testing.assert_allclose(out1["net.w"].numpy(), net1, rtol=1e-6)
    np.testing.assert_allclose(out1["ema.w"].numpy(), ema1, rtol=1e-6)
    s.configure_train(2, out1, ConfigRecord(), FakeGrid())
    out2, _ = s.aggregate_train(2, [reply(0, 10, [1.0, 0.0], [2.0, 2.0]), reply(1, 30, [1.0, 0.0], [2.0, 2.0])])
    v_net, v_ema = 0.9 * v_net + (net1 - [1.0, 0.0]), 0.9 * v_ema + (ema1 - [2.0, 2.0])
    np.testing.assert_allclose(out2["net.w"].numpy(), net1 - 0.5 * v_net, rtol=1e-6)
    np.testing.assert_allclose(out2["ema.w"].numpy(), ema1 - 0.5 * v_ema, rtol=1e-6)


def test_fedprox_sends_mu_and_the_client_term_has_the_right_gradient(flower_identity):
    s = built("fedprox", 2, **{"fedprox-mu": 0.3})
    messages = list(s.configure_train(1, arrays([1.0], [1.0]), ConfigRecord(), FakeGrid()))
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = 0.5 * 0.3 * proximal_term(w, anchor)
    assert term.item() == pytest.approx(0.15 * (1 + 4 + 4))
    term.backward()
    torch.testing.assert_close(w[0].grad, 0.3 * torch.tensor([1.0, 2.0]))  # mu * (w - w_global)
    torch.testing.assert_close(w[1].grad, 0.3 * torch.tensor([[2.0]]))


def test_fedmedian_and_trimmed_mean_per_coordinate(flower_identity):
    values = [[0.0, 10.0], [1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0]]
    replies = lambda: [reply(i, 10 * (i + 1), v, v) for i, v in enumerate(values)]  # noqa: E731
    med, _ = built("fedmedian", 5).aggregate_train(1, replies())
    np.testing.assert_allclose(med["net.w"].numpy(), [2.0, 1.0])
    np.testing.assert_allclose(med["ema.w"].numpy(), [2.0, 1.0])
    trim, _ = built("fedtrimmedavg", 5, **{"trim-beta": 0.2}).aggregate_train(1, replies())
    np.testing.assert_allclose(trim["net.w"].numpy(), [(1 + 2 + 3) / 3, (0 + 1 + 2) / 3], rtol=1e-6)
    np.testing.assert_allclose(trim["ema.w"].numpy(), [(1 + 2 + 3) / 3, (0 + 1 + 2) / 3], rtol=1e-6)
    # EMA values of their own: the EMA is aggregated from the EMA replies, coordinate by coordinate
    emas = [[-v0, 2 * v1] for v0, v1 in values]  # [0, 20], [-1, -10], [-2, 0], [-100, 2], [-3, 4]
    own = lambda: [reply(i, 10 * (i + 1), v, e) for i, (v, e) in enumerate(zip(values, emas))]  # noqa: E731
    med, _ = built("fedmedian", 5).aggregate_train(1, own())
    np.testing.assert_allclose(med["net.w"].numpy(), [2.0, 1.0])
    np.testing.assert_allclose(med["ema.w"].numpy(), [-2.0, 2.0])
    trim, _ = built("fedtrimmedavg", 5, **{"trim-beta": 0.2}).aggregate_train(1, own())
    np.testing.assert_allclose(trim["net.w"].numpy(), [2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(trim["ema.w"].numpy(), [(-3 - 2 - 1) / 3, (0 + 2 + 4) / 3], rtol=1e-6)


def test_dp_wrapper_clips_each_update_and_keeps_app_behaviour(flower_identity):
    s = built("iet", 2, **{"dp-clip-norm": 0.1})  # noise 0: only clipping
    s.configure_train(1, arrays([0.0, 0.0], [0.0, 0.0]), ConfigRecord(), FakeGrid())
    out, outcome = s.aggregate_round(1, [reply(1, 10, [3.0, 4.0], [0.0, 0.0]), reply(0, 10, [0.03, 0.0], [0.0, 0.0])])
    # client 1's update (norm 5 over raw + EMA) is scaled to norm 0.1 -> [0.06, 0.08]; client 0's (norm 0.03)
    # is under the clip norm and kept. (Flower divides by the norm: an exactly-zero update would crash it.)
    np.testing.assert_allclose(out["net.w"].numpy(), [(0.06 + 0.03) / 2, 0.04], rtol=1e-5)
    np.testing.assert_allclose(out["ema.w"].numpy(), [0.0, 0.0], atol=1e-7)
    assert [c.partition_id for c in outcome.clients] == [0, 1]


def test_dp_clips_raw_and_ema_as_one_vector(flower_identity):
    s = built("iet", 2, **{"dp-clip-norm": 0.1})
    s.configure_train(1, arrays([0.0, 0.0], [0.0, 0.0]), ConfigRecord(), FakeGrid())
    out, _ = s.aggregate_train(1, [reply(1, 10, [3.0, 0.0], [0.0, 4.0]), reply(0, 30, [0.03, 0.0], [0.0, 0.04])])
    # client 1: norm 5 over raw and EMA together -> x 0.02: raw [0.06, 0], EMA [0, 0.08] (clipped key by key it
    # would be [0.1, 0] and [0, 0.1]); client 0: norm 0.05, kept. Then IET's size-weighted mean (10 vs 30).
    np.testing.assert_allclose(out["net.w"].numpy(), [(10 * 0.06 + 30 * 0.03) / 40, 0.0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["ema.w"].numpy(), [0.0, (10 * 0.08 + 30 * 0.04) / 40], rtol=1e-5, atol=1e-9)


def test_fedadam_uses_the_configured_server_rate():
    s = built("fedadam", 2, **{"fedopt-eta": 0.002})
    assert s.eta == 0.002 and s.tau == 1e-3


def two_fedopt_rounds(name):
    """Two rounds of fedadam/fedyogi (eta 0.05, tau 0.01) on hand-picked replies: the returned arrays per round."""
    s = built(name, 2, **{"fedopt-eta": 0.05, "fedopt-tau": 0.01})
    current = arrays([1.0, -2.0, 0.5], [0.5, 0.5, 0.5])
    outs = []
    for rnd, (nets, emas) in enumerate(
        [
            ([[1.2, -2.0, 0.3], [1.6, -1.0, 0.5]], [[0.5, 1.5, 0.1], [0.9, 0.1, 0.5]]),
            ([[0.0, 0.0, 0.0], [2.0, -4.0, 1.0]], [[0.4, 0.4, 0.4], [0.6, 0.6, 0.6]]),
        ],
        start=1,
    ):
        s.configure_train(rnd, current, ConfigRecord(), FakeGrid())
        current, _ = s.aggregate_train(rnd, [reply(0, 10, nets[0], emas[0]), reply(1, 30, nets[1], emas[1])])
        outs.append({k: current[k].numpy().astype(np.float64) for k in ("net.w", "ema.w")})
    return outs


def expected_fedopt(name):
    """Flower's FedAdam / FedYogi (Reddi et al. 2020, Flower's defaults beta_1 = 0.9, beta_2 = 0.99), per key:
    delta = size-weighted mean - current; m = b1 m + (1 - b1) delta;
    Adam: v = b2 v + (1 - b2) delta^2, x += eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + tau);
    Yogi: v = v - (1 - b2) delta^2 sign(v - delta^2), x += eta m / (sqrt(v) + tau)."""
    b1, b2, eta, tau = 0.9, 0.99, 0.05, 0.01
    x = {"net.w": np.array([1.0, -2.0, 0.5]), "ema.w": np.array([0.5, 0.5, 0.5])}
    means = [
        {"net.w": np.array([1.5, -1.25, 0.45]), "ema.w": np.array([0.8, 0.45, 0.4])},  # (10 a + 30 b) / 40
        {"net.w": np.array([1.5, -3.0, 0.75]), "ema.w": np.array([0.55, 0.55, 0.55])},
    ]
    m = {k: np.zeros(3) for k in x}
    v = {k: np.zeros(3) for k in x}
    outs = []
    for t, mean in enumerate(means, start=1):
        for k in x:
            delta = mean[k] - x[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * delta**2
                rate = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            else:
                v[k] = v[k] - (1 - b2) * delta**2 * np.sign(v[k] - delta**2)
                rate = eta
            x[k] = x[k] + rate * m[k] / (np.sqrt(v[k]) + tau)
        outs.append({k: x[k].copy() for k in x})
    return outs


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedadam_and_fedyogi_aggregate_raw_and_ema_by_the_documented_update(name, flower_identity):
    got, want = two_fedopt_rounds(name), expected_fedopt(name)
    for rnd in range(2):
        for key in ("net.w", "ema.w"):
            np.testing.assert_allclose(got[rnd][key], want[rnd][key], rtol=2e-5, atol=1e-6, err_msg=f"{rnd} {key}")


def test_keys_of_other_strategies_are_not_silently_ignored():
    with pytest.raises(ConfigError, match="^fedprox-mu = 0.5: only used by strategy fedprox, not iet"):
        parse_config({"fedprox-mu": 0.5})
    assert parse_config({"strategy": "fedprox", "fedprox-mu": 0.5}).fedprox_mu == 0.5
    with pytest.raises(ConfigError, match="^dp-noise-multiplier"):
        parse_config({"dp-noise-multiplier": 1.0})


def test_plain_fedavg_tells_clients_to_reset_the_optimizer(flower_identity):
    messages = list(built("fedavg", 2).configure_train(1, arrays([1.0], [1.0]), ConfigRecord(), FakeGrid()))
    assert all(m.content["config"]["reset-optimizer"] is True for m in messages)
    messages = list(built("iet", 2).configure_train(1, arrays([1.0], [1.0]), ConfigRecord(), FakeGrid()))
    assert all("reset-optimizer" not in m.content["config"] for m in messages)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iet+dp", "fedadam+dp"])
def test_dp_wrapped_strategies_run_a_simulated_round(name, tmp_path):
    """Every plain strategy runs in the strategies smoke study (tests/test_studies.py)."""
    from experiments.launch import simulate
    from fl_ietagc.runs.checkpoints import load_checkpoint
    from fl_ietagc.runs.rundir import RunDir

    strategy, _, dp = name.partition("+")
    extra = " dp-clip-norm=1.0 dp-noise-multiplier=0.001" if dp else ""
    code = simulate.main(
        [
            "--app",
            ".",
            "--num-supernodes",
            "2",
            "--backend-config",
            ONE_ACTOR_JSON,
            "--run-config",
            f'strategy="{strategy}" max-images=128 batch-size=32 local-epochs=1 num-server-rounds=1 '
            f'sample-count=0 output-dir="{tmp_path}" run-name="r"{extra}',
        ]
    )
    assert code == 0
    run = RunDir(tmp_path / "r")
    assert run.read_status()["status"] == "completed" and len(run.read_metrics()) == 1
    final = load_checkpoint(run.final_checkpoint)
    assert set(final["net"]) == set(final["ema"]) and all(torch.isfinite(v).all() for v in final["net"].values())


def test_every_strategy_name_of_the_config_has_a_builder():
    from fl_ietagc.settings.config import STRATEGIES as NAMES
    from strategies.registry import STRATEGIES

    assert sorted(NAMES) == sorted(STRATEGIES)
