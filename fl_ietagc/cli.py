"""`fl-ietagc`: the project's commands that need no Flower.

    fl-ietagc centralized [--config FILE.toml] [--run-config "k=v ..."] [--match-federated K] [--agc]
    fl-ietagc evaluate RUN_DIR [options]   # samples -> memorization (MQ, 1/3, Carlini, null) + FID -> report;
                                           # latent-t2i runs: generations from training captions -> copy
                                           # scores (SSCD or fallbacks, null) + CLIP score -> report
    fl-ietagc compare RUN_DIR ...          # one table of the evaluated runs, relative to the first
    fl-ietagc export RUN_DIR OUT           # the global model as a diffusers pipeline directory
    fl-ietagc metrics RUN_DIR              # per-round metrics as JSON lines (or TensorBoard events)
    fl-ietagc resume RUN_DIR [--backend-config JSON] [--ray-address HOST:PORT]
                                           # continue a killed / failed / interrupted run
    fl-ietagc config                       # print every run-config key, default and meaning

Run-config values use the same names and syntax as the Flower app (`flwr run -c`); `centralized`
turns AGC off unless `--agc` is given (the "AGC alone" ablation).
"""

from __future__ import annotations

import argparse
import signal
import sys

from fl_ietagc.settings.argcheck import refuse_repeated
from fl_ietagc.settings.config import (
    ConfigError,
    RunConfig,
    check_resumed_config,
    config_keys,
    defaults_as_toml,
    keys_as_markdown,
    load_config_file,
    load_overrides,
    parse_config,
    toml_value,
)
from fl_ietagc.settings.console import closed_stdout_is_quiet

# Each command imports what it runs when it runs: the wings that train, evaluate or export load torch and diffusers
# (seconds), validate.py a dozen modules (a tenth of a start); `fl-ietagc --help`, `config` or a refused option
# need none of them.


def main(argv=None) -> int:
    """Console script `fl-ietagc`."""
    return closed_stdout_is_quiet(_main, argv)


