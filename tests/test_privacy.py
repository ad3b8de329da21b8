"""Client-side clipping DP (dp-client-clip-norm): Flower's fixedclipping_mod on the clients, Flower's client-side
wrapper's Gaussian noise on the server, and the epsilon in metrics.json (Opacus' RDP accountant).

Runs use the real ServerApp and ClientApp on the in-process grid of tests/local_grid.py."""

import math
import re

import numpy as np
import pytest

from fl_ietagc.federation import protocol as P
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, parse_config
from fl_ietagc.training.privacy import effective_noise_multiplier, epsilon
from tests.local_grid import run_server
from tests.test_secure_aggregation import SMALL, RecordingGrid

K = 3


def opacus_epsilon(z: float, rounds: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    return accountant.get_epsilon(delta)


def test_epsilon_is_opacus_rdp_accounting_of_one_gaussian_release_per_round():
    assert epsilon([1.0] * 10, 1e-5) == opacus_epsilon(1.0, 10, 1e-5)
    assert epsilon([0.7, 0.7, 0.7], 1e-6) == opacus_epsilon(0.7, 3, 1e-6)
    assert epsilon([2.0] * 5, 1e-5) < epsilon([1.0] * 5, 1e-5) < epsilon([1.0] * 6, 1e-5)
    assert epsilon([0.0, 1.0], 1e-5) == math.inf and epsilon([], 1e-5) == 0.0


def test_unequal_shards_lower_the_effective_noise_multiplier():
    # std z*S/K on a size-weighted mean whose sensitivity is S * max n / sum n
    assert effective_noise_multiplier(1.0, 3, [32, 32, 32]) == 1.0
    assert effective_noise_multiplier(1.0, 3, [16, 32, 48]) == 96 / (3 * 48)
    assert effective_noise_multiplier(1.0, 3, [32, 32]) == 64 / 96  # a lost client under tolerate


def flat(arrays) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float64).ravel() for a in arrays.values()])


@pytest.mark.parametrize("secure", [False, True])
def test_clients_clip_their_update_and_the_server_adds_noise_of_std_z_s_over_k(tmp_path, secure):
    s, z = 0.05, 2.0
    cfg = {
        **SMALL,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "run-name": "dp",
        "dp-client-clip-norm": s,
        "dp-noise-multiplier": z,
        "dp-delta": 1e-6,
        **({"secure-aggregation": "secaggplus"} if secure else {}),
    }
    grid = RecordingGrid(K, cfg)
    run_server(cfg, K, grid)
    run = RunDir(tmp_path / "dp")
    start = load_checkpoint(run.checkpoint(1))
    start = np.concatenate(
        [v.numpy().astype(np.float64).ravel() for part in ("net", "ema") for v in start[part].values()]
    )
    end = load_checkpoint(run.final_checkpoint)
    end = np.concatenate([v.numpy().astype(np.float64).ravel() for part in ("net", "ema") for v in end[part].values()])
    n, std = start.size, z * s / K
    if not secure:  # the server sees each clipped update: norm S exactly (local training moves further than S)
        updates = [flat(m.content[P.ARRAYS]) - start for m in grid.received[-K:]]  # round 2's replies
        for u in updates:
            assert abs(np.linalg.norm(u) - s) < 1e-6
        noise, hidden = end - start - np.mean(updates, axis=0), 0.0  # (equal shards)
    else:  # the mean of the clipped updates stays hidden in it: a vector of norm <= S
        noise, hidden = end - start, s
    # noise ~ N(0, std^2) per weight: its empirical std within 1% (n ~ 8e5 weights), its mean near 0
    assert abs(np.std(noise) / std - 1) < 0.01 + hidden / (std * np.sqrt(n))
    assert abs(np.mean(noise)) < 5 * std / np.sqrt(n) + hidden / np.sqrt(n)
    privacy = [m["privacy"] for m in run.read_metrics()]
    assert [(p["rounds"], p["clip-norm"], p["noise-multiplier"], p["delta"], p["clipping"]) for p in privacy] == [
        (1, s, z, 1e-6, "client"),
        (2, s, z, 1e-6, "client"),
    ]
    assert [p["epsilon"] for p in privacy] == [opacus_epsilon(z, 1, 1e-6), opacus_epsilon(z, 2, 1e-6)]


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"dp-noise-multiplier": 1.0},
            "dp-noise-multiplier = 1.0: needs dp-clip-norm > 0 (the DP wrapper) or dp-client-clip-norm > 0",
        ),
        (
            {"dp-clip-norm": 1.0, "dp-client-clip-norm": 1.0},
            "dp-client-clip-norm = 1.0: clip on the server (dp-clip-norm) or on the clients, not both",
        ),
        ({"dp-delta": 1e-3}, "dp-delta = 0.001: only used with dp-noise-multiplier > 0"),
        (
            {"dp-client-clip-norm": 1.0, "transport-dtype": "bf16"},
            "dp-client-clip-norm = 1.0: Flower's clipping mod "
            'works on the arrays as they travel; needs transport-dtype = "fp32"',
        ),
        (
            {"dp-delta": 1.0, "dp-client-clip-norm": 1.0, "dp-noise-multiplier": 1.0},
            "dp-delta = 1.0: must be in (0, 1)",
        ),
    ],
)
def test_dp_keys_are_checked(raw, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_config(raw)


def test_client_clipping_combines_with_secure_aggregation_but_server_clipping_does_not():
    parse_config({"secure-aggregation": "secaggplus", "dp-client-clip-norm": 1.0, "dp-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="^dp-clip-norm = 1.0: server-side clipping needs each client's update"):
        parse_config({"secure-aggregation": "secaggplus", "dp-clip-norm": 1.0})


def test_a_failing_client_is_still_named_by_partition_through_the_clipping_mod(tmp_path, monkeypatch):
    from strategies.base import ClientRoundError

    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:1:raise")
    with pytest.raises(ClientRoundError, match=r"^partition 1, round 1: InjectedFault"):
        run_server({**SMALL, "output-dir": str(tmp_path), "run-name": "f", "dp-client-clip-norm": 0.05}, K)
