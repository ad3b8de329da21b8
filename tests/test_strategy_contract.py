"""The contract between the ServerApp and its strategy: the round's instruction goes in through configure_train's
`config`, the sorted replies come back as a value (`aggregate_round`), new RET shards go in by a call
(`use_shards`), and the round metrics are computed once."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fl_ietagc.federation import protocol as P
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.ret import ShardAssignment
from strategies import base
from strategies.registry import build_strategy
from tests.test_aggregation import reply
from tests.test_strategies import FakeGrid, arrays

INSTRUCTION = {P.RUN_DIR: "/tmp/x", P.RUN_TOKEN: "t", P.NUM_CLIENTS: 2, P.STATE_ROUNDS: [3, 2]}


def built(name, k=2, policy="fail", fraction=1.0, **keys):
    s = build_strategy(parse_config({"strategy": name, **keys}), k)
    s.setup_app(k, policy, fraction)
    return s


@pytest.mark.parametrize(
    "name, keys, own",
    [
        ("iet", {}, {}),
        ("fedavg", {}, {P.RESET_OPTIMIZER: True}),
        ("fedprox", {"fedprox-mu": 0.3}, {P.PROXIMAL_MU: 0.3}),
        ("fedavg", {"dp-clip-norm": 0.1}, {P.RESET_OPTIMIZER: True}),  # Flower's DP wrapper around the mixin
        ("iet", {"dp-client-clip-norm": 0.1}, {"clipping_norm": 0.1}),
    ],
)
def test_the_round_instruction_reaches_every_message_through_config(flower_identity, name, keys, own):
    s = built(name, **keys)
    instruction = ConfigRecord(INSTRUCTION)
    messages = list(s.configure_train(4, arrays([1.0], [1.0]), instruction, FakeGrid()))
    assert len(messages) == len(FakeGrid().get_node_ids())
    for m in messages:
        assert dict(m.content["config"]) == {**INSTRUCTION, **own, P.ROUND: 4}
    assert dict(instruction) == INSTRUCTION  # the ServerApp's record is not changed
    assert not hasattr(s, "round_config")  # nothing of the instruction is kept on the strategy


def test_new_shards_are_handed_over_by_a_call(flower_identity):
    s = built("iet")
    s.use_shards(ShardAssignment([np.array([0, 1]), np.array([2, 3])]))
    config = lambda m: m.content["config"]  # noqa: E731
    first = list(s.configure_train(1, arrays([1.0], [1.0]), ConfigRecord(INSTRUCTION), FakeGrid()))
    assert not any(k.startswith("shard-") for m in first for k in config(m))  # shards from the config until RET
    s.use_shards(ShardAssignment([np.array([0, 3]), np.array([2, 1])], redistributed=True))
    second = list(s.configure_train(2, arrays([1.0], [1.0]), ConfigRecord(INSTRUCTION), FakeGrid()))
    # (no node's partition known yet: each gets every shard and picks its own)
    assert all(config(m)["shard-0"] == [0, 3] and config(m)["shard-1"] == [2, 1] for m in second)


def test_the_sorted_replies_come_back_as_a_value_with_the_metrics_computed_once(flower_identity, monkeypatch):
    calls = []
    real = base.round_metrics
    monkeypatch.setattr(base, "round_metrics", lambda clients: calls.append(len(clients)) or real(clients))
    s = built("iet", 3, "tolerate", 0.5)
    got = [reply(2, 30, [5.0], [6.0]), reply(0, 10, [1.0], [2.0])]
    new, outcome = s.aggregate_round(1, got)
    assert isinstance(outcome, base.RoundReplies) and calls == [2]
    assert [base.partition_of(m) for m in outcome.good] == [0, 2]
    assert [c.partition_id for c in outcome.clients] == [0, 2]
    assert [(f.partition_id, f.error) for f in outcome.failures] == [
        (1, "no reply (timed out, or partition ids are misconfigured)")
    ]
    assert outcome.metrics == real(outcome.clients)
    np.testing.assert_allclose(new["net.w"].numpy(), [(10 * 1.0 + 30 * 5.0) / 40])
    # Flower's aggregate_train: the same, its metrics those of the value
    calls.clear()
    _, metrics = built("iet", 3, "tolerate", 0.5).aggregate_train(1, got)
    assert calls == [2] and dict(metrics) == outcome.metrics


def test_the_server_app_sends_its_instruction_and_writes_the_values_it_gets_back(tmp_path, monkeypatch):
    """The real ServerApp on the in-process grid, its strategy watched: each round's instruction is the config it
    passes, and metrics.json holds the RoundReplies aggregate_round returned."""
    from strategies import server_app
    from tests.local_grid import run_server

    configs, outcomes = [], []
    real_build = server_app.build_strategy

    def watched(cfg, k):
        s = real_build(cfg, k)
        configure, aggregate = s.configure_train, s.aggregate_round

        def configure_train(server_round, arrays, config, grid):
            configs.append((server_round, dict(config)))
            return configure(server_round, arrays, config, grid)

        def aggregate_round(server_round, replies):
            new, outcome = aggregate(server_round, replies)
            outcomes.append(outcome)
            return new, outcome

        s.configure_train, s.aggregate_round = configure_train, aggregate_round
        return s

    monkeypatch.setattr(server_app, "build_strategy", watched)
    cfg = {
        "max-images": 64,
        "batch-size": 32,
        "local-epochs": 1,
        "num-server-rounds": 2,
        "diffusion-steps": 20,
        "sample-count": 0,
        "output-dir": str(tmp_path),
        "run-name": "r",
    }
    run_server(cfg, 2)
    run = server_app.RunDir(tmp_path / "r")
    token = configs[0][1][P.RUN_TOKEN]
    # round r's instruction goes out while round r - 1's commit is written: the clients keep round r - 2's states
    assert configs == [
        (
            r,
            {
                P.RUN_DIR: str(run.path),
                P.RUN_TOKEN: token,
                P.NUM_CLIENTS: 2,
                P.STATE_ROUNDS: [r - 1, r - 1],
                P.KEEP_STATES_FROM: [max(r - 2, 0)] * 2,
            },
        )
        for r in (1, 2)
    ]
    metrics = json.loads(run.metrics_path.read_text())
    for record, outcome in zip(metrics, outcomes, strict=True):
        assert {k: record[k] for k in outcome.metrics} == outcome.metrics
        assert record["clients"] == [c.to_json() for c in outcome.clients] and record["failed"] == []
