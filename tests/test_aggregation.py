"""The IET strategy: size-weighted averages of raw and EMA weights, partition order, failures."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fl_ietagc.iet_loop import weighted_average
from strategies.base import ClientRoundError
from strategies.iet import IET


def reply(pid, n, net, ema, skips=None):
    request = Message(RecordDict(), dst_node_id=100 + pid, message_type="train")
    arrays = ArrayRecord({"net.w": Array(np.asarray(net, np.float32)), "ema.w": Array(np.asarray(ema, np.float32))})
    metrics = MetricRecord({"num-examples": n, "loss": 0.1 * (pid + 1), "kept": n - pid, "skipped": pid, "steps": 1,
                            "seconds": 1.0, "client-step": 3})
    info = ConfigRecord({"partition-id": pid, "image-ids": list(range(pid * 10, pid * 10 + 3)),
                         "skip-counts": skips or [0, 1, 0]})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "info": info}), reply_to=request)


def strategy(k):
    s = IET(k)
    s.setup_app(k, {"run-dir": "/tmp/x", "run-token": "t", "num-clients": k})
    return s


def test_raw_and_ema_are_size_weighted_averages_separately(flower_identity):
    nets = [[1.0, 2.0], [3.0, -1.0], [10.0, 0.5]]
    emas = [[0.0, 1.0], [5.0, 5.0], [-2.0, 4.0]]
    sizes = [100, 300, 600]
    replies = [reply(i, sizes[i], nets[i], emas[i]) for i in (2, 0, 1)]  # arrival order shuffled
    arrays, metrics = strategy(3).aggregate_train(1, replies)
    w = np.array(sizes, float) / sum(sizes)
    np.testing.assert_allclose(arrays["net.w"].numpy(), w @ np.array(nets), rtol=1e-6)
    np.testing.assert_allclose(arrays["ema.w"].numpy(), w @ np.array(emas), rtol=1e-6)
    assert metrics["loss"] == pytest.approx(float(w @ [0.1, 0.2, 0.3]))
    assert metrics["skipped"] == 0 + 1 + 2 and metrics["kept"] == 100 + 299 + 598
    assert metrics["skip-rate-per-client"] == pytest.approx([0 / 100, 1 / 300, 2 / 600])


def test_aggregation_is_order_independent_and_matches_the_plain_loop(flower_identity):
    rng = np.random.default_rng(0)
    nets = [rng.normal(size=1000).astype(np.float32) for _ in range(4)]
    sizes = [403, 403, 404, 402]
    a, _ = strategy(4).aggregate_train(1, [reply(i, sizes[i], nets[i], nets[i]) for i in range(4)])
    b, _ = strategy(4).aggregate_train(1, [reply(i, sizes[i], nets[i], nets[i]) for i in (3, 1, 0, 2)])
    assert np.array_equal(a["net.w"].numpy(), b["net.w"].numpy())  # bit-identical: sorted by partition
    import torch

    loop = weighted_average([(sizes[i], {"net.w": torch.from_numpy(nets[i])}) for i in range(4)])
    assert np.array_equal(loop["net.w"].numpy(), a["net.w"].numpy())


def test_summary_is_in_partition_order(flower_identity):
    s = strategy(2)
    s.aggregate_train(1, [reply(1, 10, [1.0], [1.0], [4, 0, 0]), reply(0, 10, [1.0], [1.0])])
    assert [c.partition_id for c in s.last_round] == [0, 1]
    assert s.last_round[1].skip_counts.tolist() == [4, 0, 0] and s.last_round[1].image_ids.tolist() == [10, 11, 12]


def test_a_failed_client_fails_the_round(flower_identity):
    request = Message(RecordDict(), dst_node_id=7, message_type="train")
    failed = Message(Error(code=0, reason="CUDA out of memory"), reply_to=request)
    with pytest.raises(ClientRoundError, match="CUDA out of memory"):
        strategy(2).aggregate_train(1, [reply(0, 10, [1.0], [1.0]), failed])


def test_a_missing_client_fails_the_round(flower_identity):
    with pytest.raises(ClientRoundError, match=r"expected replies from partitions 0..2, got \[0, 2\]"):
        strategy(3).aggregate_train(1, [reply(0, 10, [1.0], [1.0]), reply(2, 10, [1.0], [1.0])])
