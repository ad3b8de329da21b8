"""Weights on the wire (fl_ietagc/federation/wire.py): a few flat arrays per message, their layout, bf16 transport, and that
averaging flat arrays is bit for bit averaging the tensors."""

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl_ietagc.federation.wire import (
    Layout,
    array_view,
    decode,
    encode,
    flatten,
    nonfinite_at,
    npy_fields,
    unflatten,
    wire_bytes,
)
from fl_ietagc.runs.checkpoints import pack_weights
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.run_model import initial_weights
from strategies.base import as_record, numpy_arrays
from strategies.iet import IETFedAvg
from tests.local_grid import set_task_identity


@pytest.fixture(scope="module")
def packed():
    net, ema = initial_weights(parse_config({"max-images": 64}))  # the tiny UNet: 180 tensors each
    return pack_weights(net, ema)


def perturbed(packed, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in packed.items()}


def test_flat_round_trip_is_exact_and_the_layout_travels_as_a_record(packed):
    layout = Layout.of(packed)
    flat = flatten(packed, layout)
    assert set(flat) == {"net", "ema"} and all(a.ndim == 1 and a.dtype == np.float32 for a in flat.values())
    assert sum(a.size for a in flat.values()) == sum(v.numel() for v in packed.values())
    back = unflatten(flat, Layout.from_record(ConfigRecord(layout.to_record())))
    assert list(back) == list(packed)
    assert all(torch.equal(back[k], packed[k]) and back[k].shape == packed[k].shape for k in packed)
    assert Layout.from_record(layout.to_record()) == layout and Layout.of(packed, "bf16").digest() == layout.digest()


def test_kept_buffers_and_borrowed_views_give_the_same_weights_without_new_memory(packed):
    """A client's reply built in its kept buffers equals the fresh one and reuses the buffers' memory next
    round; the server's message read through array_view is wrapped, not copied, and without a torch warning."""
    layout = Layout.of(packed)
    kept: dict = {}
    first = flatten(packed, layout, kept)
    assert all(np.array_equal(first[g], a) for g, a in flatten(packed, layout).items())
    pointers = {g: t.data_ptr() for g, t in kept.items()}
    again = flatten(perturbed(packed, 1), layout, kept)  # the next round: same buffers, new values
    assert {g: t.data_ptr() for g, t in kept.items()} == pointers
    assert all(np.array_equal(again[g], a) for g, a in flatten(perturbed(packed, 1), layout).items())
    message = as_record(flatten(packed, layout))
    views = {k: array_view(a) for k, a in message.items()}
    assert all(
        not v.flags.writeable and np.shares_memory(v, np.frombuffer(message[k].data, np.uint8))
        for k, v in views.items()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = unflatten(decode(views, layout), layout, borrowed=True)
    assert all(torch.equal(back[k], packed[k]) for k in packed)
    assert layout.names[0].startswith("net.") and back[layout.names[0]].data_ptr() == views["net"].ctypes.data
    copied = unflatten(views, layout)  # not borrowed: writable copies
    assert copied[layout.names[0]].data_ptr() != views["net"].ctypes.data


def test_a_message_is_a_few_objects_not_one_per_tensor(packed):
    set_task_identity()
    layout = Layout.of(packed)
    old = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in packed.items()})})
    new = RecordDict({"arrays": as_record(flatten(packed, layout)), "layout": ConfigRecord(layout.to_record())})
    n_old = len(get_all_nested_objects(Message(old, dst_node_id=1, message_type="train")))
    n_new = len(get_all_nested_objects(Message(new, dst_node_id=1, message_type="train")))
    print(f"objects per message: {n_old} per tensor -> {n_new} flat")
    assert n_old > 250 and n_new <= 8


def test_averaging_flat_arrays_is_bit_identical_to_averaging_tensors(packed):
    layout = Layout.of(packed)
    clients = [perturbed(packed, s) for s in range(3)]
    sizes = [10, 30, 17]

    def reply(arrays, n):
        return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})

    per_tensor = aggregate_arrayrecords(
        [reply(ArrayRecord({k: Array(v.numpy()) for k, v in c.items()}), n) for c, n in zip(clients, sizes)],
        "num-examples",
    )
    flat = aggregate_arrayrecords(
        [reply(as_record(flatten(c, layout)), n) for c, n in zip(clients, sizes)], "num-examples"
    )
    got = unflatten(numpy_arrays(flat), layout)
    assert all(np.array_equal(got[k].numpy(), per_tensor[k].numpy()) for k in packed)


