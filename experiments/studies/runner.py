"""A study's runs, one after another: every run checked first, each trained through the real app (simulation or
centralized), evaluated, then one comparison table; a killed study resumes where it stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from experiments.launch import simulate
from experiments.studies.pipeline_check import NOTE, label_figures
from experiments.studies.plans import RunSpec, base_config, estimate, plan, print_estimate
from fl_ietagc.settings.config import ConfigError, ineffective_keys, parse_config
from fl_ietagc.validate import validate_run

# fl-ietagc-study imports this module at start-up: training and evaluation import the wings they run (torch,
# diffusers: seconds) when they run.


def run_study(
    study: str,
    size: str,
    out: Path,
    *,
    data_root: str = "",
    fid_weights: str | None = None,
    gpus_per_client: float = 0.5,
    pretrained: str = "",
    eval_samples: int | None = None,
    dry_run: bool = False,
) -> Path | None:
    from fl_ietagc.evaluation.compare import compare, to_markdown, write_comparison
    from fl_ietagc.evaluation.evaluate import EvalOptions, evaluate_run

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
        raise ConfigError("--pretrained: finetune --full needs a diffusers UNet directory or a checkpoint")
    if study == "finetune" and pretrained:
        base["init-checkpoint"] = pretrained
    backend = (
        {"client_resources": {"num_cpus": 1}}
        if smoke
        else {"client_resources": {"num_cpus": 2, "num_gpus": gpus_per_client}}
    )
    # every check before the study directory exists: refused input leaves nothing behind
    validate_study(runs, study_dir, base, backend)
    if own_pretrained:
        validate_study([RunSpec("pretrained", 0, {"sample-count": 0})], study_dir, base, {})
    if fid_weights:
        from fl_ietagc.evaluation.inception_quality import InceptionWeightsError, preflight_weights

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
        evaluate_run(
            study_dir / r.name,
            EvalOptions(
                num_samples=eval_samples,
                steps=eval_steps,
                fid=fid_weights is not None or not smoke,
                fid_weights=fid_weights,
                loss_images=16 if smoke else 64,
            ),
            progress=not smoke,
        )
        print(f"[{r.name}] trained and evaluated in {time.time() - t0:.0f}s", flush=True)
    table = compare([str(study_dir / r.name) for r in runs])
    if smoke:  # in the table and in every figure: smoke numbers are a pipeline check, not a finding
        table["note"] = NOTE
        label_figures(study_dir)
    path = write_comparison(table, study_dir)
    print(to_markdown(table))
    print(f"comparison: {path}")
    return path


def validate_study(runs: list[RunSpec], study_dir: Path, base: dict, backend: dict) -> None:
    """Every run's config, data and resources, before the first run trains (ConfigError naming the run)."""
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
        warnings.update(dict.fromkeys(ineffective_keys(cfg)))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)


def train_run(r: RunSpec, study_dir: Path, base: dict, backend: dict, smoke: bool) -> None:
    """Train one run of a study: skipped when it completed before, resumed when it was killed, failed or
    interrupted, started otherwise."""
    from fl_ietagc.loops.centralized import run_centralized
    from fl_ietagc.runs.rundir import RunDir

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
        code = (
            simulate.launch(backend=backend, resume=str(run.path))
            if resume
            else simulate.launch(conf, r.clients, backend)
        )
        if code:
            raise SystemExit(f"[{r.name}] federated run failed (exit {code}); run the study again to resume it")
    else:
        run_centralized(
            parse_config({**conf, "agc": r.centralized_agc}),
            match_federated=r.match_federated,
            progress=not smoke,
            resume=str(run.path) if resume else None,
        )


def _smoke_pretrained(study_dir: Path, base: dict) -> Path:
    """The smoke finetune starts from a small centralized model trained here (no download needed)."""
    train_run(RunSpec("pretrained", 0, {"sample-count": 0}), study_dir, base, {}, smoke=True)
    return study_dir / "pretrained" / "checkpoints" / "final.pt"
