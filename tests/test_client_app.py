"""The ClientApp's train function, called directly with real Flower Message / Context objects (no Ray):
partition errors, the client state it starts from (fresh, missing, another run's, another shard's, RET
remap), reset-optimizer, and the reply it sends."""

import copy
import os
import socket

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import train
from fl_ietagc.data.shards import shards_for_config
from fl_ietagc.federation.wire import Layout, flatten
from fl_ietagc.runs.checkpoints import pack_weights
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.run_model import initial_weights
from fl_ietagc.training.trainer import TrainState
from tests.local_grid import set_task_identity

RUN_CONFIG = {
    "max-images": 128,
    "batch-size": 32,
    "local-epochs": 1,
    "diffusion-steps": 20,
    "warmup-steps": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def weights():
    net, ema = initial_weights(parse_config(RUN_CONFIG))
    return pack_weights(net, ema)


def message(weights, tmp_path, server_round=1, state_rounds=(0, 0), **extra):
    set_task_identity()
    conf = {
        "server-round": server_round,
        "run-dir": str(tmp_path),
        "run-token": "tok",
        "num-clients": 2,
        "state-rounds": list(state_rounds),
        **extra,
    }
    layout = Layout.of(weights)
    flat = flatten(copy.deepcopy(weights), layout)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(a) for k, a in flat.items()}),
            "layout": ConfigRecord(layout.to_record()),
            "config": ConfigRecord(conf),
        }
    )
    return Message(content, dst_node_id=1000, message_type="train")


