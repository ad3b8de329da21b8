"""Per-round wall time of one job in the Deployment Engine (several ways) and the Simulation Engine, split into
its parts, with the SuperLink's CPU seconds per round and the bound bytes / bandwidth.

    python benchmarks/deployment_modes.py [--rounds 3] [--clients 2] [--config test|default|paper]
                                          [--only MODE ...] [--rates 1gbit 100mbit] [--set KEY=VALUE ...]

  subprocess  scripts/deploy-local.sh ISOLATION=subprocess (Flower's default: `flwr-clientapp` per message)
  process     scripts/deploy-local.sh ISOLATION=process (experiments/launch/warm_clientapp.py beside each SuperNode),
              SuperLink and SuperNodes on 127.0.0.1 (loopback)
  netns       scripts/deploy-netns.sh: the same in network namespaces, links shaped with tc tbf to each --rates
              value (needs root; skipped with the reason where namespaces cannot be made)
  simulation  flower-simulation, client_resources num_cpus = 1 (the K clients in parallel, as K SuperNodes)

Deployments are secure (TLS + SuperNode authentication), and every client trains with cores / K torch threads
(deploy-local.sh's default; Ray's num_cpus = 1 in simulation). Per-round seconds are the ServerApp's
(differences of metrics.json `elapsed-s`); the split comes from metrics.json `timing` (rounds 2.., round 1 holds
the start-up): server send (pushing the messages), client receive (pushed -> the ClientApp's handler starts),
train (the client's training loop), the rest of the client's handler (weights in and out, state load and save),
client send (reply ready -> the server has it), aggregation; the remainder is the commit (checkpoint, resume.pt)
and the round's bookkeeping. Means over clients and rounds 2... `bound` = what one SuperNode's link carries in a
round divided by its rate: the instruction down, then the reply up (2 x `wire_bytes`; each SuperNode has its own
link of that rate, as separate machines would; the SuperLink's side is not one shared uplink); 0 on loopback.
SuperLink CPU: its user + system seconds per round (rounds 2..), read from /proc while the run goes on.
`--config test`: tests/test_deployment.py's tiny job (128 images, batch 32, 1 local epoch, T = 20);
`--config default`: the default job with 1 local epoch; `--config paper`: the paper's 35.7M UNet
(preset ddpm-cifar10) on digits at 32x32, 64 images, batch 32: one step per client per round, so transport
dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # (before opacus' own top-level `benchmarks` package)

from benchmarks.launch import run_simulation  # noqa: E402
from fl_ietagc.settings.config import parse_config, parse_overrides  # noqa: E402

CONFIGS = {
    "test": "local-epochs=1 max-images=128 batch-size=32 sample-count=0 diffusion-steps=20",
    "default": "local-epochs=1 sample-count=0",
    "paper": "preset='ddpm-cifar10' image-size=32 local-epochs=1 max-images=64 batch-size=32 sample-count=0 "
    "diffusion-steps=20 warmup-steps=0",
}
ENV = {
    **{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def round_seconds(run: Path) -> tuple[list[float], list[list[int]], list[dict]]:
    metrics = json.loads((run / "metrics.json").read_text())
    elapsed = [m["elapsed-s"] for m in metrics]
    pids = [[c["pid"] for c in m["clients"]] for m in metrics]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)], pids, [m.get("timing", {}) for m in metrics]


class CpuWatch(threading.Thread):
    """CPU seconds (user + system) of the SuperLink serving `port`, sampled each time a round is committed."""

    def __init__(self, port: int, run: Path):
        super().__init__(daemon=True)
        self.port, self.run_dir, self.per_round, self.stop = port, run, {}, threading.Event()

    def cpu(self) -> float | None:
        found = subprocess.run(
            ["pgrep", "-f", f"flower-superlink .*--port {self.port}( |$)"], capture_output=True, text=True
        ).stdout.split()
        try:
            fields = Path(f"/proc/{found[0]}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (IndexError, OSError):
            return None

    def run(self) -> None:  # noqa: D102 (threading.Thread.run)
        while not self.stop.is_set():
            try:
                rounds = len(json.loads((self.run_dir / "metrics.json").read_text()))
            except (OSError, ValueError):
                rounds = 0
            cpu = self.cpu()
            if cpu is not None:
                self.per_round.setdefault(rounds, cpu)
            time.sleep(0.2)

    def seconds_per_round(self) -> float | None:
        rounds = sorted(r for r in self.per_round if r >= 1)
        if len(rounds) < 2:
            return None
        return (self.per_round[rounds[-1]] - self.per_round[rounds[0]]) / (rounds[-1] - rounds[0])


def deploy(
    script: str,
    isolation: str,
    overrides: str,
    clients: int,
    out: Path,
    port: int,
    name: str,
    extra_env: dict | None = None,
):
    t0 = time.perf_counter()
    env = {
        **ENV,
        "ISOLATION": isolation,
        "K": str(clients),
        "PORT": str(port),
        "WORK": str(out / f"{name}-work"),
        **(extra_env or {}),
    }
    watch = CpuWatch(port, out / name)
    watch.start()
    done = subprocess.run(
        ["bash", script, "-c", f"{overrides} run-name='{name}' output-dir='{out}'"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    watch.stop.set()
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {script} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    wall = time.perf_counter() - t0
    seconds, pids, timing = round_seconds(out / name)
    return seconds, wall, pids, timing, watch.seconds_per_round()


def simulate(overrides: str, clients: int, out: Path):
    wall = run_simulation(overrides, clients, {"num_cpus": 1}, out, "sim", env=ENV, who="deployment_modes")
    seconds, pids, timing = round_seconds(out / "sim")
    return seconds, wall, pids, timing, None


def split(timing: list[dict]) -> dict:
    """Mean seconds of each part over rounds 2.. and clients (round 1 holds the start-up)."""
    later = [t for t in timing[1:] if t.get("clients")] or [t for t in timing if t.get("clients")]
    if not later:
        return {}
    per_client = [c for t in later for c in t["clients"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "server send": mean([t["send-s"] for t in later]),
        "client receive": mean([c["receive-s"] for c in per_client]),
        "train": mean([c["train-s"] for c in per_client]),
        "client handler other": mean([c["handler-s"] - c["train-s"] for c in per_client]),
        "client send": mean([c["send-s"] for c in per_client]),
        "aggregate": mean([t["aggregate-s"] for t in later]),
    }


def message_bytes(overrides: str) -> int:
    # (torch, diffusers: only this measurement needs them, not the processes that orchestrate the deployments)
    from fl_ietagc.federation.wire import Layout, wire_bytes
    from fl_ietagc.runs.checkpoints import pack_weights
    from fl_ietagc.training.run_model import initial_weights

    cfg = parse_config(parse_overrides(overrides))
    net, ema = initial_weights(cfg)
    return wire_bytes(Layout.of(pack_weights(net, ema), cfg.transport_dtype))


def rate_bits(rate: str) -> float:
    """tc rate text (1gbit, 100mbit, 10mbps) -> bits per second."""
    m = re.fullmatch(r"([0-9.]+)([kmg]?)(bit|bps)", rate)
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] * (8 if m.group(3) == "bps" else 1)
    return float(m.group(1)) * scale


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--config", choices=sorted(CONFIGS), default="test")
    p.add_argument("--port", type=int, default=9600, help="SuperLink port (SuperNodes: +100+i)")
    p.add_argument("--only", nargs="*", choices=["subprocess", "process", "netns", "simulation"], default=None)
    p.add_argument("--rates", nargs="*", default=["1gbit", "100mbit"], help="netns link rates (tc tbf)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override on top of --config, e.g. --set \"transport-dtype='bf16'\" (repeatable)",
    )
    args = p.parse_args()
    overrides = " ".join(
        [f"num-server-rounds={args.rounds} num-clients={args.clients} {CONFIGS[args.config]}", *args.set]
    )
    names = args.only or ["process", "netns", "simulation"]
    size = message_bytes(overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        out = Path(tmp)
        runs = []
        for name in names:
            if name == "netns":
                check = subprocess.run(
                    ["bash", "scripts/deploy-netns.sh", "--check"], cwd=ROOT, capture_output=True, text=True
                )
                if check.returncode != 0:
                    print(f"netns: skipped: {check.stdout.strip() or check.stderr.strip()}", file=sys.stderr)
                    continue
                runs += [(f"netns {r}", r) for r in args.rates]
            else:
                runs.append((name, None))
        for i, (name, rate) in enumerate(runs):
            port = args.port + 10 * i
            slug = name.replace(" ", "-")
            if name == "simulation":
                result = simulate(overrides, args.clients, out)
            elif rate is not None:
                result = deploy(
                    "scripts/deploy-netns.sh", "process", overrides, args.clients, out, port, slug, {"RATE": rate}
                )
            else:
                result = deploy("scripts/deploy-local.sh", name, overrides, args.clients, out, port, slug)
            seconds, wall, pids, timing, cpu = result
            distinct = len({pid for r in pids for pid in r})
            bound = 2 * size * 8 / rate_bits(rate) if rate else 0.0  # per link: the instruction down, the reply up
            rows.append((name, seconds, wall, distinct, split(timing), cpu, bound))
            print(
                f"{name}: rounds {[round(s, 1) for s in seconds]}  wall {wall:.1f} s  split {split(timing)}  "
                f"SuperLink CPU/round {cpu}",
                file=sys.stderr,
                flush=True,
            )
    import flwr
    import ray
    import torch

    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, flwr {flwr.__version__}, "
        f"ray {ray.__version__}; {time.strftime('%Y-%m-%d')}. Config ({args.config}): {overrides}. "
        f"Weights per message: {size / 1e6:.2f} MB\n"
    )
    heads = " | ".join(f"round {r} (s)" for r in range(1, args.rounds + 1))
    print(f"| mode | {heads} | rounds total (s) | total wall (s) | ClientApp processes |")
    print("|---" * (args.rounds + 4) + "|")
    for name, seconds, wall, distinct, *_ in rows:
        cells = " | ".join(f"{s:.1f}" for s in seconds)
        print(f"| {name} | {cells} | {sum(seconds):.1f} | {wall:.1f} | {distinct} |")
    parts = ["server send", "client receive", "train", "client handler other", "client send", "aggregate"]
    print(f"\nRounds 2..{args.rounds}, mean seconds (per client where per client):\n")
    print("| mode | round (s) | " + " | ".join(parts) + " | bytes/bandwidth bound (s) | SuperLink CPU s/round |")
    print("|---" * (len(parts) + 4) + "|")
    for name, seconds, _wall, _distinct, parts_s, cpu, bound in rows:
        later = seconds[1:] or seconds
        cells = " | ".join(f"{parts_s[k]:.2f}" if k in parts_s else "-" for k in parts)
        print(
            f"| {name} | {sum(later) / len(later):.2f} | {cells} | {bound:.2f} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} |"
        )


if __name__ == "__main__":
    main()