def _main(argv=None) -> int:
    parser = build_parser()
    refuse_repeated(parser, argv, "fl-ietagc")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"fl-ietagc: invalid run config: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-ietagc")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "centralized",
        aliases=["baseline"],
        help="centralized training: one model on all data (AGC off: default training; --agc: AGC "
        "alone). `baseline` is its old name",
    )
    b.add_argument("--config", help="TOML file of run-config keys")
    b.add_argument("--run-config", help='"key=value ..." overrides')
    b.add_argument(
        "--match-federated",
        type=int,
        default=0,
        metavar="K",
        help="train exactly as many steps as a K-client federated run of this config",
    )
    b.add_argument("--agc", action="store_true", help="keep AGC on (the 'AGC alone' ablation)")
    b.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this centralized run")
    r = sub.add_parser(
        "resume",
        help="continue a killed, failed or interrupted run (federated or centralized) "
        "from its last completed round, with the config it was started with",
    )
    r.add_argument("run_dir")
    r.add_argument(
        "--backend-config",
        default=None,
        help="federated runs: Ray client resources (JSON, as for flower-simulation); default: the run's own",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="federated runs: attach to this Ray cluster (HOST:PORT), "
        "as flower-simulation --ray-address; default: $RAY_ADDRESS",
    )
    r.add_argument(
        "--print-config",
        action="store_true",
        help="only print the run config that continues the run (TOML, with resume-from), for `flwr run -c FILE`",
    )
    e = sub.add_parser(
        "evaluate",
        argument_default=argparse.SUPPRESS,
        help="memorization and quality of a run's global model; writes results.json and report.html "
        "into the run directory",
        description="Options marked (pixel) or (latent-t2i) apply to that kind of run only; giving one "
        "to the other kind of run is an error.",
    )
    e.add_argument("run_dir")
    e.add_argument("--num-samples", type=int, help="(pixel) generated images (default 1024; paper: 65536)")
    e.add_argument("--sampler", choices=("ddim", "ddpm"), help="(pixel) ddim (n steps, default) or ddpm (all T)")
    e.add_argument("--steps", type=int, help="DDIM steps (default 50, as the paper)")
    e.add_argument("--weights", choices=("raw", "ema"), help="raw (default; the paper evaluates raw weights) or ema")
    e.add_argument("--round", type=int, help="evaluate this round's checkpoint (default: final)")
    e.add_argument("--seed", type=int, help="default 0")
    e.add_argument("--batch-size", type=int, help="sampling batch (default 256 pixel, 8 latent-t2i)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    e.add_argument("--k", type=int, help="(pixel) neighbours for MQ / Carlini (default 50)")
    e.add_argument(
        "--fid-weights",
        help="(pixel) Inception weights file (else $FL_IETAGC_INCEPTION_WEIGHTS, the "
        "torch hub cache, or a download when online)",
    )
    e.add_argument("--quality", help="(pixel) comma list of fid, isc, kid, prc (default fid)")
    e.add_argument("--no-fid", action="store_true", help="(pixel) skip quality metrics")
    e.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="(pixel) sampling precision (default: the run's precision key; channels-last/compile follow the run)",
    )
    e.add_argument(
        "--memorized-tau",
        type=float,
        help="(pixel) MQ threshold deciding 'memorized' training images for the loss-by-timestep figure (default 0.2)",
    )
    e.add_argument(
        "--num-captions",
        type=int,
        help="(latent-t2i) training captions to generate from, a subset drawn with --seed (default 256; 0 = all)",
    )
    e.add_argument("--seeds-per-caption", type=int, help="(latent-t2i) generations per caption (default 4)")
    e.add_argument(
        "--guidance-scale", type=float, help="(latent-t2i) classifier-free guidance scale (default 7.5; 1 = unguided)"
    )
    e.add_argument(
        "--sscd",
        metavar="PATH",
        help="(latent-t2i) local SSCD TorchScript model (e.g. "
        "sscd_disc_mixup.torchscript.pt) for the copy score; without it "
        "the score is latent-cosine (a fallback, named so)",
    )
    e.add_argument(
        "--clip-dir",
        metavar="DIR",
        help="(latent-t2i) local CLIPModel + CLIPProcessor folder: CLIP score "
        "of the generations (without it: not measured)",
    )
    e.add_argument("--out", help="write results and report here instead of the run directory")
    x = sub.add_parser(
        "export",
        help="write the run's global model as a diffusers pipeline directory "
        "(DDIMPipeline.from_pretrained(OUT) samples it)",
    )
    x.add_argument("run_dir")
    x.add_argument("out")
    x.add_argument("--weights", choices=("raw", "ema"), default="raw", help="raw (as evaluate) or EMA weights")
    x.add_argument("--round", type=int, default=None, help="this round's checkpoint (default: the final one)")
    m = sub.add_parser(
        "metrics",
        help="a run's per-round metrics as JSON lines (stdout), or as TensorBoard "
        "event files with --tensorboard DIR (needs the tensorboard extra)",
    )
    m.add_argument("run_dir")
    m.add_argument("--tensorboard", default=None, metavar="DIR", help="write event files here")
    c = sub.add_parser("compare", help="compare evaluated runs (relative to the first)")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default=".", help="directory for comparison.md / comparison.json")
    k = sub.add_parser("config", help="list the run-config keys")
    k.add_argument("--toml", action="store_true", help="as the pyproject [tool.flwr.app.config] table")
    k.add_argument("--markdown", action="store_true", help="as the README table rows")
    k.add_argument(
        "--check",
        metavar="RUN_CONFIG",
        action="append",
        default=None,
        help="parse and validate a --run-config / -c argument ('k=v ...' or a .toml file) strictly; "
        "exit 2 naming what is wrong (scripts/flwr-run.sh checks its -c arguments with this)",
    )
    return p


def load_run_config(config_file: str | None, overrides: str | None, **forced) -> RunConfig:
    raw = {}
    if config_file:
        raw.update(load_config_file(config_file))
    raw.update(forced)
    raw.update(load_overrides(overrides))
    return parse_config(raw)


def cmd_config(args) -> int:
    """List the run-config keys (plain, --toml, --markdown), or check --check arguments strictly."""
    if args.check is not None:
        raw = {}
        for text in args.check:
            items = load_overrides(text)
            twice = sorted(set(items) & set(raw))
            if twice:  # (which one was meant?)
                raise ConfigError(f"--check {text!r}: {', '.join(twice)} also given in an earlier --check")
            raw.update(items)
        parse_config(raw)
        return 0
    if args.toml or args.markdown:
        print(defaults_as_toml() if args.toml else keys_as_markdown(), end="")
        return 0
    for f in config_keys():
        print(f"{f.metadata['key']:18s} {f.default!r:12}  {f.metadata['help']}")
    return 0


