"""Fault injection for the kill/resume tests: `FL_IETAGC_FAULT="POINT:ROUND[:ACTION],..."`.

At a named point of a run (see the `fault_point` calls), when the round matches, the process is
killed outright (ACTION `kill`, the default: SIGKILL, nothing is cleaned up), an error is raised
(`raise`), or it waits for an hour (`hang`, to stop it from outside mid-run). Unset in normal use, where each call is one dictionary look-up.

Points: `after-replies` (the clients have trained and saved their state, the server has not yet
committed the round), `mid-commit` (metrics and checkpoint written, resume point not yet),
`between-rounds` (round committed, next not started), `final-sampling` (final weights written,
samples not yet), `client-train-p<P>` (inside partition P's client, before it trains), and
`write-<folder>-<file name>` with round 0 (a file written to its temporary name, not yet renamed).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "FL_IETAGC_FAULT"


class InjectedFault(RuntimeError):
    pass


def _faults() -> dict[tuple[str, int], str]:
    out = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        point, _, rest = item.partition(":")
        server_round, _, action = rest.partition(":")
        out[(point.strip(), int(server_round))] = action.strip() or "kill"
    return out


def fault_point(point: str, server_round: int, ready=None) -> None:
    """`ready()`, when given, runs first if a fault is armed here: what the point's name promises (the ServerApp's
    `between-rounds`: the round's commit, which runs on a thread, made durable)."""
    if ENV not in os.environ:
        return
    action = _faults().get((point, server_round))
    if action is not None and ready is not None:
        ready()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected fault at {point}, round {server_round}")
    elif action == "hang":  # a round that takes long: the process waits here until it is stopped
        time.sleep(3600)
