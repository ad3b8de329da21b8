"""`fl-ietagc`: the project's commands that need no Flower.

    fl-ietagc baseline [--config FILE.toml] [--run-config "k=v ..."] [--match-federated K] [--agc]
    fl-ietagc config                       # print every run-config key, default and meaning

Run-config values use the same names and syntax as the Flower app (`flwr run -c`); `baseline`
turns AGC off unless `--agc` is given (the "AGC alone" ablation).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tomllib

from .config import ConfigError, RunConfig, config_keys, parse_config


def parse_overrides(text: str | None) -> dict:
    """'k=v k2="s"' -> {k: v, k2: "s"}, values read as TOML (bare words fall back to strings)."""
    out = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"run-config item {item!r}: expected key=value")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def load_run_config(config_file: str | None, overrides: str | None, **forced) -> RunConfig:
    raw = {}
    if config_file:
        with open(config_file, "rb") as f:
            raw.update(tomllib.load(f))
    raw.update(forced)
    raw.update(parse_overrides(overrides))
    return parse_config(raw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fl-ietagc")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("baseline", help="centralized default training (one model, all data, no AGC)")
    b.add_argument("--config", help="TOML file of run-config keys")
    b.add_argument("--run-config", help='"key=value ..." overrides')
    b.add_argument("--match-federated", type=int, default=0, metavar="K",
                   help="train exactly as many steps as a K-client federated run of this config")
    b.add_argument("--agc", action="store_true", help="keep AGC on (the 'AGC alone' ablation)")
    sub.add_parser("config", help="list the run-config keys")
    args = p.parse_args(argv)
    try:
        if args.command == "config":
            for f in config_keys():
                print(f"{f.metadata['key']:18s} {f.default!r:12}  {f.metadata['help']}")
            return 0
        if args.command == "baseline":
            from .baseline import run_baseline

            forced = {} if args.agc else {"agc": False}
            cfg = load_run_config(args.config, args.run_config, **forced)
            if not args.agc and cfg.agc:
                raise ConfigError("agc = true: use --agc for a centralized run with AGC")
            run = run_baseline(cfg, match_federated=args.match_federated)
            print(f"baseline done: {run.path}")
            return 0
    except ConfigError as e:
        print(f"fl-ietagc: invalid run config: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
