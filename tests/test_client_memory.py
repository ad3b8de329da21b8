"""A client process keeps its UNet pair and its saved states in memory between rounds (fl_ietagc/training/client_memory.py):
the held state equals its file, rounds started from memory are bit-identical to rounds started from the file,
a failed round leaves nothing stale, a replaced file wins over the held copy, and the budget bounds it all.
Also: the compile-mode key (refused where it cannot work) and the background writes."""

import threading
import time

import numpy as np
import pytest
import torch

from clients.client_app import train
from fl_ietagc.data.shards import shards_for_config
from fl_ietagc.runs.checkpoints import BackgroundWrite, atomic_write_bytes, pack_weights
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import parse_config
from fl_ietagc.training.client_memory import MEMORY, ClientMemory, tensor_bytes
from fl_ietagc.training.run_model import initial_weights
from fl_ietagc.training.trainer import TrainState
from tests.test_client_app import RUN_CONFIG, context, error_of, message


@pytest.fixture(scope="module")
def weights():
    net, ema = initial_weights(parse_config(RUN_CONFIG))
    return pack_weights(net, ema)


@pytest.fixture(autouse=True)
def fresh_memory():
    MEMORY.clear()
    yield
    MEMORY.clear()


def key(tmp_path, partition=0):
    return ("tok", str(RunDir(tmp_path).client_state_dir(partition)), partition)


def assert_same_state(a: TrainState, b: TrainState) -> None:
    assert (a.step, a.rounds, a.token) == (b.step, b.rounds, b.token)
    for name in ("image_ids", "skip_counts", "aug_strength"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.bank["values"], b.bank["values"]) and a.bank["lam"] == b.bank["lam"]
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for i, sa in a.optimizer["state"].items():
        for k, v in sa.items():
            assert torch.equal(v.cpu(), b.optimizer["state"][i][k].cpu()), (i, k)


def arrays_of(reply) -> dict:
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def two_rounds(weights, tmp_path, memory_mb):
    ctx = lambda: context(**{"client-memory-mb": memory_mb})  # noqa: E731
    first = train(message(weights, tmp_path), ctx())
    second = train(message(weights, tmp_path, server_round=2, state_rounds=(1, 0)), ctx())
    return first, second


def test_held_state_equals_its_file_and_rounds_from_memory_are_bit_identical(weights, tmp_path):
    shard = shards_for_config(parse_config(RUN_CONFIG), 2)[0]
    train(message(weights, tmp_path / "mem"), context())
    round_, held = MEMORY.held(key(tmp_path / "mem"))
    assert round_ == 1
    assert_same_state(held, TrainState.load(RunDir(tmp_path / "mem").client_state(0, 1), "tok", shard))

    second = train(message(weights, tmp_path / "mem", server_round=2, state_rounds=(1, 0)), context())
    assert MEMORY.hits == 1 and MEMORY.misses == 0
    assert_same_state(
        MEMORY.held(key(tmp_path / "mem"))[1],
        TrainState.load(RunDir(tmp_path / "mem").client_state(0, 2), "tok", shard),
    )

    MEMORY.clear()  # the same two rounds with nothing kept: every round reads its state file
    _, from_files = two_rounds(weights, tmp_path / "files", memory_mb=0)
    assert MEMORY.hits == 0 and MEMORY.held(key(tmp_path / "files")) is None
    for k, v in arrays_of(second).items():
        assert np.array_equal(v, arrays_of(from_files)[k]), k
    assert_same_state(
        TrainState.load(RunDir(tmp_path / "mem").client_state(0, 2), "tok", shard),
        TrainState.load(RunDir(tmp_path / "files").client_state(0, 2), "tok", shard),
    )


def test_a_failed_round_leaves_nothing_held_and_the_retry_reads_the_file(weights, tmp_path):
    _, expected = two_rounds(weights, tmp_path / "ref", memory_mb=4096)
    MEMORY.clear()
    train(message(weights, tmp_path / "run"), context())
    # round 2 diverges after its first steps changed the state it was handed (Adam's moments, the step count) ...
    failure = error_of(train(message(weights, tmp_path / "run", server_round=2, state_rounds=(1, 0)), context(lr=1e30)))
    assert failure["step"] >= 2 and ("loss is" in failure["error"] or "not finite" in failure["error"])
    assert MEMORY.held(key(tmp_path / "run")) is None
    # ... so the server's retry of round 2 from round 1 reads round 1's file and ends as if nothing had failed
    retry = train(message(weights, tmp_path / "run", server_round=2, state_rounds=(1, 0)), context())
    for k, v in arrays_of(retry).items():
        assert np.array_equal(v, arrays_of(expected)[k]), k


