"""Per-round fixed cost of a federated round, split into its parts, at a given UNet's size (default: the paper's).

    python benchmarks/round_overhead.py [--preset ddpm-cifar10] [--clients 2] [--rounds 3] [--steps 2]
                                        [--batch-size 4] [--image-size 32] [--threads 0]

Runs the real ServerApp and ClientApp in this process (tests/local_grid.py's grid, no Ray) on the digits data
with a handful of optimizer steps per client per round, so the fixed cost dominates. Each reply's content goes
through a pickle round trip, as a Ray actor's reply does in `flower-simulation` ("transfer" below). The code
marks its phases (fl_ietagc/runs/phases.py); the table gives each phase's seconds per client per round (client
phases) or per round (server phases), over rounds 2+ (round 1 has no state to load and builds caches).
"fixed cost per client per round" = a client call's wall time minus its training loop's own seconds, plus the
transfer, plus the server's per-round work divided by K.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "ddpm-cifar10"), default="ddpm-cifar10")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--checkpoint-every", type=int, default=1)
    a = p.parse_args(argv)
    if a.rounds < 2:
        raise SystemExit("round_overhead: --rounds must be >= 2 (round 1 has no state to load)")
    # after the options: a wrong one answers before torch and Flower load
    import torch
    from flwr.app import Message

    from clients.client_app import train
    from fl_ietagc.runs import phases
    from tests.local_grid import LocalGrid, run_server

    if a.threads:
        torch.set_num_threads(a.threads)
    calls: dict[int, list[tuple[float, float]]] = defaultdict(list)  # round -> [(call s, training s)]
    transfer: dict[int, float] = defaultdict(float)

    class TimedGrid(LocalGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for m in messages:
                ctx = self.contexts[m.metadata.dst_node_id]
                server_round = int(m.content["config"]["server-round"])
                t0 = time.perf_counter()
                reply = train(m, ctx)
                wall = time.perf_counter() - t0
                if "error" in reply.content.config_records:
                    raise SystemExit(f"round_overhead: the client failed: {reply.content['error']['error']}")
                calls[server_round].append((wall, float(reply.content["metrics"]["seconds"])))
                t0 = time.perf_counter()
                content = pickle.loads(pickle.dumps(reply.content, protocol=pickle.HIGHEST_PROTOCOL))
                transfer[server_round] += time.perf_counter() - t0
                replies.append(Message(content, reply_to=m))
            return replies

    # images such that every client gets `steps` full batches in one local epoch (digits holds 10% out)
    per_client = a.steps * a.batch_size
    max_images = int((per_client * a.clients) / 0.9) + a.clients + 1
    by_round: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "preset": a.preset,
            "image-size": a.image_size,
            "batch-size": a.batch_size,
            "local-epochs": 1,
            "max-images": max_images,
            "num-clients": a.clients,
            "num-server-rounds": a.rounds,
            "sample-count": 0,
            "warmup-steps": 0,
            "device": "cpu",
            "output-dir": tmp,
            "run-name": "bench",
            "checkpoint-every": a.checkpoint_every,
        }
        phases.enable()
        grid = TimedGrid(a.clients, config)
        orig = grid.send_and_receive

        def per_round(messages, timeout=None):  # phases of each round kept apart
            server_round = int(next(iter(messages)).content["config"]["server-round"]) if messages else 0
            if server_round > 1:
                by_round[server_round - 1] = phases.totals()
                phases.reset()
            return orig(messages, timeout)

        grid.send_and_receive = per_round
        t0 = time.perf_counter()
        run_server(config, a.clients, grid)
        total = time.perf_counter() - t0
        by_round[a.rounds] = phases.totals()
        metrics = json.loads((Path(tmp) / "bench" / "metrics.json").read_text())
        params = json.loads((Path(tmp) / "bench" / "config.json").read_text()).get("num_parameters", 0)
    later = range(2, a.rounds + 1)
    k, n = a.clients, len(later)
    sums: dict[str, float] = defaultdict(float)
    for r in later:
        for name, (secs, _) in by_round[r].items():
            sums[name] += secs
    steps = metrics[-1]["clients"][0]["steps"]
    client_fixed = sum(w - s for r in later for w, s in calls[r]) / (k * n)
    training = sum(s for r in later for _, s in calls[r]) / (k * n)
    moved = sum(transfer[r] for r in later) / (k * n)
    server = sum(v for name, v in sums.items() if name.startswith("server:")) / n
    ends = [m["elapsed-s"] for m in metrics]
    round_wall = sum(b - a_ for a_, b in zip(ends[:-1], ends[1:])) / (len(ends) - 1)
    print(
        f"{a.preset} ({params / 1e6:.1f}M parameters) at 1x{a.image_size}x{a.image_size} (digits), {k} clients, "
        f"{steps} steps of batch {a.batch_size} per client per round, rounds 2..{a.rounds}; "
        f"checkpoint-every {a.checkpoint_every}; {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}"
    )
    print()
    print("| part | seconds | per |")
    print("|---|---|---|")
    for name in sorted(sums, key=lambda x: (x.startswith("end of run"), x.startswith("server"), x)):
        per = "round" if name.startswith("server:") else "run" if name.startswith("end of run:") else "client x round"
        print(f"| {name} | {sums[name] / {'round': n, 'run': 1}.get(per, k * n):.3f} | {per} |")
    print(
        f"| client: other (call wall - training - parts above) | "
        f"{client_fixed - sum(v for x, v in sums.items() if x.startswith('client:')) / (k * n):.3f} "
        f"| client x round |"
    )
    print(f"| transfer (pickle round trip of the reply, as Ray) | {moved:.3f} | client x round |")
    print(
        f"| **client fixed cost** (call wall - training + transfer) | **{client_fixed + moved:.3f}** | client x round |"
    )
    print(
        f"| **fixed cost per client per round** (client + server / K) | **{client_fixed + moved + server / k:.3f}** "
        f"| client x round |"
    )
    print(f"| training loop ({steps} steps) | {training:.3f} | client x round |")
    print(f"| round wall (metrics.json) | {round_wall:.3f} | round |")
    print()
    print(f"total wall {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
