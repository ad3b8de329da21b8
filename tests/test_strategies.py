"""Swappable strategies: the aggregation math of Flower's classes as this app uses them, and key checks."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_ietagc.config import ConfigError, parse_config
from fl_ietagc.trainer import proximal_term
from strategies.registry import build_strategy, check_strategy
from test_aggregation import reply


class FakeGrid:
    def get_node_ids(self):
        return [101, 102, 103, 104, 105]


def built(name, k, **keys):
    s = build_strategy(parse_config({"strategy": name, **keys}), k)
    s.setup_app(k, {"run-dir": "/tmp/x", "run-token": "t", "num-clients": k})
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


def test_dp_wrapper_clips_each_update_and_keeps_app_behaviour(flower_identity):
    s = built("iet", 2, **{"dp-clip-norm": 0.1})  # noise 0: only clipping
    s.configure_train(1, arrays([0.0, 0.0], [0.0, 0.0]), ConfigRecord(), FakeGrid())
    out, _ = s.aggregate_train(1, [reply(1, 10, [3.0, 4.0], [0.0, 0.0]), reply(0, 10, [0.03, 0.0], [0.0, 0.0])])
    # client 1's update (norm 5 over raw + EMA) is scaled to norm 0.1 -> [0.06, 0.08]; client 0's (norm 0.03)
    # is under the clip norm and kept. (Flower divides by the norm: an exactly-zero update would crash it.)
    np.testing.assert_allclose(out["net.w"].numpy(), [(0.06 + 0.03) / 2, 0.04], rtol=1e-5)
    assert [c.partition_id for c in s.last_round] == [0, 1]


def test_fedadam_uses_the_configured_server_rate():
    s = built("fedadam", 2, **{"fedopt-eta": 0.002})
    assert s.eta == 0.002 and s.tau == 1e-3


def test_keys_of_other_strategies_are_not_silently_ignored():
    with pytest.raises(ConfigError, match="^fedprox-mu = 0.5: only used by strategy fedprox, not iet"):
        check_strategy("iet", parse_config({"fedprox-mu": 0.5}))
    check_strategy("fedprox", parse_config({"fedprox-mu": 0.5}))
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
    from experiments import simulate
    from fl_ietagc.checkpoints import RunDir, load_checkpoint

    strategy, _, dp = name.partition("+")
    extra = ' dp-clip-norm=1.0 dp-noise-multiplier=0.001' if dp else ""
    code = simulate.main(["--app", ".", "--num-supernodes", "2", "--backend-config",
                          '{"client_resources": {"num_cpus": 1}}', "--run-config",
                          f'strategy="{strategy}" max-images=128 batch-size=32 local-epochs=1 num-server-rounds=1 '
                          f'sample-count=0 output-dir="{tmp_path}" run-name="r"{extra}'])
    assert code == 0
    run = RunDir(tmp_path / "r")
    assert run.read_status()["status"] == "completed" and len(run.read_metrics()) == 1
    final = load_checkpoint(run.final_checkpoint)
    assert set(final["net"]) == set(final["ema"]) and all(torch.isfinite(v).all() for v in final["net"].values())
