"""SecAgg+ (secure-aggregation = "secaggplus"): Flower's protocol inside this app's round loop.

The real ServerApp and ClientApp (with its mods) run on the in-process grid of tests/local_grid.py, every
message through Flower's serialization (as in deployment); one slow case runs flower-simulation.
"""

from pathlib import Path

import numpy as np
import pytest

from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.secure_sum import error_bound, max_weight, shares_and_threshold
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, parse_config
from tests.backends import ONE_ACTOR_JSON
from tests.local_grid import LocalGrid, run_server

ROOT = Path(__file__).resolve().parents[1]
K = 3
SMALL = {
    "max-images": 96,
    "batch-size": 32,
    "local-epochs": 1,
    "num-server-rounds": 1,
    "diffusion-steps": 20,
    "agc-lambda": 1.2,
    "warmup-steps": 0,
    "sample-count": 0,
    "num-clients": K,
}
SECURE = {"secure-aggregation": "secaggplus"}
C, Q = 8.0, 2**22  # the defaults of secagg-clipping-range / secagg-quantization-range


class RecordingGrid(LocalGrid):
    """Keeps every reply the ServerApp receives (after Flower's serialization, as the server gets them)."""

    def __init__(self, k, run_config):
        super().__init__(k, run_config)
        self.received = []

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        self.received += replies
        return replies


def run(tmp_path, name, **keys):
    cfg = {**SMALL, "output-dir": str(tmp_path), "run-name": name, **keys}
    grid = run_server(cfg, K, RecordingGrid(K, cfg))
    return grid, RunDir(tmp_path / name)


def final(run_dir):
    blob = load_checkpoint(run_dir.final_checkpoint)
    return {f"{part}.{k}": v.numpy() for part in ("net", "ema") for k, v in blob[part].items()}


def assert_within(secure, plain, bound, k):
    """Elementwise |secure - plain| <= the protocol's bound + float32 rounding (the secure mean is rounded once
    to float32; Flower's plain mean sums k float32 products)."""
    worst = 0.0
    for key, p in plain.items():
        s = secure[key].astype(np.float64)
        p = p.astype(np.float64)
        slack = bound + (k + 2) * 2.0**-24 * np.maximum(np.abs(s), np.abs(p))
        assert (np.abs(s - p) <= slack).all(), key
        worst = max(worst, float(np.abs(s - p).max()))
    return worst


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg")
    return run(base, "secure", **SECURE), run(base, "plain")


def test_the_secure_mean_of_raw_and_ema_equals_plain_iet_within_the_quantization_bound(both_runs):
    (_, secure), (_, plain) = both_runs
    bound = error_bound([32] * K, C, Q)
    assert bound == K * (2 * C / Q) / (K * 32 / 32)  # M = 32: every weight n_c / M = 1, exactly
    worst = assert_within(final(secure), final(plain), bound, K)
    assert 0 < worst  # (the protocol did quantize)
    # the clients trained the same: every per-client number the server logs is equal
    strip = lambda m: [
        {k: v for k, v in c.items() if k not in ("seconds", "pid", "host", "ray-node")}  # noqa: E731
        for c in m["clients"]
    ]
    assert [strip(m) for m in secure.read_metrics()] == [strip(m) for m in plain.read_metrics()]


def test_fedadagrad_on_the_masked_mean_stays_within_eta_over_tau_times_the_bound(tmp_path):
    """FedAdagrad's step eta * d / (sqrt(v) + tau) on the pseudo-gradient d moves by at most eta / tau per unit of d
    (its slope in d is at most 1 / tau): so the secure run's weights stay within (eta / tau) x the protocol's bound
    of the plain run's (the defaults, eta = tau = 1e-3: within the bound itself)."""
    _, secure = run(tmp_path, "secure", strategy="fedadagrad", **SECURE)
    _, plain = run(tmp_path, "plain", strategy="fedadagrad")
    cfg = parse_config({**SMALL, "strategy": "fedadagrad"})
    bound = cfg.fedopt_eta / cfg.fedopt_tau * error_bound([32] * K, C, Q)
    assert 0 < assert_within(final(secure), final(plain), bound, K)
    fedavg = final(run(tmp_path, "fedavg", strategy="fedavg")[1])  # (FedAdagrad's own step was taken)
    assert any(not np.allclose(fedavg[k], v) for k, v in final(plain).items())


