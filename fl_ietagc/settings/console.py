"""Console behaviour shared by every command of ours."""

from __future__ import annotations

import os
import sys


def closed_stdout_is_quiet(command, *args) -> int:
    """Run a command that prints; when its reader stops early (`fl-ietagc metrics RUN | head`), end quietly with
    exit 141, as a command killed by SIGPIPE does, instead of a BrokenPipeError traceback (Python ignores SIGPIPE).
    stdout then points at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        code = command(*args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
