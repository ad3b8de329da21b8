"""A run's per-round metrics for other tools: JSON lines, or TensorBoard event files.

    fl-ietagc metrics RUN_DIR                      # one JSON object per round on stdout (| jq, | pandas.read_json)
    fl-ietagc metrics RUN_DIR --tensorboard DIR    # scalars per round; then: tensorboard --logdir DIR

The source is the run's `metrics.json` (committed round by round), so both work during a run as well as after it;
run the command again to bring the event files up to date (the event file of a run is rewritten, not appended).
Scalars: every numeric field of a round record, and per-client lists as `<field>/client-P`. TensorBoard is an
optional extra (`pip install fl-ietagc[tensorboard]`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from fl_ietagc.runs.rundir import RunDir


def round_scalars(record: dict) -> dict[str, float]:
    """The numeric fields of one round record (bools excluded), per-client lists expanded."""
    out = {}
    for key, value in record.items():
        if key == "round":
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            out.update({f"{key}/client-{p}": float(v) for p, v in enumerate(value)})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def write_tensorboard(run: RunDir, log_dir: Path) -> int:
    """Event files for `run` under log_dir/<run name>; returns the number of rounds written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError(
            f"--tensorboard needs the tensorboard package: pip install 'fl-ietagc[tensorboard]' ({e})"
        ) from None
    target = Path(log_dir) / run.path.name
    shutil.rmtree(target, ignore_errors=True)
    metrics = run.read_metrics()
    with SummaryWriter(log_dir=str(target)) as writer:
        for record in metrics:
            for tag, value in round_scalars(record).items():
                writer.add_scalar(tag, value, global_step=int(record["round"]))
    return len(metrics)


def metrics_main(run_dir: str, tensorboard: str | None) -> int:
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        print(f"fl-ietagc metrics: {run.path} is not a run directory (no config.json)", file=sys.stderr)
        return 2
    try:
        metrics = run.read_metrics()
        if tensorboard:
            n = write_tensorboard(run, Path(tensorboard))
            print(f"{n} rounds -> {Path(tensorboard) / run.path.name} (tensorboard --logdir {tensorboard})")
            return 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"fl-ietagc metrics: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for record in metrics:
        print(json.dumps(record, allow_nan=False))
    return 0