def test_the_server_never_holds_a_clients_weights(both_runs):
    from flwr.common import bytes_to_ndarray

    (secure_grid, _), (plain_grid, _) = both_runs
    # each client's weights, as the plain run's server received them (the clients train alike in both runs)
    clients = {
        int(m.content[P.INFO]["partition-id"]): [
            a.numpy().astype(np.float64).ravel() for a in m.content[P.ARRAYS].values()
        ]
        for m in plain_grid.received
    }
    assert sorted(clients) == list(range(K))
    masked = 0
    for reply in secure_grid.received:  # every stage of the protocol
        assert not reply.has_error()
        for record in reply.content.array_records.values():
            assert len(record) == 0  # Flower's mod clears every ArrayRecord of the reply
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if not isinstance(item, bytes) or not item.startswith(b"\x93NUMPY"):
                        continue  # (public keys, encrypted shares, our metrics and info)
                    vector = bytes_to_ndarray(item).astype(np.float64).ravel()
                    masked += 1
                    for weights in clients.values():
                        for w in weights:
                            if w.size == vector.size:
                                naive = vector * (2 * C / Q) - C  # what dequantizing it alone would give
                                assert np.mean(np.abs(naive - w) < 1e-3) < 0.01
    n_arrays = len(clients[0])
    assert masked == K * (n_arrays + 1)  # K masked vectors: the weight factor + every array, nothing else


def test_bf16_transport_the_clients_decode_before_masking(tmp_path):
    """transport-dtype = bf16: each client masks the bfloat16-rounded weights plain aggregation would average."""
    bf16 = {"transport-dtype": "bf16"}
    _, secure = run(tmp_path, "secure", **SECURE, **bf16)
    _, plain = run(tmp_path, "plain", **bf16)
    assert_within(final(secure), final(plain), error_bound([32] * K, C, Q), K)


def test_a_client_lost_mid_round_is_recovered_by_the_reconstruction_threshold(tmp_path, monkeypatch):
    """Partition 1 fails after the key exchange, in the train stage: its pairwise masks are rebuilt from the
    other clients' shares, and the mean is over partitions 0 and 2, as plain IET's under the same failure."""
    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:1:raise")
    lost = {"client-failures": "tolerate", "min-clients-fraction": 0.5}
    _, secure = run(tmp_path, "secure", **SECURE, **lost)
    _, plain = run(tmp_path, "plain", **lost)
    for r in (secure, plain):
        [m] = r.read_metrics()
        assert [c["partition-id"] for c in m["clients"]] == [0, 2]
        assert [f["partition-id"] for f in m["failed"]] == [1]
        assert "InjectedFault" in m["failed"][0]["error"]
    assert shares_and_threshold(K, 0, 0) == (3, 2)
    assert_within(final(secure), final(plain), error_bound([32, 32], C, Q), 2)


def test_too_few_share_holders_stop_the_round_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_FAULT", "client-train-p1:1:raise")
    with pytest.raises(
        RuntimeError,
        match=r"^round 1: SecAgg\+ could not unmask the sum: fewer than "
        r"secagg-reconstruction-threshold = 3 share holders",
    ):
        run(
            tmp_path,
            "s",
            **SECURE,
            **{"client-failures": "tolerate", "min-clients-fraction": 0.5, "secagg-reconstruction-threshold": 3},
        )
    assert RunDir(tmp_path / "s").read_status()["status"] == "failed"


def test_a_weight_outside_the_clipping_range_is_the_clients_named_error(tmp_path):
    from strategies.base import ClientRoundError

    with pytest.raises(
        ClientRoundError,
        match=r"^partition 0, round 1: ValueError: secagg-clipping-range = 0\.5: "
        r"weight .* reaches .*, which SecAgg\+ would clip; raise ",
    ):
        run(tmp_path, "c", **SECURE, **{"secagg-clipping-range": 0.5})