def cmd_centralized(args) -> int:
    """Train one model on all data (or continue such a run with --resume); AGC off unless --agc."""
    from fl_ietagc.loops.centralized import run_centralized
    from fl_ietagc.validate import validate_run

    if args.resume:
        cfg = resume_config(args.resume, load_overrides(args.run_config), kind="centralized")
    else:
        forced = {} if args.agc else {"agc": False}
        cfg = load_run_config(args.config, args.run_config, **forced)
        if not args.agc and cfg.agc:
            raise ConfigError("agc = true: use --agc for a centralized run with AGC")
        if args.agc and not cfg.agc:  # (agc defaults to true: false here was set by the user)
            raise ConfigError("agc = false contradicts --agc; give one of them")
    if args.match_federated < 0:
        raise ConfigError(f"--match-federated = {args.match_federated}: must be >= 0")
    validate_run(cfg.replace(**{"resume-from": args.resume or ""}), args.match_federated)
    return _finish(
        lambda: run_centralized(cfg, match_federated=args.match_federated, resume=args.resume), "centralized"
    )


def resume_config(run_dir: str, overrides: dict, kind: str | None = None) -> RunConfig:
    """The config a run was started with (from its config.json); `overrides` may only repeat it."""
    from fl_ietagc.runs.rundir import RunDir

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise ConfigError(f"resume: {run_dir} is not a run directory (no config.json)")
    stored = run.read_config()
    if kind and stored.get("kind") != kind:
        raise ConfigError(f"resume: {run.path} is a {stored.get('kind')} run, not a {kind} one")
    cfg = parse_config({k: v for k, v in stored.items() if k in RunConfig().to_dict()})
    check_resumed_config("resume", stored, overrides)
    return cfg


def cmd_resume(args) -> int:
    """Continue a run from its last completed round: a centralized one here, a federated one through the app's
    simulation launcher; --print-config only prints the config that continues it."""
    from fl_ietagc.runs.rundir import RunDir

    run = RunDir.check_resumable(args.run_dir)
    kind = run.read_config().get("kind")
    if args.print_config:
        conf = {**resume_config(args.run_dir, {}).to_dict(), "resume-from": str(run.path)}
        print("".join(f"{k} = {toml_value(v)}\n" for k, v in conf.items()), end="")
        return 0
    if kind == "centralized":
        from fl_ietagc.loops.centralized import run_centralized
        from fl_ietagc.validate import validate_run

        cfg = resume_config(args.run_dir, {})
        for option in ("backend_config", "ray_address"):
            if getattr(args, option):
                raise ConfigError(f"--{option.replace('_', '-')}: {run.path} is a centralized run (no Ray)")
        validate_run(cfg.replace(**{"resume-from": str(run.path)}), 0)  # weights and state before training
        return _finish(lambda: run_centralized(cfg, resume=args.run_dir), "resume")
    backend = args.backend_config or (
        run.read_config().get("backend_config") or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    )
    # A federated run continues under flower-simulation's launcher. It lives in the Flower app (experiments/ sits
    # above fl_ietagc/, which never imports it), a folder that an installed wheel ships as data: app_module puts
    # that folder on sys.path and imports the launcher from it by name, as Flower loads the app's components.
    from fl_ietagc.app_dir import app_module  # (pathlib: a few ms of every `fl-ietagc` start)

    simulate = app_module("experiments.launch.simulate")
    return simulate.launch(backend=backend, resume=str(run.path), ray_address=args.ray_address)


def _finish(work, what: str) -> int:
    """Run `work` (returns a RunDir); exit 1 with the run's one-line error if it fails, 130 on Ctrl-C."""

    def terminate(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, terminate)  # SIGTERM stops a run as Ctrl-C does: marked interrupted
    try:
        run = work()
    except KeyboardInterrupt:
        print(f"fl-ietagc {what}: interrupted", file=sys.stderr)
        return 130
    except ConfigError:
        raise
    except Exception as e:
        from fl_ietagc.federation.protocol import one_line  # (loads numpy)

        print(f"fl-ietagc {what}: run FAILED: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{what} done: {run.path}")
    return 0


PIXEL_ONLY = ("num_samples", "sampler", "k", "fid_weights", "quality", "no_fid", "precision", "memorized_tau")
T2I_ONLY = ("num_captions", "seeds_per_caption", "guidance_scale", "sscd", "clip_dir")


