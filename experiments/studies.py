"""The paper's studies, one command each: runs, evaluation, one comparison table.

    fl-ietagc-study NAME --smoke [--out studies/]                    # 2-core CPU, minutes (tiny UNet, digits)
    fl-ietagc-study NAME --full --data-root /data/cifar [--fid-weights inception.pth] [--gpus-per-client 0.5]
    fl-ietagc-study NAME --full --dry-run                            # print the plan and its GPU estimate only

Studies (NAME):
  small-data      5 variants x 3 seeds on 32 digits, <= 30 min on 2 CPU cores: does IET-AGC copy less?
                  (experiments/small_data.py; --set KEY=VALUE varies it, --workers N runs N at once)
  paper-cifar10   the paper's protocol (K=10, R=10, E=100, lambda=2): IET-AGC vs default training with the same
                  number of optimizer steps (and IET alone)
  paper-cifar100  the same on CIFAR-100
  paper-afhq-dog  the same on AFHQ-dog at 64x64 (ddpm-afhq64 preset, batch 60)
  ablations       IET alone, AGC alone, K in {2, 5, 10}, lambda in {1.5, 2, 3}, aggregation period
  strategies      the same clients under every aggregation strategy
  sd-finetune     a latent text-to-image model (Stable Diffusion layout) fine-tuned on image-caption pairs:
                  plain fine-tuning vs IET-AGC vs RET (experiments/sd_finetune.py)
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ASSUMED_TFLOPS = 50.0  # sustained fp32/TF32 UNet training per H100-class GPU; an assumption, not a measurement
FULL_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "afhq-dog": 4_739}
PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "paper-cifar10.toml"  # the one copy of the protocol


def paper_config() -> dict:
    """The paper's CIFAR-10 protocol, read from experiments/configs/paper-cifar10.toml (strictly: an unknown or
    invalid key there fails here, naming the file)."""
    from fl_ietagc.config import load_config_file, parse_config

    raw = load_config_file(str(PAPER_CONFIG))
    parse_config(raw)
    return raw


SMOKE = {"dataset": "digits", "preset": "tiny", "max-images": 240, "batch-size": 24, "num-server-rounds": 2,
         "local-epochs": 1, "warmup-steps": 4, "diffusion-steps": 100, "sample-count": 16, "sample-steps": 10}


@dataclass
class RunSpec:
    name: str
    clients: int  # K; 0 = centralized training (default training, or AGC alone with centralized_agc)
    overrides: dict = field(default_factory=dict)
    match_federated: int = 0  # centralized: as many steps as a K-client federated run of the same config
    centralized_agc: bool = False  # centralized with AGC ("AGC alone")


def base_config(study: str, size: str) -> dict:
    if size == "smoke":
        return dict(SMOKE)
    if study == "paper-cifar100":
        return {**paper_config(), "dataset": "cifar100"}
    if study == "paper-afhq-dog":
        return {**paper_config(), "dataset": "afhq-dog", "preset": "ddpm-afhq64", "batch-size": 60}
    return paper_config()


def plan(study: str, size: str) -> list[RunSpec]:
    smoke = size == "smoke"
    k = 2 if smoke else 10
    if study in ("paper-cifar10", "paper-cifar100", "paper-afhq-dog"):
        return [RunSpec("default-training", 0, {"agc": False}, match_federated=k),
                RunSpec("iet", k, {"agc": False}), RunSpec("iet-agc", k)]
    if study == "ablations":
        ks = (2, 3) if smoke else (2, 5, 10)
        lams = (1.5, 3.0) if smoke else (1.5, 2.0, 3.0)
        epochs = base_config(study, size)["local-epochs"] * base_config(study, size)["num-server-rounds"]
        periods = (1, 2) if smoke else (25, 50, 100, 200)  # local epochs between averagings, same total epochs
        runs = [RunSpec("iet-agc", k), RunSpec("iet-alone", k, {"agc": False}),
                RunSpec("agc-alone", 0, {}, match_federated=k, centralized_agc=True)]
        runs += [RunSpec(f"k{kk}", kk) for kk in ks if kk != k]
        runs += [RunSpec(f"lambda{lam:g}", k, {"agc-lambda": lam}) for lam in lams if lam != 2.0]
        runs += [RunSpec(f"period{p}", k, {"local-epochs": p, "num-server-rounds": max(1, epochs // p)})
                 for p in periods if p != base_config(study, size)["local-epochs"]]
        return runs
    if study == "strategies":
        from fl_ietagc.config import STRATEGIES

        k = max(k, 3)  # Krum and Bulyan (f = 0) need K >= 3: every strategy gets the same 3 clients at smoke size
        return [RunSpec(name, k, {"strategy": name}) for name in ["iet", *sorted(set(STRATEGIES) - {"iet"})]]
    if study == "finetune":
        rounds = 2 if smoke else 3
        return [RunSpec("pretrained-then-iet-agc", k, {"num-server-rounds": rounds,
                                                       "local-epochs": 1 if smoke else 10})]
    raise SystemExit(f"unknown study {study!r}; one of: {', '.join(STUDIES)}")


STUDIES = ("paper-cifar10", "paper-cifar100", "paper-afhq-dog", "ablations", "strategies", "finetune")


def forward_gflops(preset: str, image_size: int, channels: int) -> float:
    """GFLOP of one forward pass of one image, counted by torch.utils.flop_counter on the real UNet."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fl_ietagc.models import build_unet

    model = build_unet(preset, image_size, channels).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, channels, image_size, image_size), torch.tensor([1]))
    return counter.get_total_flops() / 1e9