def test_bf16_transport_halves_the_bytes_and_stays_within_its_rounding(packed):
    fp32, bf16 = Layout.of(packed), Layout.of(packed, "bf16")
    assert wire_bytes(bf16) * 2 == wire_bytes(fp32) == 4 * sum(v.numel() for v in packed.values())
    wire = encode(flatten(packed, bf16), bf16)
    assert all(a.dtype == np.int16 for a in wire.values())
    back = unflatten(decode(wire, bf16), bf16)
    for k, v in packed.items():  # round to nearest bfloat16 (8 significant bits): relative error <= 2^-8
        assert torch.equal(back[k], v.to(torch.bfloat16).float())
        assert torch.all((back[k] - v).abs() <= v.abs() * 2.0**-8)


def test_a_float64_aggregate_travels_in_the_layout_dtype_and_is_committed_as_it_is(packed):
    layout = Layout.of(packed)
    wide = {g: a.astype(np.float64) / 3 for g, a in flatten(packed, layout).items()}  # (FedAdam, DP noise: float64)
    sent = encode(wide, layout)
    assert all(a.dtype == np.float32 and np.array_equal(a, wide[g].astype(np.float32)) for g, a in sent.items())
    got = unflatten(wide, layout)  # what the server commits (and resumes from): the strategy's values, unrounded
    w = got["net.conv_in.weight"]
    assert w.dtype == torch.float64 and torch.equal(w.reshape(-1), torch.from_numpy(wide["net"][: w.numel()]))


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda f: {"net": f["net"]}, "weights hold arrays ['net'], the layout expects ['ema', 'net']"),
        (lambda f: {**f, "net": f["net"][:-1]}, "weights: array 'net' has shape"),
        (
            lambda f: {**f, "net": f["net"].astype(np.int32)},
            "weights: array 'net' is int32, the layout expects float32",
        ),
    ],
)
def test_weights_that_do_not_fit_the_layout_are_refused_naming_the_array(packed, change, error):
    layout = Layout.of(packed)
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        unflatten(change(flatten(packed, layout)), layout)


def _strategy(layout, k=2):
    s = IETFedAvg(k)
    s.setup_app(k, layout=layout)
    return s


def _reply(arrays, partition, n, digest):
    set_task_identity()
    request = Message(RecordDict(), dst_node_id=1000 + partition, message_type="train")
    info = {"partition-id": partition, "image-ids": [0], "skip-counts": [0], "layout-digest": digest}
    metrics = {"num-examples": n, "loss": 0.1, "kept": 1, "skipped": 0, "steps": 1, "seconds": 0.1, "client-step": 1}
    return Message(
        RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord(metrics), "info": ConfigRecord(info)}),
        reply_to=request,
    )


def test_the_strategy_averages_bf16_replies_as_fp32_and_names_a_non_finite_tensor(packed):
    layout = Layout.of(packed, "bf16")
    clients = [perturbed(packed, s) for s in range(2)]
    replies = [
        _reply(encode(flatten(c, layout), layout), p, n, layout.digest())
        for p, (c, n) in enumerate(zip(clients, [10, 30]))
    ]
    arrays, _ = _strategy(layout).aggregate_train(1, replies)
    got = unflatten(numpy_arrays(arrays), layout)
    rounded = [{k: v.to(torch.bfloat16).float() for k, v in c.items()} for c in clients]
    expected = {k: (rounded[0][k].numpy() * 0.25 + rounded[1][k].numpy() * 0.75) for k in packed}
    assert all(np.array_equal(got[k].numpy(), expected[k]) for k in packed)  # the mean of the rounded weights
    # each received weight is within 2^-8 of its own value, so the mean is within 2^-8 of sum(w_i |x_i|) (+ the
    # float32 sum's own rounding)
    for k in packed:
        exact = clients[0][k].double() * 0.25 + clients[1][k].double() * 0.75
        bound = (clients[0][k].double().abs() * 0.25 + clients[1][k].double().abs() * 0.75) * (2.0**-8 + 2.0**-22)
        assert torch.all((got[k].double() - exact).abs() <= bound)

    broken = dict(clients[1])
    broken["ema.conv_out.bias"] = broken["ema.conv_out.bias"].clone()
    broken["ema.conv_out.bias"][0] = float("nan")
    s = _strategy(layout)
    first = _reply(encode(flatten(clients[0], layout), layout), 0, 10, layout.digest())
    good, failures = s.sort_replies(1, [first, _reply(encode(flatten(broken, layout), layout), 1, 30, layout.digest())])
    assert len(good) == 1 and failures[0].line() == (
        "partition 1, round 1: returned non-finite weights (1 arrays, e.g. ema.conv_out.bias[0])"
    )


def test_a_reply_of_another_layout_is_a_failure_naming_the_partition(packed):
    layout = Layout.of(packed)
    s = _strategy(layout)
    good, failures = s.sort_replies(
        3,
        [
            _reply(flatten(packed, layout), 0, 10, layout.digest()),
            _reply(flatten(packed, layout), 1, 10, "0123456789abcdef"),
        ],
    )
    assert len(good) == 1 and failures[0].line().startswith(
        "partition 1, round 3: returned weights of another layout (digest 0123456789abcdef, sent "
    )


