"""A round's commit on a thread while the next round trains.

Why: at the paper UNet's size a commit writes ~0.6 GB (checkpoint and resume.pt, each fsync'ed): 0.9 s per round
on a 2-core machine, paid while every client waits for its next instruction. The next round needs none of it (its
instruction is built from the in-memory state), so the ServerApp hands the commit to `RoundCommits` and goes on;
before anything of the next round is acted on (its replies, its fault points, its own commit) it `settle`s the
pending one.

What stays true:
- commits happen one at a time, in round order; resume.pt still replaces the old one last (RunDir.commit_round);
- a failed or stalled commit fails the run at the next `settle`, named by its round (a stall after `timeout_s`);
- `durable_round` / `durable_state_rounds` are the last commit known to be on disk: a resumed run starts there,
  so clients keep their states from those rounds on (the instruction carries them; clients/client_app.py prunes
  only older ones), up to one more state per client than with synchronous commits.
"""

from __future__ import annotations

from collections.abc import Callable

from fl_ietagc.runs.checkpoints import BackgroundWrite


class CommitError(RuntimeError):
    """A round's commit failed: that round and every later one are not durable."""


class RoundCommits:
    def __init__(self, durable_round: int, durable_state_rounds: list[int], timeout_s: float):
        self.durable_round = durable_round
        self.durable_state_rounds = list(durable_state_rounds)
        self.timeout_s = timeout_s
        self._pending: tuple[int, list[int], BackgroundWrite] | None = None

    def submit(self, server_round: int, state_rounds: list[int], commit: Callable[[], None]) -> None:
        """Start `commit()` (round `server_round`, after which client p starts from `state_rounds[p]`) on a
        thread, once the one before it is durable. What `commit` reads must not change after this call."""
        self.settle()
        self._pending = (server_round, list(state_rounds), BackgroundWrite(commit, f"round {server_round}'s commit"))

    def settle(self) -> int | None:
        """Wait (at most `timeout_s`) for the pending commit; returns its round once durable (None: none was
        pending). Raises CommitError naming the round if it failed or did not finish in time."""
        if self._pending is None:
            return None
        server_round, state_rounds, job = self._pending
        self._pending = None
        try:
            job.wait(self.timeout_s)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):  # (an injected fault's exit, or a signal)
                raise
            raise CommitError(f"round {server_round}: commit failed: {e}") from e
        self.durable_round, self.durable_state_rounds = server_round, state_rounds
        return server_round

    @property
    def pending(self) -> bool:
        return self._pending is not None
