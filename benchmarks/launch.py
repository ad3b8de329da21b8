"""One `flower-simulation` run for a benchmark, as a user would start it (experiments.launch.simulate in a child
process): the benchmarks that compare it with other modes share this launcher."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_simulation(overrides: str, clients: int, num_cpus: int, out: Path, run_name: str, env=None) -> float:
    """Train `overrides` with `clients` SuperNodes of `num_cpus` cores each into out/run_name; returns the wall
    seconds of the whole command (Ray start-up and the final samples included). Fails naming its stderr's end."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.launch.simulate",
            "--app",
            str(ROOT),
            "--num-supernodes",
            str(clients),
            "--backend-config",
            json.dumps({"client_resources": {"num_cpus": num_cpus}}),
            "--run-config",
            f"{overrides} run-name='{run_name}' output-dir='{out}'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"flower-simulation exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0
