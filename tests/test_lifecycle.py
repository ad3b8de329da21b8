"""One run lifecycle for every driver (fl_ietagc/runs/lifecycle.py): each way out of `run_lifecycle` leaves the
right status.json, and `round_record` writes the keys every metrics.json has, in their order."""

import json
import os
import signal

import numpy as np
import pytest

from fl_ietagc.federation.protocol import ClientFailure, ClientRound, round_metrics
from fl_ietagc.runs.lifecycle import round_record, run_lifecycle
from fl_ietagc.runs.rundir import ACTIVE_RUNS, ANNOUNCE_ENV, RunDir


def begun(tmp_path, name="r") -> RunDir:
    """A run as the drivers leave it before training: config, shards, round-0 commit point."""
    run = RunDir.create(str(tmp_path), name, "")
    run.begin({"kind": "federated"}, [np.arange(4)], 3)
    run.write_resume(0, {}, {}, {})
    return run


def test_a_run_is_registered_inside_and_running_from_its_start_round(tmp_path, monkeypatch):
    announce = tmp_path / "announce"
    monkeypatch.setenv(ANNOUNCE_ENV, str(announce))
    run = begun(tmp_path)
    with run_lifecycle(run, 2, 3) as inside:
        assert inside is run and run in ACTIVE_RUNS
        assert announce.read_text() == str(run.path)  # a supervising flower-simulation learns where it is
        status = run.read_status()
        assert (status["status"], status["round"], status["num_rounds"]) == ("running", 2, 3)
        run.mark_completed(3)
    assert run not in ACTIVE_RUNS and run.read_status()["status"] == "completed"  # nothing written on a clean exit


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stopped_process_leaves_the_run_interrupted_and_resumable(tmp_path, stop):
    run = begun(tmp_path)
    with pytest.raises(stop):
        with run_lifecycle(run, 0, 3):
            raise stop()
    status = run.read_status()
    assert status["status"] == "interrupted" and status["error"] == stop.__name__ and status["round"] == 0
    assert status["resume"] == f"fl-ietagc resume {run.path}"
    assert run not in ACTIVE_RUNS and run.liveness() == "interrupted"
    assert RunDir.reopen(run.path).committed_round() == 0


def test_an_interruption_a_signal_handler_marked_keeps_its_signal(tmp_path):
    run = begun(tmp_path)
    with pytest.raises(SystemExit):
        with run_lifecycle(run, 0, 3):
            run.mark_interrupted("SIGTERM")  # as the handler does before Flower's exit
            raise SystemExit(0)
    assert run.read_status()["error"] == "SIGTERM"


def test_an_error_leaves_the_run_failed_with_one_line_and_the_traceback(tmp_path):
    run = begun(tmp_path)
    told = []
    with pytest.raises(ValueError, match="bad value"):
        with run_lifecycle(run, 0, 3, on_failure=told.append):
            raise ValueError("bad value\nsecond line")
    status = run.read_status()
    assert status["status"] == "failed" and status["error"] == "ValueError: bad value" and status["round"] == 0
    assert "Traceback" in (run.logs_dir / "failure.log").read_text()
    assert told == [run] and run not in ACTIVE_RUNS


def test_a_run_that_committed_no_round_is_forgotten_not_deleted(tmp_path):
    """discard: the process forgets the run (signal handlers no longer mark it); its files stay, to resume."""
    run = begun(tmp_path)
    with pytest.raises(RuntimeError):
        with run_lifecycle(run, 0, 3):
            raise RuntimeError("before round 1")
    assert run not in ACTIVE_RUNS and run.resume_path.is_file() and run.config_path.is_file()
    assert RunDir.reopen(run.path).committed_round() == 0


def test_signals_mark_the_run_interrupted_then_do_what_they_did_before(tmp_path):
    run = begun(tmp_path)
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(run.read_status()["status"]))
    try:
        with run_lifecycle(run, 0, 3, mark_on_signals=True):
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["interrupted"]  # marked before the previous handler ran
        assert run.read_status()["error"] == "SIGTERM"
        mine = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["interrupted"] * 2 and mine is not previous  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def client(pid, n=10):
    return ClientRound(pid, n, 0.5 + pid, n - 1, 1, 2, 1.5, 7, np.arange(3), np.array([0, 1, 0]), 11, "h", "")


def test_the_round_record_has_the_keys_of_every_metrics_json_in_their_order():
    clients = [client(0), client(2)]
    failed = [ClientFailure(1, 4, "ValueError: boom", 9, "Traceback ...")]
    record = round_record(
        4,
        12.5,
        round_metrics(clients),
        ret_moved=3,
        clients=clients,
        failures=failed,
        timing={"send-s": 0.1},
        privacy={"epsilon": 1.0},
    )
    assert list(record) == [
        "round",
        "elapsed-s",
        "loss",
        "skip-rate",
        "kept",
        "skipped",
        "steps",
        "client-seconds-max",
        "skip-rate-per-client",
        "loss-per-client",
        "ret-moved",
        "clients",
        "failed",
        "timing",
        "privacy",
    ]
    assert record["failed"] == [{"partition-id": 1, "error": "ValueError: boom", "step": 9}]
    assert record["clients"] == [c.to_json() for c in clients]
    # the Flower-free loop: no failures, timing or privacy; the ServerApp: "failed" even when empty
    loop = round_record(1, 1.0, round_metrics(clients), ret_moved=0, clients=clients)
    assert list(loop)[-2:] == ["ret-moved", "clients"]
    assert round_record(1, 1.0, {}, ret_moved=0, clients=[], failures=[], privacy={})["failed"] == []
    assert "privacy" not in round_record(1, 1.0, {}, privacy={})  # a run that spends no privacy budget
    json.dumps(record)