def estimate(study: str, size: str, runs: list[RunSpec], eval_samples: int, eval_steps: int) -> dict:
    """Optimizer steps, FLOPs and GPU hours of a study (training at 3x forward FLOPs per image)."""
    from fl_ietagc.config import parse_config
    from fl_ietagc.data import DEFAULT_IMAGE_SIZE, load_splits

    base = base_config(study, size)
    cfg = parse_config(base if size == "smoke" else {**base, "data-root": "/not/read/for/an/estimate"})
    img = cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset]
    n_train = len(load_splits(cfg).train) if size == "smoke" else FULL_TRAIN_SIZES[cfg.dataset]
    channels = 1 if cfg.dataset in ("digits", "fashion-mnist") else 3
    fwd = forward_gflops(cfg.preset, img, channels) * 1e9
    rows, total = [], 0.0
    for r in runs:
        c = {**base, **r.overrides}
        k = r.clients or r.match_federated or 1
        steps = c["num-server-rounds"] * c["local-epochs"] * k * ((n_train // k) // c["batch-size"])
        flops = steps * c["batch-size"] * 3 * fwd + eval_samples * eval_steps * fwd
        rows.append({"run": r.name, "optimizer_steps": steps, "pflop": flops / 1e15})
        total += flops
    return {"rows": rows, "total_pflop": total / 1e15, "gpu_hours": total / (ASSUMED_TFLOPS * 1e12) / 3600,
            "assumed_tflops": ASSUMED_TFLOPS, "forward_gflop_per_image": fwd / 1e9}


def print_estimate(est: dict) -> None:
    print(f"{'run':28s} {'optimizer steps':>16s} {'PFLOP':>10s}")
    for row in est["rows"]:
        print(f"{row['run']:28s} {row['optimizer_steps']:16,d} {row['pflop']:10.2f}")
    print(f"total {est['total_pflop']:.1f} PFLOP ~ {est['gpu_hours']:.1f} GPU hours at an assumed "
          f"{est['assumed_tflops']:.0f} TFLOP/s sustained (forward {est['forward_gflop_per_image']:.2f} GFLOP/image; "
          f"an estimate, not a measurement)", flush=True)


def run_study(study: str, size: str, out: Path, *, data_root: str = "", fid_weights: str | None = None,
              gpus_per_client: float = 0.5, pretrained: str = "", eval_samples: int | None = None,
              dry_run: bool = False) -> Path | None:
    from fl_ietagc.compare import compare, to_markdown, write_comparison
    from fl_ietagc.evaluate import EvalOptions, evaluate_run

    smoke = size == "smoke"
    runs = plan(study, size)
    eval_samples = eval_samples or (48 if smoke else 65_536)
    eval_steps = 10 if smoke else 50
    print(f"study {study} ({size}): {len(runs)} runs: {', '.join(r.name for r in runs)}")
    print_estimate(estimate(study, size, runs, eval_samples, eval_steps))
    if dry_run:
        return None
    study_dir = out / f"{study}-{size}"
    base = base_config(study, size)
    if data_root and not smoke:
        base["data-root"] = data_root
    own_pretrained = study == "finetune" and smoke and not pretrained  # trained here, after every check
    if study == "finetune" and not smoke and not pretrained:
        from fl_ietagc.config import ConfigError

        raise ConfigError("--pretrained: finetune --full needs a diffusers UNet directory or a checkpoint")
    if study == "finetune" and pretrained:
        base["init-checkpoint"] = pretrained
    backend = {"client_resources": {"num_cpus": 1}} if smoke else \
        {"client_resources": {"num_cpus": 2, "num_gpus": gpus_per_client}}
    # every check before the study directory exists: refused input leaves nothing behind
    validate_study(runs, study_dir, base, backend)
    if own_pretrained:
        validate_study([RunSpec("pretrained", 0, {"sample-count": 0})], study_dir, base, {})
    if fid_weights:
        from fl_ietagc.config import ConfigError
        from fl_ietagc.inception_quality import InceptionWeightsError, preflight_weights

        try:
            preflight_weights(fid_weights)
        except InceptionWeightsError as e:
            raise ConfigError(str(e)) from e
    study_dir.mkdir(parents=True, exist_ok=True)
    if own_pretrained:
        base["init-checkpoint"] = str(_smoke_pretrained(study_dir, base))
    for r in runs:
        if (study_dir / r.name / "results.json").is_file():
            print(f"[{r.name}] already evaluated, kept")
            continue
        t0 = time.time()
        train_run(r, study_dir, base, backend, smoke)
        evaluate_run(study_dir / r.name, EvalOptions(num_samples=eval_samples, steps=eval_steps,
                                                     fid=fid_weights is not None or not smoke,
                                                     fid_weights=fid_weights, loss_images=16 if smoke else 64),
                     progress=not smoke)
        print(f"[{r.name}] trained and evaluated in {time.time() - t0:.0f}s", flush=True)
    table = compare([str(study_dir / r.name) for r in runs])
    if smoke:  # in the table and in every figure: smoke numbers are a pipeline check, not a finding
        from .pipeline_check import NOTE, label_figures

        table["note"] = NOTE
        label_figures(study_dir)
    path = write_comparison(table, study_dir)
    print(to_markdown(table))
    print(f"comparison: {path}")
    return path


def validate_study(runs: list[RunSpec], study_dir: Path, base: dict, backend: dict) -> None:
    """Every run's config, data and resources, before the first run trains (ConfigError naming the run)."""
    from fl_ietagc.config import ConfigError, parse_config
    from fl_ietagc.validate import validate_run

    warnings: dict[str, None] = {}  # one line per ineffective key, however many runs set it
    for r in runs:
        if (study_dir / r.name / "results.json").is_file():
            continue  # evaluated before: kept as it is
        exists = (study_dir / r.name / "config.json").is_file()  # kept or resumed, not created
        conf = {**base, **r.overrides, "output-dir": str(study_dir), "run-name": "" if exists else r.name}
        try:
            cfg = parse_config({**conf, "agc": r.centralized_agc} if not r.clients else conf)
            validate_run(cfg, r.clients or r.match_federated, backend if r.clients else None, warn=False)
        except ConfigError as e:
            raise ConfigError(f"[{r.name}] {e}") from e
        from fl_ietagc.config import ineffective_keys

        warnings.update(dict.fromkeys(ineffective_keys(cfg)))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)


def train_run(r: RunSpec, study_dir: Path, base: dict, backend: dict, smoke: bool) -> None:
    """Train one run of a study: skipped when it completed before, resumed when it was killed, failed or
    interrupted, started otherwise."""
    from fl_ietagc.centralized import run_centralized
    from fl_ietagc.config import parse_config
    from fl_ietagc.rundir import RunDir

    from . import simulate

    run = RunDir(study_dir / r.name)
    state = run.liveness() if run.config_path.is_file() else "new"
    if state == "completed":
        print(f"[{r.name}] already trained, kept")
        return
    if state == "running":
        raise SystemExit(f"[{r.name}] {run.path} is being written by another process")
    resume = state in ("failed", "interrupted", "stale")
    if resume:
        print(f"[{r.name}] {state} at round {run.read_status().get('round')}: resuming")
    conf = {**base, **r.overrides, "output-dir": str(study_dir), "run-name": r.name}
    if r.clients:
        code = (simulate.launch(backend=backend, resume=str(run.path)) if resume else
                simulate.launch(conf, r.clients, backend))
        if code:
            raise SystemExit(f"[{r.name}] federated run failed (exit {code}); run the study again to resume it")
    else:
        run_centralized(parse_config({**conf, "agc": r.centralized_agc}), match_federated=r.match_federated,
                     progress=not smoke, resume=str(run.path) if resume else None)


def _smoke_pretrained(study_dir: Path, base: dict) -> Path:
    """The smoke finetune starts from a small centralized model trained here (no download needed)."""
    train_run(RunSpec("pretrained", 0, {"sample-count": 0}), study_dir, base, {}, smoke=True)
    return study_dir / "pretrained" / "checkpoints" / "final.pt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fl-ietagc-study", description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=("small-data", "sd-finetune", *STUDIES))
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--smoke", action="store_true", help="tiny UNet on digits, minutes on a 2-core CPU")
    size.add_argument("--full", action="store_true", help="the paper's sizes (GPUs, real datasets)")
    p.add_argument("--out", default="studies", help="parent directory of the study directory")
    p.add_argument("--data-root", default="", help="dataset location for --full")
    p.add_argument("--fid-weights", default=None, help="Inception weights (FID); smoke runs skip FID without it")
    p.add_argument("--gpus-per-client", type=float, default=None, help="--full: GPU share per client (Ray; "
                                                                       "default 0.5)")
    p.add_argument("--pretrained", default="", help="finetune: diffusers UNet directory / hub id / checkpoint; "
                                                    "sd-finetune: a local Stable Diffusion checkpoint folder")
    p.add_argument("--data", default="", help="sd-finetune --full: image-caption pairs (a captioned folder or a "
                                              ".csv / .parquet of paths and captions)")
    p.add_argument("--sscd", default=None, help="sd-finetune: SSCD TorchScript file for the memorization score "
                                                "(else the latent-cosine fallback, named as such)")
    p.add_argument("--clip-dir", default=None, help="sd-finetune: local CLIP folder for the CLIP score")
    p.add_argument("--eval-samples", type=int, default=None, help="override the evaluation's sample count")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    p.add_argument("--workers", type=int, default=None, help="small-data: runs trained at once (processes; "
                                                             "default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="small-data: change a study setting or run-config key (repeatable)")
    from fl_ietagc.argcheck import refuse_repeated

    refuse_repeated(p, argv, "fl-ietagc-study")
    a = p.parse_args(argv)
    from fl_ietagc.config import ConfigError

    try:
        return _run(a)
    except ConfigError as e:
        print(f"fl-ietagc-study: invalid input: {e}", file=sys.stderr)
        return 2


# the options each study reads (besides --smoke/--full and --out); any other given is refused, never ignored
STUDY_OPTIONS = {"small-data": ("workers", "set", "dry_run"),
                 "sd-finetune": ("pretrained", "data", "sscd", "clip_dir", "gpus_per_client", "dry_run")}
COMMON_OPTIONS = ("data_root", "fid_weights", "gpus_per_client", "eval_samples", "dry_run")
OPTION_DEFAULTS = {"gpus_per_client": 0.5, "workers": 2}


def unused_options(a) -> list[str]:
    """The options given on the command line that study `a.study` at this size would not read."""
    reads = set(STUDY_OPTIONS.get(a.study, COMMON_OPTIONS))
    if a.study == "finetune":
        reads.add("pretrained")
    if a.smoke and a.study not in STUDY_OPTIONS:
        reads.discard("data_root")  # smoke runs: embedded digits (a GPU share stays harmless: CPU clients)
    given = [k for k in ("data_root", "fid_weights", "gpus_per_client", "pretrained", "data", "sscd", "clip_dir",
                         "eval_samples", "dry_run", "workers", "set")
             if getattr(a, k) is not None and getattr(a, k) is not False and getattr(a, k) not in ("", [])]
    return ["--" + k.replace("_", "-") for k in given if k not in reads]


def _run(a) -> int:
    from fl_ietagc.config import ConfigError

    if a.set and a.study != "small-data":
        raise ConfigError("--set: only the small-data study takes settings")
    for option, value in (("--data", a.data), ("--sscd", a.sscd), ("--clip-dir", a.clip_dir)):
        if value and a.study != "sd-finetune":
            raise ConfigError(f"{option}: only the sd-finetune study takes it")
    unused = unused_options(a)
    if unused:
        raise ConfigError(f"{', '.join(unused)}: not read by the {a.study} study"
                          f"{' at --smoke size' if a.smoke else ''}; drop {'it' if len(unused) == 1 else 'them'}")
    for key, value in OPTION_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.gpus_per_client < 0 or a.gpus_per_client != a.gpus_per_client:
        raise ConfigError(f"--gpus-per-client = {a.gpus_per_client}: must be >= 0")
    if a.eval_samples is not None and a.eval_samples < 2:
        raise ConfigError(f"--eval-samples = {a.eval_samples}: must be >= 2")
    if a.study == "small-data":
        from .small_data import run_small_data

        run_small_data("smoke" if a.smoke else "full", Path(a.out), workers=a.workers, settings=a.set,
                       dry_run=a.dry_run)
        return 0
    if a.study == "sd-finetune":
        from fl_ietagc.paths import check_existing

        from .sd_finetune import run_sd_finetune

        for option, value, kind in (("--sscd", a.sscd, "file"), ("--clip-dir", a.clip_dir, "directory")):
            if value is not None:  # read by the evaluation after training: checked now
                check_existing(option, value, (kind,))

        extra = (*(["--sscd", a.sscd] if a.sscd else []), *(["--clip-dir", a.clip_dir] if a.clip_dir else []))
        run_sd_finetune("smoke" if a.smoke else "full", Path(a.out), pretrained=a.pretrained, data=a.data,
                        gpus_per_client=a.gpus_per_client, dry_run=a.dry_run, eval_args=extra)
        return 0
    run_study(a.study, "smoke" if a.smoke else "full", Path(a.out), data_root=a.data_root, fid_weights=a.fid_weights,
              gpus_per_client=a.gpus_per_client, pretrained=a.pretrained, eval_samples=a.eval_samples,
              dry_run=a.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
