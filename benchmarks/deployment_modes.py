"""Per-round wall time of one job three ways: Deployment Engine with a new ClientApp process per message,
Deployment Engine with one long-lived ClientApp process per SuperNode, and the Simulation Engine.

    python benchmarks/deployment_modes.py [--rounds 3] [--clients 2] [--config test|default] [--only NAME ...]

  subprocess  scripts/deploy-local.sh ISOLATION=subprocess (Flower's default: `flwr-clientapp` per message)
  process     scripts/deploy-local.sh ISOLATION=process (experiments/warm_clientapp.py beside each SuperNode)
  simulation  flower-simulation, client_resources num_cpus = 1 (the K clients in parallel, as K SuperNodes)

Both deployments are secure (TLS + SuperNode authentication), K SuperNodes on 127.0.0.1, and every client trains
with cores / K torch threads (deploy-local.sh's default; Ray's num_cpus = 1 in simulation). Per-round seconds are
the ServerApp's (differences of metrics.json `elapsed-s`: send, client training, replies, aggregation, commit);
total wall is the whole command (certificates, SuperLink/SuperNode or Ray start-up, the run, shutdown). The
ClientApp pids reported in each round show how many processes served the run. Prints a Markdown table.
`--config test`: tests/test_deployment.py's tiny job (128 images, batch 32, 1 local epoch, T = 20);
`--config default`: the default job with 1 local epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "test": "local-epochs=1 max-images=128 batch-size=32 sample-count=0 diffusion-steps=20",
    "default": "local-epochs=1 sample-count=0",
}
ENV = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def round_seconds(run: Path) -> tuple[list[float], list[list[int]]]:
    metrics = json.loads((run / "metrics.json").read_text())
    elapsed = [m["elapsed-s"] for m in metrics]
    pids = [[c["pid"] for c in m["clients"]] for m in metrics]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)], pids


def deploy(isolation: str, overrides: str, clients: int, out: Path, port: int) -> tuple[list[float], float, list]:
    name = f"deploy-{isolation}"
    t0 = time.perf_counter()
    env = {**ENV, "ISOLATION": isolation, "K": str(clients), "PORT": str(port), "WORK": str(out / f"{name}-work")}
    subprocess.run(["bash", "scripts/deploy-local.sh", "-c", f"{overrides} run-name='{name}' output-dir='{out}'"],
                   cwd=ROOT, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    seconds, pids = round_seconds(out / name)
    return seconds, wall, pids


def simulate(overrides: str, clients: int, out: Path) -> tuple[list[float], float, list]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.simulate", "--app", str(ROOT), "--num-supernodes",
                    str(clients), "--backend-config", json.dumps({"client_resources": {"num_cpus": 1}}),
                    "--run-config", f"{overrides} run-name='sim' output-dir='{out}'"],
                   cwd=ROOT, check=True, capture_output=True, env=ENV)
    wall = time.perf_counter() - t0
    seconds, pids = round_seconds(out / "sim")
    return seconds, wall, pids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--config", choices=sorted(CONFIGS), default="test")
    p.add_argument("--port", type=int, default=9600, help="SuperLink port (SuperNodes: +100+i)")
    p.add_argument("--only", nargs="*", choices=["subprocess", "process", "simulation"], default=None)
    args = p.parse_args()
    overrides = f"num-server-rounds={args.rounds} num-clients={args.clients} {CONFIGS[args.config]}"
    names = args.only or ["subprocess", "process", "simulation"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        out = Path(tmp)
        for name in names:
            if name == "simulation":
                seconds, wall, pids = simulate(overrides, args.clients, out)
            else:
                seconds, wall, pids = deploy(name, overrides, args.clients, out, args.port)
            distinct = len({pid for r in pids for pid in r})
            rows.append((name, seconds, wall, distinct))
            print(f"{name}: rounds {[round(s, 1) for s in seconds]}  wall {wall:.1f} s  "
                  f"{distinct} ClientApp pids over {len(pids)} rounds", file=sys.stderr, flush=True)
    import flwr
    import ray
    import torch

    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, flwr {flwr.__version__}, "
          f"ray {ray.__version__}; {time.strftime('%Y-%m-%d')}. Config ({args.config}): {overrides}\n")
    heads = " | ".join(f"round {r} (s)" for r in range(1, args.rounds + 1))
    print(f"| mode | {heads} | rounds total (s) | total wall (s) | ClientApp processes |")
    print("|---" * (args.rounds + 4) + "|")
    for name, seconds, wall, distinct in rows:
        cells = " | ".join(f"{s:.1f}" for s in seconds)
        print(f"| {name} | {cells} | {sum(seconds):.1f} | {wall:.1f} | {distinct} |")


if __name__ == "__main__":
    main()
