"""The small-data memorization study: on a training set small enough to memorize on a CPU, does IET-AGC (and
AGC alone, IET alone, RET) copy fewer training images than default training at the same number of steps?

    fl-ietagc-study small-data --full  [--out studies/] [--workers 2]    # <= 30 min on 2 CPU cores
    fl-ietagc-study small-data --smoke                                   # the tests' size, about a minute
    fl-ietagc-study small-data --full --set train-images=64 --set agc-lambda=3   # a variation (own directory)
    fl-ietagc-study small-data --full --set size=horizon    # until default training levels off (issue 23)
    fl-ietagc-study small-data --full --set size=fashion16  # Fashion-MNIST at 16x16 (calibrated, one seed)
    fl-ietagc-study small-data --full --set sweep=all       # K, lambda, local epochs, RET (sweep.py)
    fl-ietagc-study small-data --full --set size=gpu-fashion32 --workers 1   # one H100, ~8 min, unmeasured

Five variants x seeds; every run trains through the project's core (`run_centralized` for the centralized runs,
`run_iet_loop` for the federated ones: the Flower-free loop that the tests prove bit-identical to the Flower app,
RET included, chosen here because 15 Ray starts would eat a third of a CPU budget). Every run writes an ordinary
run directory (resumable; a killed study continues where it stopped), then every round's checkpoint is sampled
(DDIM, raw weights) and matched against the training set by one exact nearest-neighbour pass; samples, neighbour
indices and squared distances are saved per round (`eval/round_RRRR.npz`), so every rate can be recomputed.

Reported per variant, at the last round, with hierarchical bootstrap 95% intervals (seeds, then samples):
the 1/3 rule (l2 1st / 2nd < 1/3) and Carlini's rule (l2 1st < 0.5 x mean l2 of the k nearest) as the primary
copy measures, MQ at tau = 0.2 and 0.3 (k = min(50, training images): with a training set this small, k covers
most of it, so MQ says little: reported, not relied on), each next to the null rate of held-out real images; and
an offline quality score (fl_ietagc/evaluation/classifier_quality.py: CFD and precision/recall in a small digit classifier's
features, never called FID) next to the same score of real held-out images and of the untrained model.
Figures: copy rate vs optimizer steps per variant (every round), and the most similar generated/training pairs of
default training next to IET-AGC's. The horizon (steps to 10% / 25% copies, the copy rate at equal steps, the
quality at equal copy rate, where default training levelled off) and the mechanism (each client's own model before
averaging) are written to horizon.md by horizon_report.py, from the arithmetic of horizon.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_ietagc.evaluation.evaluate import load_samples, save_samples
from fl_ietagc.settings.config import ConfigError

RET_ONLY = ("ret-", "taa")  # --set keys of RET's rules apply to the ret variant only
RULES = ("one_third", "carlini", "mq_0.2", "mq_0.3")
RULE_NAMES = {"one_third": "1/3 rule", "carlini": "Carlini", "mq_0.2": "MQ tau=0.2", "mq_0.3": "MQ tau=0.3"}
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Size:
    """The study's scale; `--set name=value` changes any field (dashes for underscores)."""

    train_images: int
    image_size: int
    clients: int  # K of the federated variants
    batch_size: int
    rounds: int
    local_epochs: int  # per round, of each federated client; centralized runs take the same total steps
    seeds: tuple[int, ...]
    samples: int  # generated images at the last round
    round_samples: int  # generated images at every earlier round (copy rate vs steps)
    sample_steps: int  # DDIM steps
    diffusion_steps: int
    lr: float
    agc_lambda: float
    ret_fraction: float
    variants: tuple[str, ...] = ("default", "agc", "iet", "iet-agc", "ret")  # a subset with --set variants=a,b
    dataset: str = "digits"
    preset: str = "tiny"  # the UNet (fl_ietagc/training/models.py PRESETS)
    device: str = "cpu"
    data_root: str = ""
    quality_images: int = 0  # the quality classifier's training split and reference, capped (0 = all of it)
    # the horizon (experiments/studies/horizon.py): a step budget, and training until default training levels off
    max_steps: int = 0  # > 0: rounds = ceil(max-steps / optimizer steps per round) (0: `rounds` decides)
    until_plateau: int = 0  # 1: default training first, to the budget; the others to the round it levelled off
    plateau_window: int = 3  # rounds over which the rise is measured (plateau_tolerance)
    plateau_floor: float = 0.25  # a curve below this has not started copying: not levelled off
    plateau_tolerance: float = 0.05  # levelled off: the rise over the window is within +-this (95% interval)
    client_samples: int = 0  # the mechanism: samples of each client's own model per round (0 = off)
    sweep: str = ""  # what moves the effect (experiments/studies/sweep.py): k,lambda,epochs,ret or all
    sweep_seeds: int = 1  # seeds per sweep point: the first N of `seeds`
    speed: tuple = ()  # run-config (key, value) pairs of the size (bf16, compile, ...); not a --set setting

    def run_config(self, seed: int) -> dict:
        return {
            "dataset": self.dataset,
            "preset": self.preset,
            "image-size": self.image_size,
            "max-images": self.train_images,
            "batch-size": self.batch_size,
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "warmup-steps": 20,
            "hflip": "off",
            "diffusion-steps": self.diffusion_steps,
            "agc-lambda": self.agc_lambda,
            "seed": seed,
            "device": self.device,
            "sample-count": 0,
            "checkpoint-every": 1,
            **({"data-root": self.data_root} if self.data_root else {}),
            **dict(self.speed),
        }


FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (apt-get install it)


