"""One life for every run: the ServerApp, centralized training and the Flower-free IET loop all train inside
`run_lifecycle`, and all append the records `round_record` builds to metrics.json.

The drivers keep only what differs between them (how a round trains, what its record holds beyond the common
keys); registering the run, its status on the way out and forgetting it again are written once, here.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fl_ietagc.federation.protocol import ClientFailure, ClientRound
from fl_ietagc.runs.rundir import ACTIVE_RUNS, RunDir, register_active

STOPPED = (KeyboardInterrupt, SystemExit)  # the process was asked to stop: the run is interrupted, not failed


@contextmanager
def run_lifecycle(
    run: RunDir,
    start_round: int,
    num_rounds: int,
    *,
    on_failure: Callable[[RunDir], None] | None = None,
    mark_on_signals: bool = False,
) -> Iterator[RunDir]:
    """Train `run` inside this block; every way out leaves the right status.json behind.

    - On entry: the run is registered as this process's (`register_active`: signal handlers and a supervising
      flower-simulation find it) and its status is "running" at `start_round` of `num_rounds`. With
      `mark_on_signals` (the ServerApp, where Flower's flwr-serverapp runs it on the main thread), SIGINT and
      SIGTERM first mark it interrupted, then do what they did before.
    - The block ends normally: nothing is written here. The driver has committed its rounds
      (`RunDir.commit_round`) and marked the run completed once its final files were in place.
    - KeyboardInterrupt or SystemExit: status "interrupted" (error: the exception's type), resumable with
      `fl-ietagc resume`. Both mean the process was asked to stop, not that the run went wrong: Ctrl-C, the CLI's
      SIGTERM (raised as KeyboardInterrupt), Flower's own exit on SIGTERM/SIGINT (SystemExit). A status a signal
      handler already marked "interrupted" is kept as it is (it names the signal).
    - Any other exception: status "failed" with the one-line error and the traceback in logs/failure.log
      (`RunDir.mark_failed`, resumable too), then `on_failure(run)` (the ServerApp logs where to look).
    - Every way out re-raises what ended the block, and the run is discarded from this process's active runs
      (its files stay: a run that never committed a round keeps its round-0 commit point, to resume or delete).
    """
    register_active(run)
    restore = _mark_interrupted_on_signals() if mark_on_signals else (lambda: None)
    try:
        run.write_status("running", round=start_round, num_rounds=num_rounds)
        yield run
    except STOPPED as exc:
        if run.read_status().get("status") != "interrupted":
            run.mark_interrupted(type(exc).__name__)
        raise
    except BaseException as exc:
        run.mark_failed(exc)
        if on_failure is not None:
            on_failure(run)
        raise
    finally:
        restore()
        ACTIVE_RUNS.discard(run)


def _mark_interrupted_on_signals() -> Callable[[], None]:
    """On the main thread, SIGTERM and SIGINT first mark the active runs interrupted (resumable), then do what they
    did before (Flower's graceful exit; the default SIGINT raises KeyboardInterrupt). Returns the function that puts
    the previous handlers back. Elsewhere (simulation: the ServerApp on a thread) nothing is installed:
    flower-simulation's own process marks the run and ends Ray."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        for run in list(ACTIVE_RUNS):
            run.mark_interrupted(signal.Signals(signum).name)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_IGN:
            return
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in previous:
        signal.signal(s, handler)
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def round_record(
    server_round: int,
    elapsed_s: float,
    metrics: dict,
    *,
    ret_moved: int | None = None,
    clients: list[ClientRound] | None = None,
    failures: list[ClientFailure] | None = None,
    timing: dict | None = None,
    privacy: dict | None = None,
) -> dict:
    """One round's record in metrics.json, its keys in the order every run file has them: round, elapsed-s (the
    run's training time so far, over all its sessions), the round's metrics (`protocol.round_metrics`, or the
    centralized trainer's), then what the driver has: ret-moved, clients, failed (the ServerApp, even when
    empty), timing, privacy (only when the run spends any)."""
    record = {"round": server_round, "elapsed-s": elapsed_s, **metrics}
    if ret_moved is not None:
        record["ret-moved"] = ret_moved
    if clients is not None:
        record["clients"] = [c.to_json() for c in clients]
    if failures is not None:
        record["failed"] = [{"partition-id": f.partition_id, "error": f.error, "step": f.step} for f in failures]
    if timing is not None:
        record["timing"] = timing
    if privacy:
        record["privacy"] = privacy
    return record