def test_a_replaced_state_file_wins_over_the_held_copy(weights, tmp_path):
    shard = shards_for_config(parse_config(RUN_CONFIG), 2)[0]
    train(message(weights, tmp_path), context())
    path = RunDir(tmp_path).client_state(0, 1)
    state = TrainState.load(path, "tok", shard)
    state.step = 1000
    state.save(path)
    reply = train(message(weights, tmp_path, server_round=2, state_rounds=(1, 0)), context())
    assert MEMORY.hits == 0 and reply.content.metric_records["metrics"]["client-step"] == 1002
    assert MEMORY.held(key(tmp_path))[0] == 2
    gone = RunDir(tmp_path).client_state(0, 2)
    gone.unlink()  # a file gone is reported as gone, although its copy is held
    failure = error_of(train(message(weights, tmp_path, server_round=3, state_rounds=(2, 0)), context()))
    assert failure["error"].startswith(f"RuntimeError: client state {gone} is missing")


def test_the_budget_bounds_what_is_held(weights, tmp_path):
    state_bytes = None
    for p in (0, 1):
        ctx = context(node_config={"partition-id": p, "num-partitions": 2})
        train(message(weights, tmp_path), ctx)
        state_bytes = state_bytes or tensor_bytes(MEMORY.held(key(tmp_path, p))[1].to_dict())
    assert MEMORY.held(key(tmp_path, 0)) and MEMORY.held(key(tmp_path, 1))
    # a budget for one state: keeping partition 0's round 2 drops the least recently kept (partition 1)
    budget_mb = state_bytes / 2**20 * 1.5
    MEMORY.keep(
        key(tmp_path, 0),
        2,
        MEMORY.held(key(tmp_path, 0))[1],
        RunDir(tmp_path).client_state(0, 1),
        int(budget_mb * 2**20),
    )
    assert MEMORY.held(key(tmp_path, 1)) is None and MEMORY.held(key(tmp_path, 0))[0] == 2
    assert tensor_bytes(torch.zeros(3, dtype=torch.float64)) == 24


def test_reply_buffers_live_with_the_kept_model_pair_only():
    memory = ClientMemory()
    build = lambda: torch.nn.Linear(4, 4)  # noqa: E731
    memory.models(("a",), build, budget_bytes=0)  # not kept: neither are its buffers
    assert memory.buffers(("a",)) == {} and memory.buffers(("a",)) is not memory.buffers(("a",))
    memory.models(("a",), build, budget_bytes=2**20)
    kept = memory.buffers(("a",))
    kept["net"] = torch.zeros(3)
    assert memory.buffers(("a",)) is kept
    memory.models(("b",), build, budget_bytes=2**20)  # another architecture: the old buffers go with its pair
    assert memory.buffers(("a",)) == {} and memory.buffers(("b",)) == {}
    memory.buffers(("b",))["net"] = torch.zeros(3)
    memory.clear()
    assert memory.buffers(("b",)) == {}


def test_background_write_reraises_and_is_bounded(tmp_path):
    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        BackgroundWrite(fail, "x").wait(5)
    release = threading.Event()
    slow = BackgroundWrite(lambda: release.wait(10), "client state /x/round_0002.pt")
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"^writing client state /x/round_0002.pt did not finish within 0.2 s"):
        slow.wait(0.2)
    assert time.perf_counter() - t0 < 2
    release.set()


def test_atomic_write_runs_before_replace_with_the_new_file_not_yet_in_place(tmp_path):
    target = tmp_path / "resume.pt"
    target.write_bytes(b"old")
    seen = []
    atomic_write_bytes(target, lambda f: f.write(b"new"), before_replace=lambda: seen.append(target.read_bytes()))
    assert seen == [b"old"] and target.read_bytes() == b"new"