def context(node_config=None, **run_config):
    return Context(
        run_id=1,
        node_id=1000,
        node_config={"partition-id": 0, "num-partitions": 2} if node_config is None else node_config,
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


def error_of(reply) -> dict:
    assert "error" in reply.content.config_records, "the client did not fail"
    return dict(reply.content.config_records["error"])


def test_a_round_trains_saves_its_state_version_and_replies(weights, tmp_path):
    reply = train(message(weights, tmp_path), context())
    info, metrics = reply.content.config_records["info"], reply.content.metric_records["metrics"]
    shard = shards_for_config(parse_config(RUN_CONFIG), 2)[0]
    assert info["partition-id"] == 0 and list(info["image-ids"]) == shard.tolist()
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["ray-node"] == ""
    assert metrics["steps"] == 2 and metrics["client-step"] == 2 and metrics["num-examples"] == 64
    # the weights travel as two flat arrays (raw, EMA), in the layout the server sent
    assert (
        set(reply.content["arrays"].keys()) == {"net", "ema"} and info["layout-digest"] == Layout.of(weights).digest()
    )
    assert sum(a.numpy().size for a in reply.content["arrays"].values()) == sum(v.numel() for v in weights.values())
    state = TrainState.load(RunDir(tmp_path).client_state(0, 1), "tok", shard)
    assert state.step == 2 and state.rounds == 1 and state.optimizer is not None


@pytest.mark.parametrize(
    "node_config,error",
    [
        ({}, "ValueError: this SuperNode has no partition-id / num-partitions in its node config"),
        (
            {"partition-id": 0, "num-partitions": 3},
            "ValueError: node config num-partitions = 3, but the run has num-clients = 2",
        ),
        ({"partition-id": 2, "num-partitions": 2}, "ValueError: node config partition-id = 2 is outside 0..1"),
    ],
)
def test_partition_errors_are_reported_not_raised(weights, tmp_path, node_config, error):
    failure = error_of(train(message(weights, tmp_path), context(node_config)))
    assert failure["error"].startswith(error) and failure["round"] == 1 and failure["step"] == -1
    assert "Traceback (most recent call last)" in failure["traceback"]


def test_a_missing_state_fails_loudly(weights, tmp_path):
    failure = error_of(train(message(weights, tmp_path, server_round=2, state_rounds=(1, 1)), context()))
    assert failure["partition-id"] == 0
    assert failure["error"].startswith(
        f"RuntimeError: client state {tmp_path}/client-state/p0/round_0001.pt is missing"
    )


def test_state_of_another_run_or_shard_is_refused(weights, tmp_path):
    train(message(weights, tmp_path), context())
    other_run = message(weights, tmp_path, server_round=2, state_rounds=(1, 0))
    other_run.content["config"]["run-token"] = "another"
    assert error_of(train(other_run, context()))["error"] == (
        f"RuntimeError: client state {tmp_path}/client-state/p0/round_0001.pt belongs to another run "
        f"(token 'tok' != 'another')"
    )
    other_shard = message(weights, tmp_path, server_round=2, state_rounds=(1, 0))
    assert error_of(train(other_shard, context(**{"max-images": 160})))["error"] == (
        f"RuntimeError: client state {tmp_path}/client-state/p0/round_0001.pt was made for a different shard"
    )


def test_ret_remap_keeps_the_records_of_images_that_stay(weights, tmp_path):
    train(message(weights, tmp_path), context())
    path = RunDir(tmp_path).client_state(0, 1)
    state = TrainState.load(path, "tok", shards_for_config(parse_config(RUN_CONFIG), 2)[0])
    state.skip_counts[:] = torch.arange(64)
    state.save(path)
    old = state.image_ids.numpy()
    new = np.sort(np.concatenate([old[8:], np.arange(200, 208)]))  # 8 images left, 8 others came
    reply = train(
        message(weights, tmp_path, server_round=2, state_rounds=(1, 0), **{"shard-0": new.tolist()}),
        context(**{"max-images": 0}),
    )
    assert "error" not in reply.content.config_records
    after = TrainState.load(RunDir(tmp_path).client_state(0, 2), "tok", new)
    counts = dict(zip(after.image_ids.tolist(), after.skip_counts.tolist()))
    round2 = dict(zip(new.tolist(), reply.content.config_records["info"]["skip-counts"]))
    assert all(counts[i] - round2[i] == j for j, i in enumerate(old.tolist()) if i in counts)
    assert all(counts[i] == round2[i] for i in range(200, 208))  # newcomers start from zero
    assert not (RunDir(tmp_path).client_state_dir(0) / "round_0000.pt").exists()


def test_reset_optimizer_starts_adam_again_but_keeps_the_step_counter(weights, tmp_path):
    train(message(weights, tmp_path), context())
    reply = train(
        message(weights, tmp_path, server_round=2, state_rounds=(1, 0), **{"reset-optimizer": True}), context()
    )
    assert reply.content.metric_records["metrics"]["client-step"] == 4
    state = TrainState.load(
        RunDir(tmp_path).client_state(0, 2), "tok", shards_for_config(parse_config(RUN_CONFIG), 2)[0]
    )
    assert state.optimizer["state"][0]["step"].item() == 2  # Adam restarted in round 2: 2 steps, not 4
    kept = train(message(weights, tmp_path, server_round=3, state_rounds=(2, 0)), context())
    state = TrainState.load(
        RunDir(tmp_path).client_state(0, 3), "tok", shards_for_config(parse_config(RUN_CONFIG), 2)[0]
    )
    assert (
        state.optimizer["state"][0]["step"].item() == 4 and kept.content.metric_records["metrics"]["client-step"] == 6
    )
    # older versions are pruned: only the state the round started from and the new one remain
    assert sorted(p.name for p in RunDir(tmp_path).client_state_dir(0).iterdir()) == ["round_0002.pt", "round_0003.pt"]


def test_a_client_keeps_the_states_a_resume_from_the_last_durable_commit_needs(weights, tmp_path):
    """The server writes round r's commit while round r + 1 trains: until it is durable, a resumed run would start
    from round r - 1's states, so `keep-states-from` (the last durable commit's) protects them from pruning."""
    train(message(weights, tmp_path), context())
    train(message(weights, tmp_path, server_round=2, state_rounds=(1, 0), **{"keep-states-from": [0, 0]}), context())
    train(message(weights, tmp_path, server_round=3, state_rounds=(2, 0), **{"keep-states-from": [1, 0]}), context())
    names = lambda: sorted(p.name for p in RunDir(tmp_path).client_state_dir(0).iterdir())
    assert names() == ["round_0001.pt", "round_0002.pt", "round_0003.pt"]
    train(message(weights, tmp_path, server_round=4, state_rounds=(3, 0), **{"keep-states-from": [3, 0]}), context())
    assert names() == ["round_0003.pt", "round_0004.pt"]