# calibrated on 2 CPU cores (docs/small-data-calibration.md): 32 digits at 8x8, 4,000 optimizer steps per run
FULL = Size(
    train_images=32,
    image_size=8,
    clients=2,
    batch_size=16,
    rounds=10,
    local_epochs=200,
    seeds=(0, 1, 2),
    samples=256,
    round_samples=64,
    sample_steps=50,
    diffusion_steps=1000,
    lr=1e-3,
    agc_lambda=2.0,
    ret_fraction=0.25,
)
SMOKE = Size(
    train_images=16,
    image_size=8,
    clients=2,
    batch_size=8,
    rounds=2,
    local_epochs=2,
    seeds=(0, 1),
    samples=16,
    round_samples=8,
    sample_steps=5,
    diffusion_steps=100,
    lr=1e-3,
    agc_lambda=2.0,
    ret_fraction=0.25,
)
# the horizon on digits: default training until it levels off (<= 16,000 steps), every round 256 samples,
# each client's own model sampled every round. UNMEASURED until run: about 4x the full study's training
HORIZON = dataclasses.replace(FULL, round_samples=256, max_steps=16_000, until_plateau=1, client_samples=64)
# Fashion-MNIST at 16x16 on 2 CPU cores (docs/small-data-fashion-calibration.md): UNCALIBRATED, a first guess
# from the digits' rule (copying tracks passes per image) and the 16x16 step rate
FASHION16 = dataclasses.replace(
    HORIZON, image_size=16, dataset="fashion-mnist", data_root=FASHION_ROOT, quality_images=10_000
)
FASHION16_SMOKE = dataclasses.replace(
    SMOKE,
    image_size=16,
    seeds=(0,),
    round_samples=16,
    variants=("default", "iet-agc"),
    dataset="fashion-mnist",
    data_root=FASHION_ROOT,
    quality_images=2_000,
    client_samples=4,
)
SIZES = {
    "full": FULL,
    "smoke": SMOKE,
    "horizon": HORIZON,
    "horizon-smoke": dataclasses.replace(
        SMOKE,
        round_samples=16,
        variants=("default", "iet-agc"),
        max_steps=32,
        until_plateau=1,
        plateau_window=1,
        plateau_floor=0.0,
        client_samples=4,
    ),
    "fashion16": FASHION16,
    "fashion16-smoke": FASHION16_SMOKE,
    # one H100, bf16 + channels-last + compiled, Fashion-MNIST at 32x32, the paper UNet: about 8 min, UNMEASURED
    # until run on a GPU; gpu_estimate() below derives it from benchmarks/RESULTS.md's H100 throughputs
    "gpu-fashion32": dataclasses.replace(
        FULL,
        train_images=256,
        image_size=32,
        batch_size=128,
        rounds=20,
        local_epochs=50,
        seeds=(0, 1),
        samples=512,
        round_samples=128,
        lr=2e-4,
        variants=("default", "iet-agc"),
        dataset="fashion-mnist",
        preset="ddpm-cifar10",
        device="cuda",
        data_root=FASHION_ROOT,
        quality_images=10_000,
        client_samples=64,
        speed=(("precision", "bf16"), ("channels-last", True), ("compile", True)),
    ),
    "gpu-fashion32-smoke": dataclasses.replace(FASHION16_SMOKE, round_samples=8),
}
# --set size=NAME picks a family: --full runs SIZES[NAME], --smoke SIZES[NAME-smoke] ("digits": full / smoke)
FAMILIES = {
    "digits": ("full", "smoke"),
    "horizon": ("horizon", "horizon-smoke"),
    "fashion16": ("fashion16", "fashion16-smoke"),
    "gpu-fashion32": ("gpu-fashion32", "gpu-fashion32-smoke"),
}

# H100 throughputs measured in benchmarks/RESULTS.md (paper UNet, 32x32, bf16 + channels-last + compiled)
H100_TRAIN_IMG_S, H100_DDIM50_IMG_S, H100_COMPILE_S = 3726.0, 461.0, 47.7


