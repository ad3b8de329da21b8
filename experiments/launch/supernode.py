"""`flower-supernode`, unchanged but for how long it sleeps between looks for work.

Why this exists (Flower 1.41, read in its source): the SuperNode's loop (supernode/start_client_internal.py,
`start_client_internal`) asks the SuperLink for a message and, when there is none, sleeps a fixed 3 s; while its
ClientApp works it looks for the reply every 0.5 s (`_push_messages`). In a federated round the server's next
instruction comes a fraction of a second after a SuperNode's reply, just after that SuperNode found nothing and
went to sleep, so every round waited ~2.5-3 s for nothing; no flag or environment variable sets these intervals.

This runs Flower's own `flower-supernode` (same arguments, same code) with those sleeps, in that one module only,
capped at `--poll-interval` seconds (default 0.5 s: a SuperNode then asks the SuperLink about twice a second while
idle; raise it for hundreds of SuperNodes on one SuperLink). It checks that the module still has the shape it
was written against; with another Flower it says so in one line and runs Flower's SuperNode as it is.

    python -m experiments.launch.supernode [--poll-interval S] <flower-supernode arguments>
"""

from __future__ import annotations

import importlib
import sys
import time
import types

DEFAULT_POLL_S = 0.5
PATCHED_MODULE = "flwr.supernode.start_client_internal"


def split_args(argv: list[str]) -> tuple[float, list[str]]:
    """(--poll-interval, the rest for flower-supernode); a bad value exits 2 naming the option."""
    poll, rest, i = DEFAULT_POLL_S, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--poll-interval" or arg.startswith("--poll-interval="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                poll = float(value)
            except ValueError:
                poll = -1.0
            if not 0.01 <= poll <= 3.0:
                sys.exit(f"supernode: --poll-interval {value!r}: must be a number of seconds in [0.01, 3]")
            continue
        rest.append(arg)
        i += 1
    return poll, rest


def cap_sleeps(poll_s: float) -> bool:
    """Give Flower's SuperNode loop a `time` whose sleep lasts at most `poll_s`; False if the module is not the
    one this was written for (then nothing is changed)."""
    import flwr

    module = importlib.import_module(PATCHED_MODULE)
    if not flwr.__version__.startswith("1.41.") or getattr(module, "time", None) is not time:
        print(
            f"supernode: Flower {flwr.__version__}: {PATCHED_MODULE} is not the 1.41 loop this shortens; "
            f"running flower-supernode with its own poll intervals",
            file=sys.stderr,
            flush=True,
        )
        return False
    capped = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    capped.sleep = lambda seconds: time.sleep(min(seconds, poll_s))
    module.time = capped
    return True


def main(argv: list[str] | None = None) -> None:
    poll_s, rest = split_args(list(sys.argv[1:] if argv is None else argv))
    cap_sleeps(poll_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
