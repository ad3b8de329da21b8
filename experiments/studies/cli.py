"""The paper's studies, one command each: runs, evaluation, one comparison table.

    fl-ietagc-study NAME --smoke [--out studies/]                    # 2-core CPU, minutes (tiny UNet, digits)
    fl-ietagc-study NAME --full --data-root /data/cifar [--fid-weights inception.pth] [--gpus-per-client 0.5]
    fl-ietagc-study NAME --full --dry-run                            # print the plan and its GPU estimate only

Studies (NAME):
  small-data      5 variants x 3 seeds on 32 digits, <= 30 min on 2 CPU cores: does IET-AGC copy less?
                  (experiments/studies/small_data.py; --set KEY=VALUE varies it, --workers N runs N at once)
  paper-cifar10   the paper's protocol (K=10, R=10, E=100, lambda=2): IET-AGC vs default training with the same
                  number of optimizer steps (and IET alone)
  paper-cifar100  the same on CIFAR-100
  paper-afhq-dog  the same on AFHQ-dog at 64x64 (ddpm-afhq64 preset, batch 60)
  ablations       IET alone, AGC alone, K in {2, 5, 10}, lambda in {1.5, 2, 3}, aggregation period
  strategies      the same clients under every aggregation strategy
  sd-finetune     a latent text-to-image model (Stable Diffusion layout) fine-tuned on image-caption pairs:
                  plain fine-tuning vs IET-AGC vs RET (experiments/studies/sd_finetune.py)
  finetune        a pretrained model fine-tuned with IET-AGC for a few rounds (--pretrained DIR; the smoke
                  size first trains its own small model to start from)

Every run goes through the real app: federated runs through `flower-simulation`'s entry point (Ray), the
default-training runs through centralized training. Each run is then evaluated (`fl-ietagc evaluate`) and
`comparison.md` / `comparison.json` are written to the study directory, relative to the study's first run.
Smoke sizes replace the dataset by the embedded digits and the preset by `tiny`, so they run anywhere; they test
the pipeline, not the paper's numbers. Before a study starts, its cost is printed: optimizer steps, FLOPs (from
PyTorch's FLOP counter on the actual UNet) and GPU hours at an assumed sustained throughput.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from experiments.studies.plans import STUDIES
from experiments.studies.runner import run_study
from experiments.studies.sd_finetune import run_sd_finetune
from fl_ietagc.settings.argcheck import refuse_repeated
from fl_ietagc.settings.config import ConfigError
from fl_ietagc.settings.paths import check_existing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fl-ietagc-study", description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=("small-data", "sd-finetune", *STUDIES))
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--smoke", action="store_true", help="tiny UNet on digits, minutes on a 2-core CPU")
    size.add_argument("--full", action="store_true", help="the paper's sizes (GPUs, real datasets)")
    p.add_argument("--out", default="studies", help="parent directory of the study directory")
    p.add_argument("--data-root", default="", help="dataset location for --full")
    p.add_argument("--fid-weights", default=None, help="Inception weights (FID); smoke runs skip FID without it")
    p.add_argument(
        "--gpus-per-client", type=float, default=None, help="--full: GPU share per client (Ray; default 0.5)"
    )
    p.add_argument(
        "--pretrained",
        default="",
        help="finetune: diffusers UNet directory / hub id / checkpoint; "
        "sd-finetune: a local Stable Diffusion checkpoint folder",
    )
    p.add_argument(
        "--data",
        default="",
        help="sd-finetune --full: image-caption pairs (a captioned folder or a .csv / .parquet of paths and captions)",
    )
    p.add_argument(
        "--sscd",
        default=None,
        help="sd-finetune: SSCD TorchScript file for the memorization score "
        "(else the latent-cosine fallback, named as such)",
    )
    p.add_argument("--clip-dir", default=None, help="sd-finetune: local CLIP folder for the CLIP score")
    p.add_argument("--eval-samples", type=int, default=None, help="override the evaluation's sample count")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    p.add_argument("--workers", type=int, default=None, help="small-data: runs trained at once (processes; default 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="small-data: change a study setting or run-config key (repeatable)",
    )
    refuse_repeated(p, argv, "fl-ietagc-study")
    a = p.parse_args(argv)
    if a.study == "small-data" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # SIGTERM stops a study as Ctrl-C does: one line, runs resumable
    try:
        return _run(a)
    except ConfigError as e:
        print(f"fl-ietagc-study: invalid input: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if a.study != "small-data":
            raise
        name = e.args[0] if e.args and e.args[0] in ("SIGINT", "SIGTERM") else "SIGINT"
        print(
            f"fl-ietagc-study: stopped by {name}: finished runs are kept; the same command resumes the others",
            file=sys.stderr,
        )
        return 128 + int(getattr(signal, name))


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


# the options each study reads (besides --smoke/--full and --out); any other given is refused, never ignored
STUDY_OPTIONS = {
    "small-data": ("workers", "set", "dry_run"),
    "sd-finetune": ("pretrained", "data", "sscd", "clip_dir", "gpus_per_client", "dry_run"),
}
COMMON_OPTIONS = ("data_root", "fid_weights", "gpus_per_client", "eval_samples", "dry_run")
OPTION_DEFAULTS = {"gpus_per_client": 0.5, "workers": 2}


def unused_options(a) -> list[str]:
    """The options given on the command line that study `a.study` at this size would not read."""
    reads = set(STUDY_OPTIONS.get(a.study, COMMON_OPTIONS))
    if a.study == "finetune":
        reads.add("pretrained")
    if a.smoke and a.study not in STUDY_OPTIONS:
        reads.discard("data_root")  # smoke runs: embedded digits (a GPU share stays harmless: CPU clients)
    given = [
        k
        for k in (
            "data_root",
            "fid_weights",
            "gpus_per_client",
            "pretrained",
            "data",
            "sscd",
            "clip_dir",
            "eval_samples",
            "dry_run",
            "workers",
            "set",
        )
        if getattr(a, k) is not None and getattr(a, k) is not False and getattr(a, k) not in ("", [])
    ]
    return ["--" + k.replace("_", "-") for k in given if k not in reads]


def _run(a) -> int:
    if a.set and a.study != "small-data":
        raise ConfigError("--set: only the small-data study takes settings")
    for option, value in (("--data", a.data), ("--sscd", a.sscd), ("--clip-dir", a.clip_dir)):
        if value and a.study != "sd-finetune":
            raise ConfigError(f"{option}: only the sd-finetune study takes it")
    unused = unused_options(a)
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: not read by the {a.study} study"
            f"{' at --smoke size' if a.smoke else ''}; drop {'it' if len(unused) == 1 else 'them'}"
        )
    for key, value in OPTION_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.gpus_per_client < 0 or a.gpus_per_client != a.gpus_per_client:
        raise ConfigError(f"--gpus-per-client = {a.gpus_per_client}: must be >= 0")
    if a.eval_samples is not None and a.eval_samples < 2:
        raise ConfigError(f"--eval-samples = {a.eval_samples}: must be >= 2")
    size = "smoke" if a.smoke else "full"
    if a.study == "small-data":
        from experiments.studies.small_data import run_small_data  # (its evaluation loads torch, diffusers)

        run_small_data(size, Path(a.out), workers=a.workers, settings=a.set, dry_run=a.dry_run)
        return 0
    if a.study == "sd-finetune":
        for option, value, kind in (("--sscd", a.sscd, "file"), ("--clip-dir", a.clip_dir, "directory")):
            if value is not None:  # read by the evaluation after training: checked now
                check_existing(option, value, (kind,))

        extra = (*(["--sscd", a.sscd] if a.sscd else []), *(["--clip-dir", a.clip_dir] if a.clip_dir else []))
        run_sd_finetune(
            size,
            Path(a.out),
            pretrained=a.pretrained,
            data=a.data,
            gpus_per_client=a.gpus_per_client,
            dry_run=a.dry_run,
            eval_args=extra,
        )
        return 0
    run_study(
        a.study,
        size,
        Path(a.out),
        data_root=a.data_root,
        fid_weights=a.fid_weights,
        gpus_per_client=a.gpus_per_client,
        pretrained=a.pretrained,
        eval_samples=a.eval_samples,
        dry_run=a.dry_run,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
