"""The shell launchers' arguments, checked by the same strict parser as the Python entry points.

    python -m fl_ietagc.settings.script_args [--script NAME] [--fixed "k=v ..."] -- FLWR_RUN_ARGS...

Checks the arguments that scripts/deploy-local.sh and scripts/flwr-run.sh pass on to `flwr run`, before anything
starts (Flower's own -c parser drops what it cannot read, silently):
- every `-c` / `--run-config` value (also `-c=...`) strictly (config.load_overrides: 'k = v' or 'lr=' refused),
  a key given in two of them refused, and the fused keys validated (parse_config);
- keys the script sets itself (`--fixed`, e.g. num-clients = K) may only be repeated, not contradicted;
- `--federation-config` "client-resources-num-gpus=G": not more GPUs per client than this machine has (Ray
  would wait for ever for them: `ActorPool is empty` after the SuperLink started), and num-cpus likewise.
Exit 0 when everything is valid; else one line "NAME: invalid input: ..." on stderr and exit 2.
"""

from __future__ import annotations

import os
import sys

from fl_ietagc.settings.config import ConfigError, load_overrides, parse_config, parse_overrides

RUN_CONFIG = ("-c", "--run-config")
FEDERATION_CONFIG = "--federation-config"


def _values(args: list[str], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(option, value) of every occurrence of an option in `names`, as `-c V` or `-c=V`."""
    found, i = [], 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a in names:
            if i + 1 >= len(args):
                raise ConfigError(f"{a}: needs a value")
            found.append((a, args[i + 1]))
            i += 2
            continue
        if eq and name in names:
            found.append((name, value))
        i += 1
    return found


def check_run_configs(args: list[str], fixed: dict) -> dict:
    """The fused run config of every -c in `args` over the script's `fixed` keys; ConfigError names the culprit."""
    fused: dict = {}
    given_in: dict[str, str] = {}
    for option, text in _values(args, RUN_CONFIG):
        if not text.strip():
            raise ConfigError(f"{option} '': empty; give 'key=value ...' or a .toml file")
        items = load_overrides(text)
        for key, value in items.items():
            if key in given_in:
                raise ConfigError(f"{option} {text!r}: {key} is also given in {given_in[key]!r}; give each key once")
            if key in fixed and fixed[key] != value:
                raise ConfigError(
                    f"{option} {text!r}: {key} = {value!r} contradicts the script's {key} = "
                    f"{fixed[key]!r} (set it through the script's own setting)"
                )
            given_in[key] = text
        fused.update(items)
    parse_config({**fixed, **fused})
    return fused


def check_federation_config(args: list[str]) -> None:
    """client-resources-num-gpus / -num-cpus of --federation-config against what this machine has."""
    for option, text in _values(args, (FEDERATION_CONFIG,)):
        items = parse_overrides(text)
        for key, have_what in (("client-resources-num-gpus", "GPU"), ("client-resources-num-cpus", "CPU")):
            if key not in items:
                continue
            value = items[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ConfigError(f"{option} {key} = {value!r}: must be a number >= 0")
            if have_what == "GPU":
                if value == 0:
                    continue
                import torch  # (seconds: only when GPUs are asked for)

                have = torch.cuda.device_count()
            else:
                have = os.cpu_count() or 1
            if value > have:
                raise ConfigError(
                    f"{option} {key} = {value!r}: this machine has {have} {have_what}(s); a client "
                    f"could never be scheduled (must be <= {have})"
                )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script, fixed_text = "flwr run", ""
    while argv and argv[0] in ("--script", "--fixed"):
        if len(argv) < 2:
            print(f"script_args: {argv[0]} needs a value", file=sys.stderr)
            return 2
        if argv[0] == "--script":
            script = argv[1]
        else:
            fixed_text = argv[1]
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        check_run_configs(argv, parse_overrides(fixed_text))
        check_federation_config(argv)
    except ConfigError as e:
        print(f"{script}: invalid input: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