def cmd_evaluate(args) -> int:
    """Dispatch on the run's model-type (pixel: evaluate.py, latent-t2i: t2i_evaluate.py); options are checked
    against the kind of run first, then every check of that kind runs before any sampling: bad input exits 2."""
    from fl_ietagc.evaluation.evaluate import EvalOptions, evaluate_run, prepare
    from fl_ietagc.evaluation.t2i_evaluate import MODEL_TYPE, T2IOptions, evaluate_t2i, prepare_t2i, run_model_type

    given = {k: v for k, v in vars(args).items() if k not in ("command", "run_dir")}
    try:
        t2i = run_model_type(args.run_dir) == MODEL_TYPE
        wrong = [k for k in (PIXEL_ONLY if t2i else T2I_ONLY) if k in given]
        if wrong:
            raise ValueError(
                f"{', '.join('--' + k.replace('_', '-') for k in wrong)}: only for "
                f"{'pixel' if t2i else MODEL_TYPE} runs; {args.run_dir} is a "
                f"{MODEL_TYPE if t2i else 'pixel'} run"
            )
        options = {("server_round" if k == "round" else k): v for k, v in given.items()}
        if t2i:
            opts, prepare, evaluate = T2IOptions(**options), prepare_t2i, evaluate_t2i
        else:
            if "no_fid" in options:
                options["fid"] = not options.pop("no_fid")
            if "quality" in options:
                options["quality"] = tuple(q.strip() for q in options["quality"].split(",") if q.strip())
            opts, evaluate = EvalOptions(**options), evaluate_run
        plan = prepare(args.run_dir, opts)
    except (ValueError, OSError) as e:
        print(f"fl-ietagc evaluate: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        results = evaluate(args.run_dir, opts, plan=plan)
    except (ValueError, OSError) as e:
        print(f"fl-ietagc evaluate: FAILED: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(_t2i_summary(results) if t2i else _pixel_summary(results))
    out = given.get("out") or results["run"]
    print(f"results: {out}/results.json | report: {out}/report.html")
    return 0


def _fid_text(quality: dict) -> str:
    """FID's value, or 'not computed (why)': the reason the report gives, in one line."""
    if quality.get("computed", True) and "fid" in quality:
        return f"{quality['fid']}"
    return f"not computed ({' '.join(str(quality.get('reason', 'no reason recorded')).split())})"


def _t2i_summary(results: dict) -> str:
    """One line: copy scores of the generations against their null, and the CLIP score."""
    mem, null, clip = results["memorization"], results["null"], results["clip_score"]
    null_mean = f"{null['mean_top1']:.3f}" if "mean_top1" in null else "not measured"
    return (
        f"{mem['embedder']}: mean top-1 similarity {mem['mean_top1']:.3f} (null {null_mean}) | "
        f"> {mem['threshold']}: {mem['count_above']}/{mem['num_generations']} | nearest is its caption's "
        f"image: {100 * mem['fraction_nearest_own_caption']:.1f}% | CLIP score: "
        f"{f'{clip:.2f}' if isinstance(clip, float) else clip}"
    )


def _pixel_summary(results: dict) -> str:
    """One line: memorized counts (MQ, 1/3 rule) against their null, and FID."""
    mem, null = results["memorization"], results["null"]
    return (
        f"MQ r<0.2: {mem['mq']['0.2']['count']}/{mem['num_queries']} (null "
        f"{100 * null['mq']['0.2']['fraction']:.2f}%) | 1/3 rule: {mem['one_third_rule']['count']} (null "
        f"{100 * null['one_third_rule']['fraction']:.2f}%) | FID: {_fid_text(results['quality'])}"
    )


def cmd_export(args) -> int:
    """Write the run's global model as a diffusers pipeline directory."""
    from fl_ietagc.export import export_pipeline

    try:
        out = export_pipeline(args.run_dir, args.out, args.weights, args.round)
    except (ValueError, OSError) as e:
        print(f"fl-ietagc export: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"diffusers pipeline: {out} (DDIMPipeline.from_pretrained({str(out)!r}))")
    return 0


def cmd_metrics(args) -> int:
    """A run's per-round metrics as JSON lines, or as TensorBoard event files."""
    from fl_ietagc.runs.metrics_export import metrics_main

    return metrics_main(args.run_dir, args.tensorboard)


def cmd_compare(args) -> int:
    """One table of evaluated runs, relative to the first: printed, and written to --out."""
    from fl_ietagc.evaluation.compare import compare, to_markdown, write_comparison

    try:
        table = compare(args.run_dirs)
    except (ValueError, OSError) as e:  # a missing, corrupt or incomplete results.json, named
        print(f"fl-ietagc compare: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    print(f"written: {write_comparison(table, args.out)}")
    return 0


COMMANDS = {
    "centralized": cmd_centralized,
    "baseline": cmd_centralized,  # centralized's old name
    "resume": cmd_resume,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "metrics": cmd_metrics,
    "compare": cmd_compare,
    "config": cmd_config,
}


if __name__ == "__main__":
    sys.exit(main())
