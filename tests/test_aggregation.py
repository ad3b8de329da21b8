"""The IET strategy: size-weighted averages of raw and EMA weights, partition order, failures."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fl_ietagc.federation.protocol import ClientFailure
from fl_ietagc.loops.iet import weighted_average
from strategies.base import ClientRoundError
from strategies.iet import IETFedAvg


def reply(pid, n, net, ema, skips=None):
    request = Message(RecordDict(), dst_node_id=100 + pid, message_type="train")
    arrays = ArrayRecord({"net.w": Array(np.asarray(net, np.float32)), "ema.w": Array(np.asarray(ema, np.float32))})
    metrics = MetricRecord(
        {
            "num-examples": n,
            "loss": 0.1 * (pid + 1),
            "kept": n - pid,
            "skipped": pid,
            "steps": 1,
            "seconds": 1.0,
            "client-step": 3,
        }
    )
    info = ConfigRecord(
        {"partition-id": pid, "image-ids": list(range(pid * 10, pid * 10 + 3)), "skip-counts": skips or [0, 1, 0]}
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "info": info}), reply_to=request)


def strategy(k, policy="fail", fraction=1.0):
    s = IETFedAvg(k)
    s.setup_app(k, policy, fraction)
    return s


def error_reply(pid, error, step=-1):
    request = Message(RecordDict(), dst_node_id=100 + pid, message_type="train")
    failure = ClientFailure(pid, 3, error, step, "Traceback (most recent call last):\n  ...\nValueError: x")
    return Message(RecordDict({"error": ConfigRecord(failure.to_record())}), reply_to=request)


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
    _, outcome = s.aggregate_round(1, [reply(1, 10, [1.0], [1.0], [4, 0, 0]), reply(0, 10, [1.0], [1.0])])
    assert [c.partition_id for c in outcome.clients] == [0, 1]
    assert outcome.clients[1].skip_counts.tolist() == [4, 0, 0] and outcome.clients[1].image_ids.tolist() == [
        10,
        11,
        12,
    ]


def test_a_failed_client_fails_the_round(flower_identity):
    request = Message(RecordDict(), dst_node_id=7, message_type="train")
    failed = Message(Error(code=0, reason="CUDA out of memory"), reply_to=request)
    with pytest.raises(ClientRoundError, match="CUDA out of memory"):
        strategy(2).aggregate_train(1, [reply(0, 10, [1.0], [1.0]), failed])


def test_a_lost_supernode_is_named_by_the_partition_it_trained_before(flower_identity):
    """The SuperLink answers for a SuperNode whose heartbeat expired (its own node id as the sender): the
    failure names the partition learnt from that node's earlier replies, through the message it answers."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    s = strategy(2, "tolerate", 0.5)
    s.aggregate_train(1, [reply(0, 10, [1.0], [1.0]), reply(1, 10, [1.0], [1.0])])
    sent = [Message(RecordDict(), dst_node_id=100 + pid, message_type="train") for pid in (0, 1)]
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # as the grid does when it pushes them
    s.sent = sent
    lost = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
    assert lost.metadata.src_node_id != 101
    _, outcome = s.aggregate_round(2, [reply(0, 10, [1.0], [1.0]), lost])
    assert [f.partition_id for f in outcome.failures] == [1]
    assert outcome.failures[0].error.startswith("Flower error on node 101: Error: Node Unavailable")


def test_a_missing_client_fails_the_round(flower_identity):
    with pytest.raises(ClientRoundError) as e:
        strategy(3).aggregate_train(1, [reply(0, 10, [1.0], [1.0]), reply(2, 10, [1.0], [1.0])])
    assert str(e.value) == "partition 1, round 1: no reply (timed out, or partition ids are misconfigured)"


def test_a_client_error_is_one_line_naming_partition_round_and_step(flower_identity):
    s = strategy(2)
    with pytest.raises(ClientRoundError) as e:
        s.aggregate_train(3, [reply(0, 10, [1.0], [1.0]), error_reply(1, "loss is NaN (lr 1e+30)", step=57)])
    assert str(e.value) == "partition 1, round 3, step 57: loss is NaN (lr 1e+30)"
    assert e.value.failures[0].traceback.endswith("ValueError: x")  # for the run's logs, not the message


def test_non_finite_weights_are_never_aggregated(flower_identity):
    with pytest.raises(ClientRoundError) as e:
        strategy(2).aggregate_train(2, [reply(0, 10, [1.0], [1.0]), reply(1, 10, [1.0], [float("nan")])])
    assert str(e.value) == "partition 1, round 2: returned non-finite weights (1 arrays, e.g. ema.w)"


def test_tolerate_aggregates_the_replies_it_got_renormalised(flower_identity):
    s = strategy(3, "tolerate", 0.5)
    arrays, outcome = s.aggregate_round(
        4, [reply(0, 10, [1.0], [2.0]), error_reply(1, "ValueError: boom"), reply(2, 30, [5.0], [6.0])]
    )
    np.testing.assert_allclose(arrays["net.w"].numpy(), [(10 * 1.0 + 30 * 5.0) / 40])
    np.testing.assert_allclose(arrays["ema.w"].numpy(), [(10 * 2.0 + 30 * 6.0) / 40])
    assert [c.partition_id for c in outcome.clients] == [0, 2]
    assert [(f.partition_id, f.error) for f in outcome.failures] == [(1, "ValueError: boom")]


def test_tolerate_still_fails_below_the_minimum_fraction(flower_identity):
    s = strategy(3, "tolerate", 0.6)  # needs ceil(1.8) = 2 of 3
    with pytest.raises(ClientRoundError) as e:
        s.aggregate_train(1, [reply(0, 10, [1.0], [1.0]), error_reply(1, "A: a"), error_reply(2, "B: b")])
    assert str(e.value) == (
        "partition 1, round 3: A: a (and 1 more client failure(s)); only 1 of 3 clients "
        "replied, min-clients-fraction needs 2"
    )
