"""Follow a submitted Flower run to its end and exit with its outcome.

    python -m experiments.launch.follow_run RUN_ID [--superlink NAME]

Streams `flwr log`, then reads `flwr ls --run-id`: exit 0 only for `finished:completed`, else prints
Flower's status details and exits 1. (`flwr run --stream` itself exits 0 for failed runs.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_status(run_id: str, superlink: list[str]) -> tuple[str, str]:
    out = subprocess.run(
        ["flwr", "ls", *superlink, "--run-id", run_id, "--format", "json"], check=True, capture_output=True, text=True
    ).stdout
    run = json.loads(out)["runs"][0]
    return run["status"], run.get("status-details", "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="follow_run")
    p.add_argument("run_id")
    p.add_argument("--superlink", default=None, help="SuperLink connection name (as for flwr run)")
    args = p.parse_args(argv)
    superlink = [args.superlink] if args.superlink else []
    subprocess.run(["flwr", "log", args.run_id, *superlink], check=False)
    status, details = run_status(args.run_id, superlink)
    print(f"follow_run: run {args.run_id} {status}", file=sys.stderr)
    if status != "finished:completed":
        print(f"follow_run: {details[:4000]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
