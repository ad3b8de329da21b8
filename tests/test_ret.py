"""RET: redistribution of the most-skipped images, threshold-aware augmentation."""

import numpy as np
import pytest
import torch

from fl_ietagc.training.ret import redistribute, taa_strength, translate
from fl_ietagc.training.trainer import TrainState
from tests.backends import ONE_ACTOR_JSON


def shards_and_counts():
    shards = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    counts = np.zeros(30, np.int64)
    counts[[3, 7, 12, 15, 25, 21]] = [9, 5, 8, 6, 7, 4]  # two heavily skipped images per shard
    return shards, counts


def test_redistribution_moves_the_most_skipped_and_keeps_a_partition():
    shards, counts = shards_and_counts()
    new = redistribute(shards, counts, fraction=0.2, event=1, seed=0)  # m = 2 per shard, shift 1
    assert [len(s) for s in new] == [10, 10, 10]
    everything = np.concatenate(new)
    assert sorted(everything.tolist()) == list(range(30))
    assert set(new[1]) - set(shards[1]) == {3, 7}  # shard 0's two most skipped went to shard 1
    assert set(new[2]) - set(shards[2]) == {12, 15}
    assert set(new[0]) - set(shards[0]) == {21, 25}
    assert not {3, 7} & set(new[0])
    assert [s.tolist() for s in new] == SHIFT_1


# the exact shards of shards_and_counts() after one event: movers {3, 7}, {12, 15}, {21, 25}
SHIFT_1 = [
    [0, 1, 2, 4, 5, 6, 8, 9, 21, 25],
    [3, 7, 10, 11, 13, 14, 16, 17, 18, 19],
    [12, 15, 20, 22, 23, 24, 26, 27, 28, 29],
]
SHIFT_2 = [
    [0, 1, 2, 4, 5, 6, 8, 9, 12, 15],
    [10, 11, 13, 14, 16, 17, 18, 19, 21, 25],
    [3, 7, 20, 22, 23, 24, 26, 27, 28, 29],
]