def gpu_estimate(size: Size) -> dict:
    """Expected seconds of a GPU size on one H100, from the measured throughputs (UNMEASURED until run): training
    images / 3,726 img/s + DDIM-50 samples / 461 img/s (x sample-steps / 50) + one compile warm-up (47.7 s).
    gpu-fashion32: 4 runs x 20 rounds x 100 steps x batch 128 = 1,024,000 images = 275 s; samples: 4 runs x
    (19 x 128 + 512) + 2 federated runs x 2 clients x 64 x 20 rounds + 512 untrained = 17,408 = 38 s; + 48 s
    warm-up = 360 s = 6.0 min, plus what the throughputs do not cover: loading Fashion-MNIST, the CPU's quality
    classifier (10,000 images x 30 epochs), the sampler's own compilation, and sampling in batches of 64-512 (the
    benchmark's were 512): about 8 min in all, as a guess."""
    per_round = size.local_epochs * size.clients * ((size.train_images // size.clients) // size.batch_size)
    runs = len(size.variants) * len(size.seeds)
    fed = sum(VARIANTS[v][1] for v in size.variants) * len(size.seeds)
    train_images = runs * size.rounds * per_round * size.batch_size
    samples = runs * ((size.rounds - 1) * size.round_samples + size.samples) + size.samples
    samples += fed * size.clients * size.client_samples * size.rounds
    train_s = train_images / H100_TRAIN_IMG_S
    sample_s = samples / H100_DDIM50_IMG_S * size.sample_steps / 50
    return {
        "train_images": train_images,
        "samples": samples,
        "train_s": train_s,
        "sample_s": sample_s,
        "warmup_s": H100_COMPILE_S,
        "total_s": train_s + sample_s + H100_COMPILE_S,
    }


VARIANTS = {  # name: (run-config overrides, federated?)
    "default": ({"agc": False}, False),
    "agc": ({"agc": True}, False),
    "iet": ({"agc": False}, True),
    "iet-agc": ({"agc": True}, True),
    "ret": ({"agc": True, "ret-every": 1, "taa": True}, True),
}


# run-config keys the study sets itself, per run: --set of one would be overwritten or would break the design
# (one seed for every replicate, one run-name for every run); the setting to use instead, if there is one
CONTROLLED = {
    "seed": "seeds (e.g. --set seeds=5,6,7)",
    "run-name": None,
    "output-dir": "--out",
    "max-images": "train-images",
    "num-server-rounds": "rounds",
    "image-size": "image-size",
    "agc": "variants",
    "ret-every": "variants",
    "taa": "variants",
    "sample-count": "samples",
    "checkpoint-every": None,
    "resume-from": None,
}


def apply_settings(size: Size, settings: list[str]) -> tuple[Size, dict]:
    """`--set KEY=VALUE`: a Size field (e.g. train-images=64) or a run-config key (e.g. ema-decay=0.999).
    Raises ConfigError naming the setting."""
    from fl_ietagc.settings.config import config_keys, parse_overrides

    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(Size) if f.name != "speed"}
    run_keys = {f.metadata["key"] for f in config_keys()}
    changes, extra, seen_run_keys = {}, {}, set()
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ConfigError(f"--set {item!r}: must be KEY=VALUE")
        if key in fields:
            f = fields[key]
            try:
                if f.name == "variants":
                    parsed = tuple(v.strip() for v in value.split(","))
                    if len(set(parsed)) != len(parsed) or not set(parsed) <= set(VARIANTS):
                        raise ValueError
                elif f.name == "seeds":
                    parsed = tuple(int(v) for v in value.split(","))
                    if not parsed or len(set(parsed)) != len(parsed) or min(parsed) < 0:
                        raise ValueError
                elif f.name == "sweep":
                    from experiments.studies.sweep import parse_knobs

                    parsed = ",".join(parse_knobs(value))
                elif f.type == "str":
                    parsed = value.strip()
                else:
                    parsed = float(value) if f.type == "float" else int(value)
            except ValueError:
                from experiments.studies.sweep import KNOBS

                what = {
                    "seeds": "distinct integers >= 0, comma-separated",
                    "variants": f"distinct names among {', '.join(VARIANTS)}, comma-separated",
                    "sweep": f"'all' or distinct knobs among {', '.join(KNOBS)}, comma-separated",
                }.get(f.name, f.type)
                raise ConfigError(f"--set {key}={value}: must be {what}") from None
            if f.name in changes:
                raise ConfigError(f"--set {key}: given twice; give each setting once")
            changes[f.name] = parsed
        elif key in CONTROLLED:
            instead = CONTROLLED[key]
            raise ConfigError(
                f"--set {key}: the small-data study sets {key} for each run itself"
                + (
                    f"; use {instead}"
                    if instead and instead.startswith("--")
                    else f"; use --set {instead}"
                    if instead
                    else ""
                )
            )
        elif key in run_keys:
            if key in seen_run_keys:
                raise ConfigError(f"--set {key}: given twice; give each key once")
            seen_run_keys.add(key)
            try:
                extra.update(parse_overrides(f"{key}={value}"))
            except ConfigError as e:
                raise ConfigError(f"--set {item}: {e}") from None
        else:
            raise ConfigError(f"--set {key}: not a study setting ({', '.join(fields)}) nor a run-config key")
    size = dataclasses.replace(size, **changes)
    for name in (
        "train_images",
        "image_size",
        "clients",
        "batch_size",
        "rounds",
        "local_epochs",
        "samples",
        "round_samples",
        "sample_steps",
        "diffusion_steps",
        "plateau_window",
        "sweep_seeds",
    ):
        if getattr(size, name) < 1:
            raise ConfigError(f"--set {name.replace('_', '-')}={getattr(size, name)}: must be >= 1")
    for name in ("max_steps", "client_samples", "quality_images"):
        if getattr(size, name) < 0:
            raise ConfigError(f"--set {name.replace('_', '-')}={getattr(size, name)}: must be >= 0")
    if size.until_plateau not in (0, 1):
        raise ConfigError(f"--set until-plateau={size.until_plateau}: must be 0 or 1")
    if not 0 <= size.plateau_floor <= 1:
        raise ConfigError(f"--set plateau-floor={size.plateau_floor:g}: must be in [0, 1]")
    if not 0 < size.plateau_tolerance <= 1:
        raise ConfigError(f"--set plateau-tolerance={size.plateau_tolerance:g}: must be in (0, 1]")
    if size.until_plateau and "default" not in size.variants:
        raise ConfigError(
            "--set until-plateau=1: needs the default variant (its curve decides the horizon); "
            "add default to --set variants"
        )
    if size.clients < 2:
        raise ConfigError(f"--set clients={size.clients}: must be >= 2 (the federated variants need 2 shards)")
    if size.samples < 2:
        raise ConfigError(f"--set samples={size.samples}: must be >= 2 (the quality score needs 2 images)")
    return size, extra


def resolve_size(size_name: str, settings: list[str]) -> tuple[str, list[str]]:
    """`--set size=FAMILY` (FAMILIES) turns --full / --smoke (`size_name`) into that family's size; returns the
    size's name and the other settings."""
    picked = [s for s in settings if s.partition("=")[0].strip() == "size"]
    if not picked:
        return size_name, list(settings)
    if len(picked) > 1:
        raise ConfigError("--set size: given twice; give each setting once")
    family = picked[0].partition("=")[2].strip()
    if family not in FAMILIES:
        raise ConfigError(f"--set size={family}: must be one of {', '.join(FAMILIES)}")
    return FAMILIES[family][size_name == "smoke"], [s for s in settings if s not in picked]


def with_budget(size: Size, extra: dict) -> Size:
    """`max-steps`: the rounds that reach the step budget (every variant takes the same optimizer steps per
    round: K clients x local epochs x batches of a shard; default training matches it)."""
    if not size.max_steps:
        return size
    from fl_ietagc.loops.centralized import federated_total_steps
    from fl_ietagc.settings.config import parse_config

    try:
        cfg = parse_config({**size.run_config(size.seeds[0]), **extra, "num-server-rounds": 1})
        per_round = federated_total_steps(cfg, size.clients)
    except ConfigError as e:
        raise ConfigError(f"--set max-steps={size.max_steps}: {e}") from e
    if per_round < 1:
        raise ConfigError(f"--set max-steps={size.max_steps}: a round takes no optimizer step at this size")
    return dataclasses.replace(size, rounds=-(-size.max_steps // per_round))


def configs(size: Size, extra: dict, out: Path) -> list[tuple[str, int, object, bool]]:
    """(variant, seed, RunConfig, federated) of every run, validated before any work (ConfigError names the run)."""
    from fl_ietagc.validate import check_output_dir

    check_output_dir(str(out))
    return [
        (name, seed, job_config(name, seed, size, extra, out), VARIANTS[name][1])
        for seed in size.seeds
        for name in VARIANTS
        if name in size.variants
    ]


def job_config(name: str, seed: int, size: Size, extra: dict, out: Path, run_name: str | None = None):
    """One run's RunConfig (variant `name` at `size`), validated; ConfigError names the run."""
    from fl_ietagc.data.shards import shards_for_config
    from fl_ietagc.settings.config import parse_config
    from fl_ietagc.validate import check_device, check_input_paths, check_model

    overrides, _ = VARIANTS[name]
    run_name = run_name or f"{name}-s{seed}"
    mine = {k: v for k, v in extra.items() if not k.startswith(RET_ONLY) or "ret-every" in overrides}
    conf = {**size.run_config(seed), **overrides, **mine, "output-dir": str(out / "runs"), "run-name": run_name}
    if "ret-every" in overrides:
        conf["ret-fraction"] = size.ret_fraction
    try:
        cfg = parse_config(conf)
        check_input_paths(cfg)
        check_model(cfg)  # image size: fits the UNet, and memory
        check_device(cfg)
        check_train_images(cfg, size)
        shards_for_config(cfg, size.clients)  # data, K and batch size agree
    except ConfigError as e:
        raise ConfigError(f"[{run_name}] {e}") from e
    return cfg


def check_train_images(cfg, size: Size) -> None:
    """train-images within the training set (max-images would cap it silently: a study of fewer images than it
    says)."""
    from fl_ietagc.data.datasets import load_splits

    have = len(load_splits(cfg.replace(**{"max-images": 0})).train)
    if size.train_images > have:
        raise ConfigError(
            f"--set train-images={size.train_images}: the {cfg.dataset} training set has {have} "
            f"images (after the held-out part); must be in [1, {have}]"
        )


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the study process is gone (killed, even by SIGKILL), instead of
    training on as an orphan. A run cut short this way is resumed by the next call of the study. A terminal's
    Ctrl-C reaches every process of the group: ignored here, the study process ends its workers (`_end_workers`)
    with SIGTERM, which marks the run being trained interrupted and ends the worker at once (as SIGKILL would,
    which the commit rule makes safe: the next call resumes from the last committed round)."""
    import signal
    import threading

    def on_sigterm(signum, frame):
        from fl_ietagc.runs.rundir import ACTIVE_RUNS

        for run in list(ACTIVE_RUNS):
            run.mark_interrupted("SIGTERM")
        os._exit(143)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def train_and_evaluate(
    name: str, seed: int, cfg, federated: bool, size: Size, threads: int = 1, progress: bool = False
) -> dict:
    """One run (kept if completed, resumed if cut short, else started), then every round evaluated (cached).
    With `client-samples`, each client's own model is sampled at every round of a federated run (the mechanism:
    eval/clients_round_RRRR.npz), from inside the loop, before averaging's result replaces it. With `progress`,
    a line per minute at most while it trains and while it evaluates (a full-size run trains for half an hour)."""
    import torch

    from fl_ietagc.loops.centralized import run_centralized
    from fl_ietagc.loops.iet import run_iet_loop
    from fl_ietagc.runs.progress import RoundProgress
    from fl_ietagc.runs.rundir import RunDir

    torch.set_num_threads(threads)
    t0 = time.time()
    run = RunDir(Path(cfg.output_dir) / cfg.run_name)
    state = run.liveness() if run.config_path.is_file() else "new"
    if state == "running":
        raise RuntimeError(f"[{name}-s{seed}] {run.path} is being written by another process")
    kept = state == "completed"
    label, rounds_total = f"[{name}-s{seed}]", cfg.num_server_rounds
    write = None if progress else (lambda line: None)  # None: RoundProgress prints
    if not kept:
        resume = state in ("failed", "interrupted", "stale")
        done = len(run.read_metrics()) if resume else 0
        trained_rounds = RoundProgress(f"{label} training", rounds_total, start=done, write=write)
        if federated:
            hook = client_recorder(run.path, cfg, size) if size.client_samples else None
            run_iet_loop(
                cfg,
                size.clients,
                torch.device(size.device),
                RunDir.reopen(run.path) if resume else RunDir.create(cfg.output_dir, cfg.run_name, ""),
                progress=lambda r, record: trained_rounds.update(r),
                on_round=hook,
            )
        else:
            run_centralized(
                cfg,
                match_federated=size.clients,
                progress=False,
                resume=str(run.path) if resume else None,
                on_round=lambda r, record: trained_rounds.update(r),
            )
    trained = time.time() - t0
    evaluated = RoundProgress(f"{label} evaluating", rounds_total, write=write)
    rounds = []
    for r in range(1, rounds_total + 1):
        rounds.append(evaluate_round(run, cfg, r, size))
        evaluated.update(r)
    clients = [client_round(run, r) for r in range(1, rounds_total + 1)] if federated else []
    return {
        "variant": name,
        "seed": seed,
        "run": str(run.path),
        "kept": kept,
        "train_s": trained,
        "eval_s": time.time() - t0 - trained,
        "rounds": rounds,
        "clients": clients,
    }


def generate(model, cfg, size: Size, n: int, shape: tuple, seed: int):
    """n DDIM samples (uint8) of `model`, on the size's device with the run's speed keys."""
    from fl_ietagc.data.pixels import to_uint8
    from fl_ietagc.training.diffusion import Diffusion, sample

    return to_uint8(
        sample(
            model.to(size.device),
            Diffusion.for_config(cfg),
            n,
            shape,
            steps=size.sample_steps,
            seed=seed,
            batch_size=n if size.device == "cpu" else min(n, 512),
            device=size.device,
            precision=cfg.precision,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            compile_mode=cfg.compile_mode,
        )
    ).cpu()


def client_recorder(run_path: Path, cfg, size: Size):
    """run_iet_loop's `on_round`: sample each client's own raw weights before they are averaged away and match
    them against the whole training set and the client's own shard (the 1/3 rule's two neighbours, k = 2).
    Written once per round; a resumed run writes the rounds it trains again."""
    import torch

    from fl_ietagc.data.datasets import load_splits
    from fl_ietagc.evaluation.memorization import nearest_neighbours
    from fl_ietagc.runs.checkpoints import atomic_write_bytes
    from fl_ietagc.training.models import load_weights
    from fl_ietagc.training.run_model import build_for_config

    train = load_splits(cfg).train.images

    def on_round(server_round: int, clients: list, averaged: dict) -> None:
        path = run_path / "eval" / f"clients_round_{server_round:04d}.npz"
        if path.is_file():
            return
        blob = {}
        for pid, (shard, weights) in enumerate(clients):
            model = build_for_config(cfg)
            load_weights(model, weights, f"client {pid}, round {server_round}")
            imgs = generate(
                model, cfg, size, size.client_samples, tuple(train.shape[1:]), seed=20_000 + 100 * server_round + pid
            )
            ids = torch.as_tensor(np.asarray(shard), dtype=torch.long)
            whole = nearest_neighbours(imgs, train, 2)
            own = nearest_neighbours(imgs, train[ids], 2)
            blob |= {
                f"samples_{pid}": imgs.numpy(),
                f"shard_{pid}": ids.numpy(),
                f"d2_whole_{pid}": whole.d2.numpy(),
                f"index_whole_{pid}": whole.index.numpy(),
                f"d2_own_{pid}": own.d2.numpy(),
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda f: np.savez(f, clients=len(clients), **blob))

    return on_round


def client_round(run, server_round: int) -> dict | None:
    """The 1/3 rule on each client's own model at a round: against the whole set, against its own shard, and
    whether its nearest image is in its own shard; None when the round was not recorded."""
    path = run.path / "eval" / f"clients_round_{server_round:04d}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        out = []
        for pid in range(int(z["clients"])):
            whole, own = z[f"d2_whole_{pid}"], z[f"d2_own_{pid}"]
            out.append(
                {
                    "whole": one_third(whole).tolist(),
                    "own": one_third(own).tolist(),
                    "nearest_in_own": np.isin(z[f"index_whole_{pid}"][:, 0], z[f"shard_{pid}"]).tolist(),
                }
            )
    return {"round": server_round, "clients": out}


def one_third(d2: np.ndarray) -> np.ndarray:
    """The 1/3 rule from the two nearest squared distances: l2 1st / l2 2nd < 1/3."""
    return np.sqrt(d2[:, 0]) < np.sqrt(d2[:, 1]) / 3


def evaluate_round(run, cfg, server_round: int, size: Size) -> dict:
    """Sample round R's raw weights, match against the training set; saved to eval/round_RRRR.npz."""
    from fl_ietagc.data.datasets import load_splits
    from fl_ietagc.evaluation.memorization import nearest_neighbours
    from fl_ietagc.runs.checkpoints import load_checkpoint
    from fl_ietagc.training.models import load_weights
    from fl_ietagc.training.run_model import build_for_config

    path = run.path / "eval" / f"round_{server_round:04d}.npz"
    # until-plateau: the horizon is known after training, so every round has the same number of samples
    last = server_round == cfg.num_server_rounds and not size.until_plateau
    train = load_splits(cfg).train.images
    if not path.is_file():
        model = build_for_config(cfg)
        load_weights(model, load_checkpoint(run.checkpoint(server_round))["net"], f"round {server_round}")
        n = size.samples if last else size.round_samples
        samples = generate(model, cfg, size, n, tuple(train.shape[1:]), seed=10_000 + server_round)
        nb = nearest_neighbours(samples, train, min(50, len(train)), device=size.device)
        save_samples(path, samples, nb)
    blob = load_samples(path)
    metrics = run.read_metrics()
    steps = int(sum(m["steps"] for m in metrics[:server_round]))  # all clients' steps (federated) or the run's
    return {
        "round": server_round,
        "steps": steps,
        "flags": {k: v.tolist() for k, v in flags(blob["d2"]).items()},
        "eval_file": str(path),
    }


def flags(d2: np.ndarray) -> dict[str, np.ndarray]:
    """Per query, whether each rule calls it a copy, from its k exact squared distances (ascending)."""
    import torch

    from fl_ietagc.evaluation.memorization import Neighbours, ratios

    r = ratios(Neighbours(torch.from_numpy(d2), torch.zeros(d2.shape, dtype=torch.long), 1))
    return {
        "one_third": r["gu"] < 1 / 3,
        "carlini": r["carlini"] < 1.0,
        "mq_0.2": r["mq"] < 0.2,
        "mq_0.3": r["mq"] < 0.3,
    }


def bootstrap_rate(per_seed: list[np.ndarray], rng: np.random.Generator, n: int = BOOTSTRAP) -> dict:
    """Mean rate over seeds and its hierarchical bootstrap 95% interval (resample seeds, then samples per seed)."""
    per_seed = [np.asarray(f, dtype=float) for f in per_seed]
    mean = float(np.mean([f.mean() for f in per_seed]))
    s = len(per_seed)
    draws = np.empty(n)
    for b in range(n):
        picks = rng.integers(0, s, s)
        draws[b] = np.mean([per_seed[i][rng.integers(0, len(per_seed[i]), len(per_seed[i]))].mean() for i in picks])
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return {"rate": mean, "lo": float(lo), "hi": float(hi), "per_seed": [float(f.mean()) for f in per_seed]}


def null_and_reference(cfg, size: Size) -> dict:
    """Held-out real images against the training set: the rate each rule gives real, uncopied images."""
    from fl_ietagc.data.datasets import load_splits
    from fl_ietagc.evaluation.memorization import nearest_neighbours

    sp = load_splits(cfg)
    nb = nearest_neighbours(sp.heldout.images, sp.train.images, min(50, len(sp.train.images)))
    rng = np.random.default_rng(0)
    return {k: bootstrap_rate([v], rng) for k, v in flags(nb.d2.numpy()).items()} | {
        "num_heldout": len(sp.heldout.images),
        "num_train": len(sp.train.images),
    }


def quality_reference(cfg, results: list[dict], size: Size):
    """(the dataset's full splits, its quality classifier, the training split's features, the number of images to
    score): equal numbers everywhere (the Frechet distance is biased by N), the fewest any last round holds."""
    from fl_ietagc.data.datasets import load_splits
    from fl_ietagc.evaluation import classifier_quality as cq

    full = load_splits(cfg.replace(**{"max-images": 0}))
    train, labels = full.train.images, full.train.labels
    if size.quality_images:  # a large training split (Fashion-MNIST: 60,000): its first images, for CPU time
        train, labels = train[: size.quality_images], labels[: size.quality_images]
    clf = cq.classifier_for(cfg.dataset, train, labels, full.heldout.images, full.heldout.labels)
    n = min(
        [size.samples, len(full.heldout.images)]
        + [len(load_samples(r["rounds"][-1]["eval_file"])["samples"]) for r in results]
    )
    return full, clf, clf.features(train), n


def final_quality(cfg, results: list[dict], size: Size, reference=None) -> dict:
    """CFD / precision / recall of each run's last-round samples (`runs`: run directory name -> scores) and of
    held-out real images, in the study's classifier features, all at the same number of images: the sweep's
    quality column, and the study's (quality_rows). `reference`: quality_reference's result, if already made."""
    import torch

    from fl_ietagc.evaluation import classifier_quality as cq

    full, clf, ref, n = reference or quality_reference(cfg, results, size)
    runs = {}
    for r in results:
        samples = torch.from_numpy(load_samples(r["rounds"][-1]["eval_file"])["samples"][:n])
        runs[Path(r["run"]).name] = cq.score(clf, samples, ref)
    return {
        "runs": runs,
        "held-out real": cq.score(clf, full.heldout.images[:n], ref),
        "num_images": n,
        "classifier_accuracy": clf.accuracy,
    }


def quality_rows(jobs, results: list[dict], size: Size) -> dict:
    """CFD / precision / recall of every variant's last-round samples, of real held-out images and of the
    untrained model, all at the same number of images."""
    import torch

    from fl_ietagc.evaluation import classifier_quality as cq
    from fl_ietagc.training.models import load_weights
    from fl_ietagc.training.run_model import build_for_config, initial_weights

    cfg = jobs[0][2]
    reference = full, clf, ref, n = quality_reference(cfg, results, size)
    final = final_quality(cfg, results, size, reference)
    rows, per_round = {}, {}
    for r in results:
        rows.setdefault(r["variant"], []).append(final["runs"][Path(r["run"]).name])
        # every round's CFD at round-samples images: the quality at equal copy rate (horizon_report.py)
        m = min(size.round_samples, n)
        per_round.setdefault(r["variant"], []).append(
            [
                cq.frechet_distance(clf.features(torch.from_numpy(load_samples(x["eval_file"])["samples"][:m])), ref)
                for x in r["rounds"]
            ]
        )
    rows["held-out real"] = [final["held-out real"]]
    model = build_for_config(cfg)
    load_weights(model, initial_weights(cfg)[0], "initial weights")
    untrained = generate(model, cfg, size, n, tuple(full.train.images.shape[1:]), seed=10_000)
    rows["untrained"] = [cq.score(clf, untrained, ref)]
    return {
        "classifier_accuracy": clf.accuracy,
        "classifier": clf.key,
        "num_images": n,
        "dataset": cfg.dataset,
        "rows": {
            k: {m: float(np.mean([x[m] for x in v])) for m in ("cfd", "precision", "recall")}
            | {"cfd_per_seed": [x["cfd"] for x in v]}
            for k, v in rows.items()
        },
        "cfd_per_round": {k: np.mean(v, axis=0).tolist() for k, v in per_round.items()},
        "round_images": min(size.round_samples, n),
    }


def summarize(results: list[dict], null: dict, quality: dict, size: Size, seconds: float) -> dict:
    rng = np.random.default_rng(12)
    variants = {}
    for name in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        final = {rule: bootstrap_rate([np.array(r["rounds"][-1]["flags"][rule]) for r in runs], rng) for rule in RULES}
        curve = [
            {
                "steps": runs[0]["rounds"][i]["steps"],
                **{
                    rule: bootstrap_rate([np.array(r["rounds"][i]["flags"][rule]) for r in runs], rng, 400)
                    for rule in ("one_third", "carlini")
                },
            }
            for i in range(len(runs[0]["rounds"]))
        ]
        variants[name] = {
            "final": final,
            "curve": curve,
            "seeds": [r["seed"] for r in runs],
            "train_s": [r["train_s"] for r in runs],
        }
    return {
        "size": dataclasses.asdict(size),
        "dataset": quality["dataset"],
        "variants": variants,
        "null": null,
        "quality": quality,
        "seconds": seconds,
    }


def to_markdown(summary: dict) -> str:
    size, null, q = summary["size"], summary["null"], summary["quality"]

    def cell(x: dict) -> str:
        return f"{100 * x['rate']:.1f}% [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]"

    check = summary.get("pipeline_check")  # smoke: said in the header and, in full, under the table
    head = [
        "variant (SMOKE RUN: pipeline check, not a finding)" if check else "variant",
        *(RULE_NAMES[r] for r in RULES),
        "CFD (lower is better)",
        "precision",
        "recall",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in summary["variants"].items():
        qr = q["rows"].get(name, {})
        lines.append(
            f"| {name} | "
            + " | ".join(cell(v["final"][r]) for r in RULES)
            + f" | {qr.get('cfd', float('nan')):.1f} | {qr.get('precision', float('nan')):.2f} | "
            f"{qr.get('recall', float('nan')):.2f} |"
        )
    for name in ("held-out real", "untrained"):
        qr = q["rows"][name]
        rates = " | ".join(cell(null[r]) for r in RULES) if name == "held-out real" else " | ".join("-" for _ in RULES)
        label = f"{name} (null)" if name == "held-out real" else name
        lines.append(f"| {label} | {rates} | {qr['cfd']:.1f} | {qr['precision']:.2f} | {qr['recall']:.2f} |")
    steps = summary["variants"][next(iter(summary["variants"]))]["curve"][-1]["steps"]
    lines += [
        "",
        f"{size['train_images']} training images ({summary.get('dataset', 'digits')}) at "
        f"{size['image_size']}x{size['image_size']}, `tiny` UNet, "
        f"{steps:,} optimizer steps per run (batch {size['batch_size']}), K = {size['clients']} for the "
        f"federated variants, lambda = {size['agc_lambda']:g}; seeds {', '.join(map(str, size['seeds']))}; "
        f"{size['samples']} DDIM-{size['sample_steps']} samples per run (raw weights). Copy rates: mean over "
        f"seeds [hierarchical bootstrap 95% interval]; the null row is {null['num_heldout']} held-out real "
        f"images against the same {null['num_train']} training images. Quality: CFD and precision/recall "
        f"(k = 3) of {q['num_images']} images in the features of a small classifier trained on the "
        f"{summary.get('dataset', 'digits')} training split (held-out accuracy {100 * q['classifier_accuracy']:.1f}%); not FID. "
        f"Wall time of this call {summary['seconds'] / 60:.1f} min"
        + (
            f" ({summary['kept']} of the runs were kept from an earlier call, not retrained)."
            if summary.get("kept")
            else "."
        ),
    ]
    if check:
        from experiments.studies.pipeline_check import NOTE

        lines += ["", NOTE]
    return "\n".join(lines)


def make_figures(summary: dict, results: list[dict], fig_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rule in zip(axes, ("one_third", "carlini")):
        for name, v in summary["variants"].items():
            x = [c["steps"] for c in v["curve"]]
            ax.plot(x, [100 * c[rule]["rate"] for c in v["curve"]], marker="o", ms=3, label=name)
            ax.fill_between(
                x, [100 * c[rule]["lo"] for c in v["curve"]], [100 * c[rule]["hi"] for c in v["curve"]], alpha=0.15
            )
        ax.axhline(100 * summary["null"][rule]["rate"], color="k", ls="--", lw=1, label="held-out real (null)")
        ax.set_title(f"copy rate ({RULE_NAMES[rule]})")
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    from experiments.studies.horizon_report import extend_copy_rate_axes

    extend_copy_rate_axes(axes[0], summary)  # 10% / 25% lines, default training beyond the horizon
    axes[0].set_ylabel("% of generated images")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out["copy_rate_vs_steps"] = fig_dir / "copy_rate_vs_steps.png"
    fig.savefig(out["copy_rate_vs_steps"], dpi=110)
    plt.close(fig)

    first = min(summary["size"]["seeds"])
    shown = [r for name in summary["variants"] for r in results if r["variant"] == name and r["seed"] == first]
    if shown:  # what each variant generates: a low copy rate means little if the samples are not digits
        fig, axes = plt.subplots(len(shown), 1, figsize=(8, 0.75 * len(shown) + 0.4))
        for ax, r in zip(np.atleast_1d(axes), shown):
            imgs = load_samples(r["rounds"][-1]["eval_file"])["samples"][:16, 0]
            ax.imshow(
                np.concatenate(list(np.pad(imgs, ((0, 0), (0, 0), (0, 1)), constant_values=255)), axis=1),
                cmap="gray",
                vmin=0,
                vmax=255,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(r["variant"], rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(f"first 16 samples of each variant, last round (seed {first})", fontsize=9)
        fig.tight_layout()
        out["samples"] = fig_dir / "samples.png"
        fig.savefig(out["samples"], dpi=110)
        plt.close(fig)

    pairs = [
        r for r in results if r["variant"] in ("default", "iet-agc") and r["seed"] == min(summary["size"]["seeds"])
    ]
    if pairs:
        from fl_ietagc.data.datasets import load_splits
        from fl_ietagc.runs.rundir import RunDir

        fig, axes = plt.subplots(2 * len(pairs), 8, figsize=(8, 2.2 * len(pairs)))
        axes = np.atleast_2d(axes)
        for j, r in enumerate(sorted(pairs, key=lambda r: r["variant"] != "default")):
            blob = load_samples(r["rounds"][-1]["eval_file"])
            from fl_ietagc.settings.config import parse_config

            train = load_splits(
                parse_config({k: v for k, v in RunDir(r["run"]).read_config().items() if k in _run_keys()})
            ).train.images.numpy()
            order = np.argsort(blob["d2"][:, 0], kind="stable")[:8]
            for i, q in enumerate(order):
                for row, img in ((2 * j, blob["samples"][q]), (2 * j + 1, train[blob["index"][q, 0]])):
                    axes[row, i].imshow(img[0], cmap="gray", vmin=0, vmax=255)
                    axes[row, i].set_xticks([])
                    axes[row, i].set_yticks([])
            axes[2 * j, 0].set_ylabel(f"{r['variant']}\ngenerated", fontsize=8)
            axes[2 * j + 1, 0].set_ylabel("nearest\ntraining", fontsize=8)
        fig.suptitle(f"most similar generated / training pairs (seed {min(summary['size']['seeds'])})", fontsize=9)
        fig.tight_layout()
        out["similar_pairs"] = fig_dir / "similar_pairs.png"
        fig.savefig(out["similar_pairs"], dpi=110)
        plt.close(fig)
    return out


def _run_keys() -> set[str]:
    from fl_ietagc.settings.config import config_keys

    return {f.metadata["key"] for f in config_keys()}


def run_pool(
    tasks: list[tuple], workers: int, t0: float, progress: bool, done_before: int = 0, total: int | None = None
) -> list[dict]:
    """train_and_evaluate over `tasks` (name, seed, cfg, federated, size), `workers` processes of one thread each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    total = total or len(tasks)
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = []
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = [
            pool.submit(train_and_evaluate, name, seed, cfg, fed, size, threads, progress)
            for name, seed, cfg, fed, size in tasks
        ]
        for i, f in enumerate(futures, start=1 + done_before):
            r = f.result()
            results.append(r)
            elapsed = time.time() - t0
            done = done_before + sum(x.done() for x in futures)  # workers finish in parallel: all of them count
            if progress:
                print(
                    f"[{i}/{total}] {Path(r['run']).name}: train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s"
                    f"  1/3-rule {100 * np.mean(r['rounds'][-1]['flags']['one_third']):.1f}%  elapsed "
                    f"{elapsed / 60:.1f} min, eta {elapsed / done * (total - done) / 60:.1f} min",
                    flush=True,
                )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (fl-ietagc-study): no worker trains on; finished runs are kept
        _end_workers(pool)
        raise
    pool.shutdown()  # (a failed run: the others finish first, as before, and the failure is raised above)
    return results


def _end_workers(pool, grace_s: float = 10.0) -> None:
    """SIGTERM to every worker (its run lifecycle marks the run interrupted: resumed by the next call), SIGKILL to
    any still alive after `grace_s`; queued runs are dropped."""
    import multiprocessing

    workers = multiprocessing.active_children()  # the pool's processes: the study starts no others
    for w in workers:
        w.terminate()
    deadline = time.time() + grace_s
    for w in workers:
        w.join(max(0.0, deadline - time.time()))
        if w.is_alive():
            w.kill()
            w.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


def study_dir_for(out: Path, size_name: str, settings: list[str]) -> Path:
    # a path-valued setting (data-root=/a/b) names one directory, not a tree
    return out / (
        "small-data-"
        + size_name
        + ("-" + "-".join(s.replace("=", "").replace("/", "_") for s in settings) if settings else "")
    )


def run_small_data(
    size_name: str,
    out: Path,
    *,
    workers: int = 2,
    settings: list[str] | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> dict | None:
    """The whole study; returns the summary (also written as results.json / comparison.md / horizon.md /
    figures/). `--set size=FAMILY` picks another size, `--set sweep=...` runs the sweep (sweep.py) instead."""
    from experiments.studies import horizon_report

    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    size_name, settings = resolve_size(size_name, settings or [])
    size, extra = apply_settings(SIZES[size_name], settings)
    size = with_budget(size, extra)
    study_dir = study_dir_for(out, size_name, settings)
    if size.sweep:
        from experiments.studies.sweep import run_sweep

        return run_sweep(
            size,
            extra,
            study_dir,
            size_name=size_name,
            job_config=job_config,
            run_pool=run_pool,
            quality=final_quality,
            workers=workers,
            progress=progress,
            dry_run=dry_run,
        )
    if dry_run and size.device == "cuda":  # before the checks, so a machine without the GPU can print it too
        e = gpu_estimate(size)
        print(
            f"expected on one H100 (UNMEASURED, from benchmarks/RESULTS.md): {e['total_s'] / 60:.1f} min "
            f"({e['train_s']:.0f} s training {e['train_images']:,} images at {H100_TRAIN_IMG_S:,.0f} img/s, "
            f"{e['sample_s']:.0f} s sampling {e['samples']:,} images at {H100_DDIM50_IMG_S:,.0f} img/s, "
            f"{e['warmup_s']:.0f} s compile warm-up; data loading and the CPU's quality classifier not counted)",
            flush=True,
        )
    jobs = configs(size, extra, study_dir)
    if dry_run:  # the plan, checked, and nothing written
        horizon = f"; until default training levels off, at most {size.rounds} rounds" if size.until_plateau else ""
        print(
            f"small-data study ({size_name}), dry run: {len(jobs)} runs ({len(size.variants)} variants x "
            f"{len(size.seeds)} seeds) into {study_dir}: {', '.join(f'{n}-s{s}' for n, s, _, _ in jobs)}; "
            f"{size.rounds} rounds x {size.local_epochs} local epochs, {size.train_images} training images"
            f"{horizon}",
            flush=True,
        )
        return None
    study_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    total = len(jobs)
    print(
        f"small-data study ({size_name}): {total} runs ({len(size.variants)} variants x {len(size.seeds)} seeds), "
        f"{workers} worker(s), in {study_dir}",
        flush=True,
    )
    plateau = None
    if size.until_plateau:  # default training first, to the budget; the others to where it levelled off
        first = [(*j, size) for j in jobs if j[0] == "default"]
        results = run_pool(first, workers, t0, progress, total=total)
        plateau = horizon_report.plateau(results, size)
        horizon = plateau["round"] or size.rounds
        rest = configs(dataclasses.replace(size, rounds=horizon), extra, study_dir)
        results += run_pool(
            [(*j, dataclasses.replace(size, rounds=horizon)) for j in rest if j[0] != "default"],
            workers,
            t0,
            progress,
            done_before=len(first),
            total=total,
        )
        full_default = [r for r in results if r["variant"] == "default"]
        results = [horizon_report.truncate(r, horizon) for r in results]
    else:
        results = run_pool([(*j, size) for j in jobs], workers, t0, progress)
        full_default = [r for r in results if r["variant"] == "default"]
    null = null_and_reference(jobs[0][2], size)
    quality = quality_rows(jobs, results, size)
    summary = summarize(results, null, quality, size, time.time() - t0)
    summary["kept"] = sum(r["kept"] for r in results)
    summary["pipeline_check"] = size_name.endswith("smoke")
    summary["horizon"] = horizon_report.build(results, full_default, quality, size, plateau)
    summary["mechanism"] = horizon_report.mechanism(results)
    summary["figures"] = {k: str(v) for k, v in make_figures(summary, results, study_dir / "figures").items()}
    summary["figures"] |= {k: str(v) for k, v in horizon_report.figures(summary, study_dir / "figures").items()}
    if summary["pipeline_check"]:  # every figure of the study, the runs' own included
        from experiments.studies.pipeline_check import label_figures

        label_figures(study_dir)
    summary["runs"] = [{k: v for k, v in r.items() if k not in ("rounds", "clients")} for r in results]
    from fl_ietagc.runs.checkpoints import atomic_write_bytes, atomic_write_json

    atomic_write_json(study_dir / "results.json", summary)
    table = to_markdown(summary)
    atomic_write_bytes(study_dir / "comparison.md", lambda f: f.write((table + "\n").encode()))
    more = horizon_report.to_markdown(summary)
    atomic_write_bytes(study_dir / "horizon.md", lambda f: f.write((more + "\n").encode()))
    print(table + "\n\n" + more)
    print(
        f"results: {study_dir / 'results.json'}  tables: {study_dir / 'comparison.md'}, {study_dir / 'horizon.md'}"
        f"  figures: {study_dir / 'figures'}",
        flush=True,
    )
    return summary
