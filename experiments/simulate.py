"""`flower-simulation`: run a Flower app in the foreground with the Simulation Engine (Ray).

Flower 1.27 removed the `flower-simulation` command; this one takes its flags and runs the app
through Flower's public `flwr.simulation.run_simulation`:

    flower-simulation --app . --num-supernodes 4 \\
        --backend-config '{"client_resources": {"num_cpus": 1, "num_gpus": 0.25}}' \\
        --run-config 'num-server-rounds=5 agc-lambda=2.0'

`run_simulation` does not read the app's pyproject, so the `[tool.flwr.app.config]` defaults,
fused with `--run-config` (a "k=v ..." string or a .toml file) the way `flwr run` fuses them, are
given to the ServerApp and every ClientApp through a thin wrapper around each. The config is
validated before Ray starts. Unlike `flwr run --stream`, a failed run (a client raising, a server
error) ends this command with exit status 1 and the error printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

QUIET_FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flower-simulation", description=__doc__.split("\n\n")[0])
    p.add_argument("--app", default=".", help="app directory (with pyproject.toml); default: .")
    p.add_argument("--num-supernodes", type=int, required=True, help="number of SuperNodes = clients = shards (K)")
    p.add_argument("--backend-config", default="{}",
                   help='JSON, e.g. \'{"client_resources": {"num_cpus": 1, "num_gpus": 0.5}, "init_args": {}}\'')
    p.add_argument("--run-config", default=None, help='"key=value key2=value" or a .toml file')
    p.add_argument("--verbose", action="store_true", help="DEBUG logging")
    return p.parse_args(argv)


def parse_backend_config(text: str) -> dict:
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"flower-simulation: --backend-config is not valid JSON: {e}")
    if not isinstance(raw, dict):
        raise SystemExit("flower-simulation: --backend-config must be a JSON object")

    def norm(d):  # the old CLI accepted "client-resources" for "client_resources"
        return {k.replace("-", "_"): norm(v) if isinstance(v, dict) else v for k, v in d.items()}

    cfg = norm(raw)
    unknown = set(cfg) - {"client_resources", "init_args", "actor"}
    if unknown:
        raise SystemExit(f"flower-simulation: unknown --backend-config key(s) {sorted(unknown)}; "
                         f"allowed: client_resources, init_args, actor")
    return cfg


def load_app_config(app_dir: Path, run_config: str | None) -> tuple[dict, dict]:
    """(components, fused run config) of the app, as `flwr run` would build them."""
    from flwr.common.config import get_fused_config_from_dir, get_project_config, parse_config_args

    project = get_project_config(app_dir)
    components = project["tool"]["flwr"]["app"]["components"]
    overrides = parse_config_args([run_config]) if run_config else {}
    try:
        fused = get_fused_config_from_dir(app_dir, overrides)
    except ValueError as e:  # unknown key
        raise SystemExit(f"flower-simulation: --run-config: {e}")
    return components, dict(fused)


def load_object(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def with_run_config(server_app, client_app, run_config: dict):
    """New Server/ClientApp that call the app's own ones with `run_config` in the Context."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    def configured(ctx: Context) -> Context:
        return Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config, state=ctx.state,
                       run_config={**ctx.run_config, **run_config})

    client = ClientApp()

    def forward(msg, ctx):
        return client_app(msg, configured(ctx))

    for register in (client.train, client.evaluate, client.query):
        register()(forward)

    server = ServerApp()

    @server.main()
    def _main(grid, ctx):
        server_app(grid, configured(ctx))

    return server, client


def validate_before_start(run_config: dict, num_supernodes: int) -> None:
    """Fail fast, before Ray starts: bad keys, values, strategy, or data that cannot make K shards."""
    from fl_ietagc.config import parse_config
    from fl_ietagc.shards import shards_for_config
    from strategies.registry import check_strategy

    cfg = parse_config(run_config)
    check_strategy(cfg.strategy, cfg)
    if cfg.num_clients and cfg.num_clients != num_supernodes:
        raise SystemExit(f"flower-simulation: num-clients = {cfg.num_clients} but --num-supernodes = {num_supernodes}")
    shards_for_config(cfg, num_supernodes)


def warn_about_gpus(backend: dict) -> None:
    try:
        import torch
    except ImportError:
        return
    gpus = float(backend.get("client_resources", {}).get("num_gpus", 0.0))
    if torch.cuda.is_available() and gpus == 0:
        print("flower-simulation: CUDA GPUs are visible but client_resources.num_gpus = 0, so Ray hides them "
              "from the clients, which will train on CPU. Give each client a share, e.g. "
              '\'{"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}\'.', file=sys.stderr)


def main(argv=None) -> int:
    for k, v in QUIET_FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    args = parse_args(argv)
    app_dir = Path(args.app).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise SystemExit(f"flower-simulation: --app {args.app}: no pyproject.toml there")
    if args.num_supernodes < 1:
        raise SystemExit("flower-simulation: --num-supernodes must be >= 1")
    sys.path.insert(0, str(app_dir))
    backend = parse_backend_config(args.backend_config)
    components, run_config = load_app_config(app_dir, args.run_config)

    from fl_ietagc.config import ConfigError

    try:
        validate_before_start(run_config, args.num_supernodes)
    except ConfigError as e:
        print(f"flower-simulation: invalid run config: {e}", file=sys.stderr)
        return 2
    warn_about_gpus(backend)

    from flwr.simulation import run_simulation

    server, client = with_run_config(load_object(components["serverapp"]), load_object(components["clientapp"]),
                                     run_config)
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=args.num_supernodes,
                       backend_config=backend, verbose_logging=args.verbose)
    except Exception as e:  # the ServerApp's exception, re-raised by Flower
        print(f"flower-simulation: run FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