def test_max_weight_and_bound():
    assert max_weight([30, 33, 12], 2**22) == 64 and max_weight([32], 2**22) == 32
    assert error_bound([30, 33], 8.0, 2**22) == 2 * (16 / 2**22) / (63 / 64)
    with pytest.raises(ValueError, match="a shard of 40 images needs a quantization range of at least 64"):
        max_weight([40], 32)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"strategy": "fedmedian"},
            "strategy = 'fedmedian': cannot run with secure-aggregation = \"secaggplus\" (its "
            "coordinate-wise median needs each client's weights; the server only gets the masked sum); use one of iet, "
            "fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad",
        ),
        (
            {"strategy": "fedtrimmedavg"},
            "strategy = 'fedtrimmedavg': cannot run with secure-aggregation = "
            '"secaggplus" (its trimmed mean needs each client\'s weights to sort them; the server only gets the masked '
            "sum); use one of iet, fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad",
        ),
        (
            {"strategy": "multikrum"},
            "strategy = 'multikrum': cannot run with secure-aggregation = \"secaggplus\" (it picks the replies "
            "closest to the others, which needs each client's weights; the server only gets the masked sum); use one "
            "of iet, fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad",
        ),
        (
            {"strategy": "qfedavg"},
            "strategy = 'qfedavg': cannot run with secure-aggregation = \"secaggplus\" (its q-fair weights need "
            "each client's own update and loss; the server only gets the masked sum); use one of iet, fedavg, "
            "fedavgm, fedprox, fedadam, fedyogi, fedadagrad",
        ),
        (
            {"dp-clip-norm": 1.0},
            "dp-clip-norm = 1.0: server-side clipping needs each client's update, which "
            'secure-aggregation = "secaggplus" hides; clip on the clients instead',
        ),
        (
            {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 3},
            "secagg-reconstruction-threshold = 3: must be < secagg-num-shares (3)",
        ),
        (
            {"num-clients": 1024},
            "secagg-quantization-range = 4194304: with 1024 clients the masked sums would overflow "
            "the protocol's modulus 2^32; needs num-clients * secagg-quantization-range < 2^32",
        ),
        ({"num-clients": 1}, "num-clients = 1: secure-aggregation needs at least 2 clients"),
        ({"num-clients": 4, "secagg-num-shares": 5}, "secagg-num-shares = 5: more than the 4 clients"),
        ({"secagg-quantization-range": 1000}, "secagg-quantization-range = 1000: must be a power of two in [16, 2^32)"),
        ({"secagg-num-shares": 2}, "secagg-num-shares = 2: must be 0 (every client) or >= 3"),
    ],
)
def test_settings_that_cannot_work_on_a_masked_sum_are_refused_before_anything_starts(raw, message):
    import re

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_config({**SECURE, **raw})


def test_secagg_keys_without_secure_aggregation_are_refused():
    with pytest.raises(
        ConfigError,
        match=r"^secagg-clipping-range = 4.0: only used with secure-aggregation = "
        r'"secaggplus"$',
    ):
        parse_config({"secagg-clipping-range": 4.0})


def test_validation_refuses_a_shard_larger_than_the_quantization_range():
    from fl_ietagc.validate import validate_run

    cfg = parse_config({**SECURE, "secagg-quantization-range": 32, "max-images": 96})
    with pytest.raises(
        ConfigError,
        match=r"^secagg-quantization-range = 32: a shard of 48 images needs a "
        r"quantization range of at least 64 for exact shard-size weights$",
    ):
        validate_run(cfg, 2)


@pytest.mark.slow
def test_secure_aggregation_in_the_simulation_engine(tmp_path):
    from experiments.launch import simulate

    overrides = (
        f"max-images=96 batch-size=32 local-epochs=1 num-server-rounds=2 diffusion-steps=20 "
        f'warmup-steps=0 sample-count=0 device="cpu" run-name="s" output-dir="{tmp_path}" '
        f'secure-aggregation="secaggplus" strategy="fedavgm"'
    )
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "3",
            "--run-config",
            overrides,
            "--backend-config",
            ONE_ACTOR_JSON,
        ]
    )
    assert code == 0
    run_dir = RunDir(tmp_path / "s")
    assert run_dir.read_status()["status"] == "completed"
    assert [[c["partition-id"] for c in m["clients"]] for m in run_dir.read_metrics()] == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.slow
def test_secure_aggregation_in_a_deployment_equals_the_in_process_grid(tmp_path):
    """scripts/deploy-local.sh (TLS, K = 2, a long-lived ClientApp process per SuperNode: the protocol's keys live in
    each SuperNode's context between the stages) gives the in-process grid's weights, bit for bit: the stochastic
    rounding is seeded and the masked sums are exact integers."""
    from tests.test_deployment import (
        CONFIG,
        RUN_NAME,
        assert_same_weights,
        reference_weights,
        start_deploy,
        stop_deploy,
    )

    deploy, out, ports = start_deploy(tmp_path, "process", {**CONFIG, "secure-aggregation": '"secaggplus"'}, threads=1)
    try:
        code = deploy.wait(timeout=480)
    finally:
        stop_deploy(deploy, tmp_path / "work", ports)
    assert code == 0, out.read_text()[-4000:]
    run_dir = RunDir(tmp_path / "runs" / RUN_NAME)
    assert [[c["partition-id"] for c in m["clients"]] for m in run_dir.read_metrics()] == [[0, 1], [0, 1]]
    reference = reference_weights(tmp_path / "ref", {**CONFIG, **SECURE}, threads=1)
    assert_same_weights(reference, load_checkpoint(run_dir.final_checkpoint))
