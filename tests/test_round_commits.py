"""Round commits on a thread (fl_ietagc/runs/round_commits.py): one at a time, in order, failures named by round,
and the durable round advanced only once a commit is on disk."""

import threading
import time

import pytest

from fl_ietagc.runs.round_commits import CommitError, RoundCommits


def test_commits_run_one_at_a_time_in_round_order_and_become_durable_when_settled():
    done, started = [], threading.Event()

    def commit(r, seconds):
        def go():
            started.set()
            time.sleep(seconds)
            done.append(r)

        return go

    commits = RoundCommits(0, [0, 0], timeout_s=10)
    commits.submit(1, [1, 0], commit(1, 0.3))
    started.wait(5)
    assert commits.pending and commits.durable_round == 0 and commits.durable_state_rounds == [0, 0]
    commits.submit(2, [2, 2], commit(2, 0.0))  # waits for round 1's first
    assert done[0] == 1 and commits.durable_round == 1 and commits.durable_state_rounds == [1, 0]
    assert commits.settle() == 2 and done == [1, 2] and commits.durable_state_rounds == [2, 2]
    assert commits.settle() is None and not commits.pending


def test_a_failed_commit_is_named_by_its_round_and_is_not_durable():
    def fail():
        raise OSError(28, "No space left on device")

    commits = RoundCommits(3, [3, 3], timeout_s=10)
    commits.submit(4, [4, 4], fail)
    with pytest.raises(CommitError, match=r"round 4: commit failed: \[Errno 28\] No space left on device"):
        commits.settle()
    assert commits.durable_round == 3 and commits.durable_state_rounds == [3, 3] and not commits.pending


def test_a_stalled_commit_fails_within_its_bound_naming_the_round():
    release = threading.Event()
    commits = RoundCommits(0, [0], timeout_s=0.2)
    commits.submit(1, [1], lambda: release.wait(30))
    t0 = time.monotonic()
    with pytest.raises(CommitError, match=r"round 1: commit failed: writing round 1's commit did not finish within"):
        commits.settle()
    assert time.monotonic() - t0 < 5 and commits.durable_round == 0
    release.set()