def test_the_mixin_sends_the_layout_and_bf16_arrays_with_every_instruction(packed):
    layout = Layout.of(packed, "bf16")
    s = _strategy(layout)
    content = RecordDict({"arrays": as_record(flatten(packed, layout)), "config": ConfigRecord({})})
    msgs = s.with_layout([Message(content, dst_node_id=n, message_type="train") for n in (1, 2)])  # (as Flower's)
    assert all(Layout.from_record(m.content["layout"]) == layout for m in msgs)
    assert all(a.dtype == "int16" for m in msgs for a in m.content["arrays"].values())
    assert msgs[0].content["arrays"] is msgs[1].content["arrays"]  # encoded once for all clients


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not C-contiguous: np.save's own path
        np.arange(5, dtype=np.int16)[::2],
        np.zeros((0, 3), dtype=np.float32),
        np.array(2.5, dtype=np.float32),
        np.array([True, False]),
        np.zeros((1,) * 30 + (2,), dtype=np.uint8),  # 31 dims: a long header, still format 1.0
    ],
    ids=["c", "transposed", "strided", "empty", "0-d", "bool", "31-dims"],
)
def test_an_array_built_in_one_copy_is_flowers_array_byte_for_byte(array):
    fast, flower = Array(**npy_fields(array)), Array(array)
    assert (fast.dtype, fast.shape, fast.stype, fast.data) == (flower.dtype, flower.shape, flower.stype, flower.data)
    assert np.array_equal(fast.numpy(), array) and fast.numpy().dtype == array.dtype


def test_the_first_non_finite_element_is_found_and_finite_values_whose_sum_overflows_are_not_one():
    a = np.zeros(1000, dtype=np.float32)
    assert nonfinite_at(a) is None
    for value, at in ((np.nan, 17), (np.inf, 999), (-np.inf, 0)):
        b = a.copy()
        b[at] = value
        b[at + 1 :] = np.nan  # the first one is named
        assert nonfinite_at(b) == at
    inf_pair = a.copy()
    inf_pair[[3, 5]] = np.inf, -np.inf  # (their sum is NaN: still found)
    assert nonfinite_at(inf_pair) == 3
    big = np.full(8, 3e38, dtype=np.float32)  # every value finite, the float32 sum overflows
    with np.errstate(over="ignore"):
        assert not np.isfinite(big.sum())
    assert nonfinite_at(big) is None
    assert nonfinite_at(np.arange(6, dtype=np.float64).reshape(2, 3).T) is None
    assert nonfinite_at(np.arange(4, dtype=np.int16)) is None and nonfinite_at(np.zeros(0, np.float32)) is None


def test_the_in_place_weighted_mean_is_flowers_bit_for_bit():
    """strategies.base.weighted_mean_record (IET's and fedavg's aggregation) against Flower's aggregate_arrayrecords:
    equal bytes, for flat float32 groups (one longer than the mean's slice), a float64 and an int64 array, a 0-d
    array and unequal weights; again with accumulators kept from an earlier call, as the strategy keeps them."""
    from strategies.base import _CHUNK, weighted_mean_record

    rng = np.random.default_rng(0)

    def reply(seed, n):
        g = np.random.default_rng(seed)
        arrays = {
            "net": g.standard_normal(1000).astype(np.float32),
            "ema": g.standard_normal(2 * _CHUNK + 3).astype(np.float32),
            "net:float64": g.standard_normal((3, 4)),
            "steps": g.integers(0, 100, 5),
            "scalar": np.array(g.standard_normal(), dtype=np.float32),
        }
        return RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord({"num-examples": n})})

    replies = [reply(s, int(n)) for s, n in enumerate(rng.integers(1, 50, 4))]
    ours, flowers = weighted_mean_record(replies, "num-examples"), aggregate_arrayrecords(replies, "num-examples")
    assert list(ours.keys()) == list(flowers.keys())
    for k in flowers:
        assert (ours[k].dtype, ours[k].shape, ours[k].data) == (flowers[k].dtype, flowers[k].shape, flowers[k].data), k
    assert ours["steps"].dtype == "float64" and ours["scalar"].shape == ()
    kept: dict = {}
    weighted_mean_record(replies[::-1], "num-examples", kept)  # (other values first: the buffers are overwritten)
    again = weighted_mean_record(replies, "num-examples", kept)
    assert all(again[k].data == flowers[k].data for k in flowers) and set(kept) == set(flowers)
    # a reply without some key (the first's "scalar", the third's "ema"): each reply still weighs by its own factor
    del replies[0]["arrays"]["scalar"], replies[2]["arrays"]["ema"]
    ours, flowers = weighted_mean_record(replies, "num-examples"), aggregate_arrayrecords(replies, "num-examples")
    assert all(ours[k].data == flowers[k].data for k in flowers) and list(ours.keys()) == list(flowers.keys())