def test_redistribution_is_deterministic_and_varies_destination_by_event():
    shards, counts = shards_and_counts()
    a = redistribute(shards, counts, 0.2, event=2, seed=5)
    b = redistribute(shards, counts, 0.2, event=2, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert {3, 7} <= set(a[2])  # event 2: shift 2, shard 0 -> shard 2
    assert [s.tolist() for s in a] == SHIFT_2


def test_ties_are_broken_by_the_seed_only():
    shards = [np.arange(0, 10), np.arange(10, 20)]
    zero = np.zeros(20, np.int64)
    moved = [tuple(sorted(set(redistribute(shards, zero, 0.3, 1, seed)[1]) - set(shards[1]))) for seed in (1, 1, 2)]
    assert moved[0] == moved[1] and len(moved[0]) == 3
    # the seed picks which tied images move (not their position in the shard: that would give (0, 1, 2))
    assert moved[0] == (1, 4, 5) and moved[2] == (0, 3, 7)
    assert [s.tolist() for s in redistribute(shards, zero, 0.3, 1, 2)] == [
        [1, 2, 4, 5, 6, 8, 9, 13, 14, 18],
        [0, 3, 7, 10, 11, 12, 15, 16, 17, 19],
    ]
    # a higher skip count always beats the tie-break
    counts = zero.copy()
    counts[[9, 8, 19]] = 1
    new = redistribute(shards, counts, 0.3, 1, 1)
    assert {9, 8} <= set(new[1]) and 19 in new[0]


def test_redistribution_of_one_shard_changes_nothing():
    shards = [np.arange(0, 6)]
    counts = np.array([0, 9, 0, 7, 0, 0])
    new = redistribute(shards, counts, 0.5, event=1, seed=0)
    assert [s.tolist() for s in new] == [[0, 1, 2, 3, 4, 5]] and new[0] is not shards[0]


def test_redistribution_with_nothing_to_move_changes_nothing():
    shards, counts = shards_and_counts()
    new = redistribute(shards, counts, fraction=0.05, event=1, seed=0)  # m = floor(0.05 * 10) = 0
    assert [s.tolist() for s in new] == [s.tolist() for s in shards]
    assert all(a is not b for a, b in zip(new, shards))


def test_redistribution_of_unequal_shards_moves_m_of_the_smallest_and_keeps_sizes():
    shards = [np.arange(0, 4), np.arange(4, 10), np.arange(10, 18)]
    counts = np.zeros(18, np.int64)
    counts[[1, 3, 9, 4, 17, 10]] = [5, 4, 7, 6, 3, 2]  # the two most skipped of each shard
    new = redistribute(shards, counts, fraction=0.5, event=1, seed=0)  # m = floor(0.5 * 4) = 2 from every shard
    assert [s.tolist() for s in new] == [[0, 2, 10, 17], [1, 3, 5, 6, 7, 8], [4, 9, 11, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("event, expected", [(3, SHIFT_1), (4, SHIFT_2), (5, SHIFT_1)])
def test_redistribution_shift_wraps_round_after_k_minus_1_events(event, expected):
    shards, counts = shards_and_counts()  # K = 3: shift = 1 + (event - 1) mod 2 = 1, 2, 1, 2, ...
    assert [s.tolist() for s in redistribute(shards, counts, 0.2, event=event, seed=0)] == expected


def test_taa_strength_on_a_fixed_batch():
    losses = torch.tensor([0.9, 1.0, 1.25, 1.5, 0.3, 2.0])
    threshold = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    # below thr: skipped, 0 | at thr: 1 | halfway in [thr, 1.5 thr): 0.5 | at 1.5 thr: 0 | empty bank: 0
    # | 2.0 with thr 4: skipped, 0
    torch.testing.assert_close(taa_strength(losses, threshold, gamma=1.5), torch.tensor([0, 1, 0.5, 0, 0, 0.0]))
    torch.testing.assert_close(taa_strength(torch.tensor([1.1]), torch.tensor([1.0]), gamma=2.0), torch.tensor([0.9]))


def test_translation_is_an_integer_shift_bounded_by_strength():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(translate(x, torch.zeros(2), 3, gen), x)
    out = translate(x, torch.tensor([1.0, 0.0]), 2, gen)
    assert torch.equal(out[1], x[1])  # strength 0: untouched
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="reflect")[0, 0]
    matches = [
        (dy, dx)
        for dy in range(-2, 3)
        for dx in range(-2, 3)
        if torch.equal(out[0, 0], padded[2 - dy : 10 - dy, 2 - dx : 10 - dx])
    ]
    assert len(matches) == 1


def test_state_remap_keeps_records_of_images_that_stay():
    state = TrainState.fresh([4, 5, 6])
    state.skip_counts = torch.tensor([1, 2, 3])
    state.aug_strength = torch.tensor([0.1, 0.2, 0.3])
    state.remap([5, 9, 4])
    assert state.skip_counts.tolist() == [2, 0, 1]
    torch.testing.assert_close(state.aug_strength, torch.tensor([0.2, 0.0, 0.1]))


@pytest.mark.slow
def test_ret_run_redistributes_between_rounds(tmp_path):
    from experiments.launch import simulate
    from fl_ietagc.data.shards import shards_for_config
    from fl_ietagc.runs.checkpoints import load_torch
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.settings.config import parse_config

    overrides = (
        "max-images=256 batch-size=32 local-epochs=2 num-server-rounds=2 diffusion-steps=20 "
        "agc-lambda=1.2 ret-every=1 ret-fraction=0.25 taa=true sample-count=0 "
        f'output-dir="{tmp_path}" run-name="ret"'
    )
    assert (
        simulate.main(
            [
                "--app",
                ".",
                "--num-supernodes",
                "2",
                "--backend-config",
                ONE_ACTOR_JSON,
                "--run-config",
                overrides,
            ]
        )
        == 0
    )
    run = RunDir(tmp_path / "ret")
    metrics = run.read_metrics()
    assert metrics[0]["ret-moved"] == 2 * 32 and metrics[1]["ret-moved"] == 0  # none after the last round
    before = shards_for_config(parse_config({"max-images": 256, "batch-size": 32}), 2)
    after = run.read_shards()
    assert [len(s) for s in after] == [128, 128] and sorted(np.concatenate(after).tolist()) == list(range(256))
    assert len(set(after[0]) - set(before[0])) == 32
    for pid in (0, 1):
        state = load_torch(run.client_state(pid, 2), "client state")
        assert state["image_ids"].tolist() == after[pid].tolist()  # clients trained on their new shards
        assert (state["aug_strength"] > 0).any()  # TAA found samples just above the threshold


def test_the_flower_free_loop_runs_ret_exactly_as_the_app(tmp_path):
    """RET's redistribution and TAA in `run_iet_loop` (used by the small-data study) are the app's: same shards after
    each event, same per-image records, bit-identical weights after 3 rounds with 2 redistributions."""
    from fl_ietagc.loops.iet import run_iet_loop
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.settings.config import parse_config
    from tests.local_grid import run_server

    conf = {
        "max-images": 128,
        "batch-size": 32,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "diffusion-steps": 20,
        "agc-lambda": 1.2,
        "warmup-steps": 6,
        "sample-count": 0,
        "ret-every": 1,
        "ret-fraction": 0.25,
        "taa": True,
        "output-dir": str(tmp_path),
    }
    torch.set_num_threads(1)
    try:
        grid = run_server({**conf, "run-name": "app"}, 2)
        loop = run_iet_loop(
            parse_config({**conf, "run-name": "loop"}), 2, torch.device("cpu"), RunDir.create(str(tmp_path), "loop", "")
        )
    finally:
        torch.set_num_threads(2)
    app, mine = RunDir(tmp_path / "app"), RunDir(tmp_path / "loop")
    # each client is told its own shard only, once RET has moved images (after rounds 1 and 2)
    assert sorted(grid.shard_keys) == [
        (1, 0, []),
        (1, 1, []),
        (2, 0, ["shard-0"]),
        (2, 1, ["shard-1"]),
        (3, 0, ["shard-0"]),
        (3, 1, ["shard-1"]),
    ]
    assert [m["ret-moved"] for m in mine.read_metrics()] == [m["ret-moved"] for m in app.read_metrics()] == [32, 32, 0]
    assert [s.tolist() for s in mine.read_shards()] == [s.tolist() for s in app.read_shards()]
    for pid in (0, 1):
        from fl_ietagc.runs.checkpoints import load_torch

        state = load_torch(app.client_state(pid, 3), "client state")
        assert state["image_ids"].tolist() == loop.states[pid].image_ids.tolist()
        assert torch.equal(state["aug_strength"], loop.states[pid].aug_strength)
    from fl_ietagc.runs.checkpoints import load_checkpoint

    final = load_checkpoint(app.final_checkpoint)
    for k in loop.net:
        assert torch.equal(final["net"][k], loop.net[k]), k
        assert torch.equal(final["ema"][k], loop.ema[k]), k


def test_shard_assignment_tells_each_client_its_own_shard_once_redistributed():
    from fl_ietagc.training.ret import ShardAssignment

    a = ShardAssignment([np.array([0, 1]), np.array([2, 3])])
    assert a.instruction(0) == {} and a.instruction(None) == {}  # from the config until RET moves images
    a.assign([np.array([0, 3]), np.array([2, 1])])
    assert a.instruction(1) == {"shard-1": [2, 1]}
    assert a.instruction(None) == {"shard-0": [0, 3], "shard-1": [2, 1]}  # a node not known yet picks its own
