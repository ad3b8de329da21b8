"""File formats of a run: atomic writes, strict JSON, packed raw + EMA weights, weight checkpoints.

Every file of a run is written atomically: a temporary file beside the target, flushed to disk,
then renamed over it. A crash (or a full disk) never leaves half a file, and a failed write removes
its temporary file and raises `RunWriteError` naming the target and the real cause.

JSON is strict: NaN and infinities are written as null (Python's json would write bare `NaN`,
which is not JSON). Checkpoints are torch files loaded with `weights_only=True` (no code runs).
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fl_ietagc.runs.faults import fault_point
from fl_ietagc.settings.config import ConfigError

CHECKPOINT_FORMAT = "fl-ietagc-checkpoint/1"
NET, EMA = "net.", "ema."


class BadFileError(ConfigError):
    """A file given to (or kept by) the tool is missing its content, corrupt, or not what it should be."""


class RunWriteError(OSError):
    """A run file could not be written; the previous version of the file is intact."""


def atomic_write_bytes(path: Path, writer, before_replace=None) -> None:
    """`writer(f)` into a temporary file beside `path`, fsync'ed, then renamed over `path`; `before_replace()`, if
    given, runs between the two (e.g. waits for another file that must be in place first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write-{path.parent.name}-{path.name}", 0)  # tests: killed with the new file not yet in place
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            error = RunWriteError(f"cannot write {path}: {e.strerror or e}")
            error.errno = e.errno
            raise error from e
        raise


def json_safe(obj):
    """`obj` with every non-finite float replaced by None (strict JSON has no NaN) and numpy scalars (a comparison's
    np.bool_, an np.int64 count, np.float32) as the Python values they hold."""
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj) -> None:
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_json(path: Path, what: str = "file"):
    """Parse a JSON file of a run; an unreadable or corrupt one raises ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFileError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from e


def pack_weights(net: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat dict {net.<name>, ema.<name>} so raw and EMA weights travel (and average) side by side."""
    return {**{NET + k: v for k, v in net.items()}, **{EMA + k: v for k, v in ema.items()}}


def unpack_weights(packed: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    net = {k[len(NET) :]: v for k, v in packed.items() if k.startswith(NET)}
    ema = {k[len(EMA) :]: v for k, v in packed.items() if k.startswith(EMA)}
    if not net or not ema or len(net) + len(ema) != len(packed):
        raise ValueError("packed weights must hold only 'net.*' and 'ema.*' entries, both non-empty")
    return net, ema


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def save_torch(path: Path, blob, before_replace=None) -> None:
    atomic_write_bytes(path, lambda f: torch.save(blob, f), before_replace)


class BackgroundWrite:
    """Run `write()` on a thread; `wait(timeout_s)` joins it, re-raising its error, or raises TimeoutError
    naming `what` when it has not finished within the bound."""

    def __init__(self, write: Callable[[], None], what: str):
        self.what = what
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"write {what}", daemon=True)
        self._thread.start()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as e:  # handed to the waiting thread
            self.error = e

    def wait(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"writing {self.what} did not finish within {timeout_s:g} s (disk stalled?)")
        if self.error is not None:
            raise self.error


def load_torch(path: str | Path, what: str, map_location="cpu"):
    """torch.load with weights_only=True; a missing, empty or corrupt file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        from fl_ietagc.settings.paths import described, kind

        found = kind(path)
        if found == "missing":
            raise FileNotFoundError(f"{what} not found: {path}")
        # (a pipe is named, never opened: opening it would wait for a writer)
        raise BadFileError(f"{path}: {described(found)}, not a {what} file")
    if path.stat().st_size == 0:
        raise BadFileError(f"{path}: empty file, not a {what}")
    try:
        with warnings.catch_warnings():
            # torch's weights-only unpickler warns about a file pickled with another protocol; the file is then
            # either read safely or refused below with one line naming it, so the warning would only add noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle that would run code
        raise BadFileError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def save_checkpoint(path: Path, net: dict, ema: dict, *, server_round: int, config: dict, **meta) -> None:
    save_torch(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "round": server_round,
            "config": config,
            "net": cpu_state(net),
            "ema": cpu_state(ema),
            **meta,
        },
    )


def load_checkpoint(path: str | Path) -> dict:
    blob = load_torch(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise BadFileError(f"{path} is not an fl-ietagc checkpoint (expected format {CHECKPOINT_FORMAT})")
    return blob
