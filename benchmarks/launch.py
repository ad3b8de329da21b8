"""One `flower-simulation` run for a benchmark, as a user would start it (experiments.launch.simulate in a child
process), bounded in time: the benchmarks that compare it with other modes share this launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_simulation(
    overrides: str,
    clients: int,
    resources: dict,
    out: Path,
    run_name: str,
    timeout_s: float = 600.0,
    env=None,
    who: str = "benchmark",
) -> float:
    """Train `overrides` with `clients` SuperNodes of `resources` (Flower's client_resources) into out/run_name;
    returns the wall seconds of the whole command (Ray start-up and the final samples included). Stops it after
    `timeout_s` and fails naming its last line, as it does when the simulation fails."""
    t0 = time.perf_counter()
    # its own session, so that a timeout ends the whole process group (flower-simulation and the Ray processes it
    # started): SIGTERM first (flower-simulation marks the run interrupted and stops Ray), SIGKILL 10 s later
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.launch.simulate",
            "--app",
            str(ROOT),
            "--num-supernodes",
            str(clients),
            "--backend-config",
            json.dumps({"client_resources": resources}),
            "--run-config",
            f'{overrides} output-dir="{out}" run-name="{run_name}"',
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                _, stderr = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                stderr = ""
        last = (stderr or "").strip().splitlines()
        raise SystemExit(
            f"{who}: the {clients}-client simulation did not finish within {timeout_s:g} s "
            f"(stopped); its last line: {(last or ['no output'])[-1]}"
        ) from None
    if proc.returncode != 0:
        raise SystemExit(
            f"{who}: the {clients}-client simulation failed (exit {proc.returncode}): "
            f"{(stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    return time.perf_counter() - t0
