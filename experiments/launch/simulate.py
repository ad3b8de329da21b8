"""`flower-simulation`: run a Flower app in the foreground with Flower's Simulation Runtime (Ray).

Flower 1.27 removed the `flower-simulation` command; this one takes its flags and runs the app on Flower's
Simulation Runtime through `flwr.simulation.run_simulation._run_simulation`, the function Flower's own
`flwr-simulation` process runs for `flwr run` (not the deprecated public `run_simulation`, which only warns and
calls it; why not a SuperLink of our own: experiments/launch/simulation_runtime.py):

    flower-simulation --app . --num-supernodes 4 \\
        --backend-config '{"client_resources": {"num_cpus": 1, "num_gpus": 0.25}}' \\
        --run-config 'num-server-rounds=5 agc-lambda=2.0'

The app's `[tool.flwr.app.config]` defaults, fused with `--run-config` (a "k=v ..." string or a .toml file) the
way `flwr run` fuses them, are given to the ServerApp and every ClientApp through a thin wrapper around each. The
config and the backend config (client resources this machine can grant, `init_args` that `ray.init` takes) are
validated before anything starts. Unlike `flwr run --stream`, a failed run (a client raising, a server error)
ends this command with exit status 1 and the error printed.

The simulation runs in a child process group that this process supervises: Ctrl-C/SIGTERM stop it within
seconds (the run marked interrupted); when the backend fails under a living ServerApp (Ray failing to start or
import, an empty actor pool), the child reports the cause and ends at once instead of waiting for the ServerApp,
and the run is marked failed with that cause in one line (the traceback in the run's
logs/simulation-backend.log); nothing of the group is left running.

`--ray-address HOST:PORT` (or `RAY_ADDRESS` in the environment) runs the clients on an existing Ray cluster
(`ray start --head --port PORT` on one machine, `ray start --address HOST:PORT` on the others) instead of a
private Ray instance: the address is checked before anything starts, and `init_args` `num_cpus`/`num_gpus` are
dropped (Ray refuses them when attaching; the cluster's nodes bring their own resources).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from experiments.launch import simulation_runtime
from fl_ietagc.app_dir import app_dir as default_app
from fl_ietagc.app_dir import check_app_project
from fl_ietagc.settings.argcheck import refuse_repeated
from fl_ietagc.settings.config import ConfigError, RunConfig, check_resumed_config, load_overrides, parse_config

# `flower-simulation --help` and refused input answer before Flower, torch (runs/, which the run-directory
# helpers come from), numpy (federation/protocol) or validate.py's dozen modules load: those are imported where used.

QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flower-simulation", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--app",
        default=None,
        help="app directory (with pyproject.toml); default: this package's app "
        "(the source checkout, or fl_ietagc/app/ of an installed wheel)",
    )
    p.add_argument(
        "--num-supernodes",
        type=int,
        default=None,
        help="number of SuperNodes = clients = shards (K); with --resume, the run's own",
    )
    p.add_argument(
        "--backend-config",
        default="{}",
        help='JSON, e.g. \'{"client_resources": {"num_cpus": 1, "num_gpus": 0.5}, "init_args": {}}\'',
    )
    p.add_argument("--run-config", default=None, help='"key=value key2=value" or a .toml file')
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue this run (killed, failed or interrupted) from its last completed round, with "
        "the config it was started with",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="attach to this running Ray cluster (its head's `ray start --head --port`) instead of "
        "starting a private Ray instance; default: $RAY_ADDRESS if set",
    )
    p.add_argument("--verbose", action="store_true", help="DEBUG logging")
    p.add_argument("--run-config-json", default=None, help=argparse.SUPPRESS)  # parent -> child: the fused config

    refuse_repeated(p, argv)  # --run-config a --run-config b: exit 2
    return p.parse_args(argv)


def parse_backend_config(text: str) -> dict:
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--backend-config is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError("--backend-config must be a JSON object")

    def norm(d):  # the old CLI accepted "client-resources" for "client_resources"
        return {k.replace("-", "_"): norm(v) if isinstance(v, dict) else v for k, v in d.items()}

    cfg = norm(raw)
    for key in ("client_resources", "init_args", "actor"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"--backend-config {key}: must be a JSON object")
    unknown = set(cfg) - {"client_resources", "init_args", "actor"}
    if unknown:
        raise ConfigError(
            f"unknown --backend-config key(s) {sorted(unknown)}; allowed: client_resources, init_args, actor"
        )
    return cfg


def load_app_config(app_dir: Path, overrides: dict) -> tuple[dict, dict]:
    """(components, fused run config) of the app: the pyproject's defaults with `overrides` on top, as
    `flwr run` fuses them (but strict: Flower's own parser silently drops items it cannot read)."""
    from flwr.common.config import get_project_config

    project = get_project_config(app_dir)
    components = project["tool"]["flwr"]["app"]["components"]
    fused = {**project["tool"]["flwr"]["app"].get("config", {}), **overrides}
    parse_config(fused)  # unknown keys, types and ranges, before anything starts
    return components, fused


def load_object(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def with_run_config(server_app, client_app, run_config: dict):
    """New Server/ClientApp that call the app's own ones with `run_config` in the Context."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    def configured(ctx: Context) -> Context:
        return Context(
            run_id=ctx.run_id,
            node_id=ctx.node_id,
            node_config=ctx.node_config,
            state=ctx.state,
            run_config={**ctx.run_config, **run_config},
        )

    client = ClientApp()

    def forward(msg, ctx):
        return client_app(msg, configured(ctx))

    for register in (client.train, client.evaluate, client.query):
        register()(forward)

    server = ServerApp()

    @server.main()
    def _main(grid, ctx):
        server_app(grid, configured(ctx))

    return server, client


RAY_INIT_RESOURCES = ("num_cpus", "num_gpus")  # ray.init args Ray refuses when attaching to a cluster


def check_ray_address(address: str, flag: str = "--ray-address") -> str:
    """`address` if a Ray cluster's head (its GCS) accepts connections there; else ConfigError, one line."""
    import socket  # (as subprocess in supervise: milliseconds that `flower-simulation --help` need not wait)

    if "://" in address:
        raise ConfigError(
            f"{flag} {address}: give the head's HOST:PORT (the GCS address of `ray start --head "
            f"--port PORT`), not a {address.split('://')[0]}:// URL"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {address}: expected HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(
            f"{flag} {address}: no Ray cluster answers there ({e.strerror or e}); start its head with "
            f"`ray start --head --port {port}` or fix the address"
        ) from None
    return address


def attach_backend(backend: dict, address: str | None) -> dict:
    """The backend config for a run attached to the cluster at `address` (None: unchanged)."""
    if not address:
        return backend
    init = dict(backend.get("init_args") or {})
    dropped = sorted(k for k in RAY_INIT_RESOURCES if k in init)
    if dropped:
        print(
            f"flower-simulation: attached to the Ray cluster at {address}: init_args {', '.join(dropped)} "
            f"ignored (the cluster's nodes bring their own resources)",
            file=sys.stderr,
        )
    for k in dropped:
        del init[k]
    return {**backend, "init_args": init} if "init_args" in backend else backend


def validate_before_start(
    run_config: dict, num_supernodes: int, backend: dict | None = None, ray_address: str | None = None
) -> None:
    """Fail fast, before Ray starts: the one validation pass (parse_config, then fl_ietagc/validate.py)."""
    from fl_ietagc.validate import validate_run

    cfg = parse_config(run_config)
    if cfg.num_clients and cfg.num_clients != num_supernodes:
        raise ConfigError(f"num-clients = {cfg.num_clients} but --num-supernodes = {num_supernodes}")
    validate_run(cfg, num_supernodes, backend, ray_address=ray_address)


def resume_run_config(run_dir: str, overrides: dict, num_supernodes: int | None) -> tuple[dict, int]:
    """(run config, K) to continue `run_dir`: its own config; `overrides` must not change it."""
    from fl_ietagc.runs.rundir import RunDir

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    stored = run.read_config()
    if stored.get("kind") != "federated":
        raise ConfigError(f"--resume {run_dir}: a {stored.get('kind')} run; continue it with fl-ietagc resume")

    keys = RunConfig().to_dict()
    config = {k: stored[k] for k in keys if k in stored}
    check_resumed_config("--resume", stored, overrides)
    k = int(stored["num_clients"])
    if num_supernodes not in (None, k):
        raise ConfigError(f"--num-supernodes = {num_supernodes}: the run has {k} clients")
    return {**config, "resume-from": str(run.path)}, k


def warn_about_gpus(backend: dict) -> None:
    try:
        import torch
    except ImportError:
        return
    gpus = float(backend.get("client_resources", {}).get("num_gpus", 0.0))
    if torch.cuda.is_available() and gpus == 0:
        print(
            "flower-simulation: CUDA GPUs are visible but client_resources.num_gpus = 0, so Ray hides them "
            "from the clients, which will train on CPU. Give each client a share, e.g. "
            '\'{"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}\'.',
            file=sys.stderr,
        )


CHILD_ENV = "FL_IETAGC_SIMULATION_CHILD"  # set in the process that runs the simulation
BACKEND_ENV = "FL_IETAGC_BACKEND_CONFIG"  # the backend config, recorded in the run's config.json
STOP_GRACE_S = 15
STOP_SIGNAL = signal.SIGUSR1  # parent -> child: "stop now" (Ray's driver handles SIGTERM itself, and aborts)


def main(argv=None) -> int:
    """`flower-simulation`: validate everything, then run the simulation in a child process (its own process
    group) and wait.

    Exit status: 0 completed, 1 the run failed, 2 bad input (nothing started), 130 / 143 interrupted by
    SIGINT / SIGTERM (the run is marked interrupted; `fl-ietagc resume RUN_DIR` continues it)."""
    return _launch(parse_args(argv))


def launch(
    run_config: dict | None = None,
    num_supernodes: int | None = None,
    backend: dict | str | None = None,
    *,
    resume: str | None = None,
    ray_address: str | None = None,
    app: str | None = None,
    verbose: bool = False,
) -> int:
    """The one Python entry point to run a federated simulation (the CLI, the studies and `fl-ietagc resume` use
    it): `flower-simulation` with these arguments, run-config keys as a dict, the backend config as a dict or
    its JSON text. Same validation, same exit status."""
    backend_config = backend if isinstance(backend, str) else json.dumps(backend or {})
    return _launch(
        argparse.Namespace(
            app=app,
            num_supernodes=num_supernodes,
            backend_config=backend_config,
            run_config=None,
            overrides=dict(run_config or {}),
            resume=resume,
            ray_address=ray_address,
            verbose=verbose,
            run_config_json=None,
        )
    )


def _launch(args: argparse.Namespace) -> int:
    for k, v in QUIET_FLOWER_ENV.items():
        os.environ.setdefault(k, v)

    try:
        app_dir, backend, components, run_config, k, ray_address = prepare(args)
    except ConfigError as e:
        print(f"flower-simulation: invalid input: {e}", file=sys.stderr)
        return 2
    if not ray_address:
        warn_about_gpus(backend)
    if not os.environ.get(CHILD_ENV):
        try:  # (looked up at call time: tests swap check_runtime)
            simulation_runtime.check_runtime()  # before anything starts: the installed Flower has its runtime
        except simulation_runtime.RuntimeMismatch as e:
            print(f"flower-simulation: cannot run: {e}", file=sys.stderr)
            return 2
    if os.environ.get(CHILD_ENV):
        return run_here(app_dir, backend, components, run_config, k, args.verbose)
    return supervise(app_dir, backend, run_config, k, args.verbose, ray_address)


def prepare(args):
    app_dir = Path(args.app).resolve() if args.app else default_app()
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"--app {args.app}: no pyproject.toml there")
    check_app_project(app_dir)  # TOML, with [tool.flwr.app] and its components: else the file is named
    if args.num_supernodes is not None and args.num_supernodes < 1:
        raise ConfigError(f"--num-supernodes = {args.num_supernodes}: must be >= 1")
    if args.num_supernodes is None and not args.resume:
        raise ConfigError("--num-supernodes is required (the number of clients K)")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    backend = parse_backend_config(args.backend_config)
    ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray_address and not args.run_config_json:  # (the child: its parent has checked it)
        check_ray_address(ray_address, "--ray-address" if args.ray_address else "RAY_ADDRESS")
    backend = attach_backend(backend, ray_address)
    if args.run_config_json:
        overrides = json.loads(args.run_config_json)
    elif getattr(args, "overrides", None) is not None:  # launch(): a dict of run-config keys
        overrides = dict(args.overrides)
    else:
        overrides = load_overrides(args.run_config)
    if args.resume:
        overrides, k = resume_run_config(args.resume, overrides, args.num_supernodes)
    else:
        k = args.num_supernodes
    components, run_config = load_app_config(app_dir, overrides)
    if not args.resume and not run_config.get("num-clients"):
        run_config["num-clients"] = k  # K is known here: the ServerApp need not count SuperNodes as they register
    if not args.run_config_json:  # the child runs the config its parent has just validated
        validate_before_start(run_config, k, backend, ray_address)
    return app_dir, backend, components, run_config, k, ray_address


def supervise(
    app_dir: Path, backend: dict, run_config: dict, k: int, verbose: bool, ray_address: str | None = None
) -> int:
    """Run the simulation in a child process group; forward SIGINT/SIGTERM, and leave no process behind.

    Ray's processes (GCS, raylet, workers) are started by the child and stay in its process group, so one
    killpg ends all of them, whatever state the child is in. Attached to a cluster (`ray_address`), the child
    is only a Ray driver: the cluster's processes are not ours and stay; Ray ends this job's workers when its
    driver goes."""
    import shutil
    import subprocess
    import tempfile

    from fl_ietagc.runs.rundir import ANNOUNCE_ENV, RunDir

    argv = [
        sys.executable,
        "-m",
        "experiments.launch.simulate",
        "--app",
        str(app_dir),
        "--num-supernodes",
        str(k),
        "--backend-config",
        json.dumps(backend),
        "--run-config-json",
        json.dumps(run_config),
    ]
    if verbose:
        argv.append("--verbose")
    announce = Path(tempfile.mkdtemp(prefix="fl-ietagc-")) / "run-dir"
    env = {
        **os.environ,
        CHILD_ENV: "1",
        ANNOUNCE_ENV: str(announce),
        "PYTHONPATH": os.pathsep.join([str(app_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # Flower's ray.init() (no address) attaches to it
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    stopping: list[int] = []
    deadline = threading.Timer(STOP_GRACE_S, _signal_group, (child.pid, signal.SIGKILL))
    deadline.daemon = True

    def forward(signum, frame):
        stopping.append(signum)
        if len(stopping) > 1:  # a second signal: at once
            _signal_group(child.pid, signal.SIGKILL)
            return
        print(
            f"flower-simulation: {signal.Signals(signum).name}: stopping the run (at most {STOP_GRACE_S} s)",
            file=sys.stderr,
            flush=True,
        )
        child.send_signal(STOP_SIGNAL)  # the child marks its run interrupted and ends its process group
        deadline.start()  # if it cannot, the whole group is killed after STOP_GRACE_S

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        code = child.wait()
    finally:
        deadline.cancel()
        for s, handler in old.items():
            signal.signal(s, handler)
        _signal_group(child.pid, signal.SIGKILL)  # whatever of Ray is left (its processes share the group)
    run = RunDir(announce.read_text()) if announce.is_file() else None
    failure = read_backend_failure(backend_failure_file(announce))
    shutil.rmtree(announce.parent, ignore_errors=True)
    if failure is not None and not stopping:  # the backend failed: the child is gone, so nothing races this
        return report_failed(run, failure)
    if run is not None and run.liveness() in ("running", "stale"):  # the child could not say it itself
        if stopping:
            why = signal.Signals(stopping[0]).name
            run.mark_interrupted(why)
            print(
                f"flower-simulation: run interrupted ({why}); continue it with: fl-ietagc resume {run.path}",
                file=sys.stderr,
            )
        else:  # killed from outside (the OOM killer?) or crashed (Ray ending its driver): a failure, resumable
            died = (
                f"killed by {signal.Signals(-code).name}"
                if code < 0 and -code in signal.valid_signals()
                else f"exit {code}"
            )
            return report_failed(run, {"error": f"the simulation process died ({died})"})
    if stopping:
        return 128 + stopping[0]
    return code if code >= 0 else 1


def read_backend_failure(path: Path) -> dict | None:
    """The child's report of a backend failure (None: there was none)."""
    from fl_ietagc.runs.checkpoints import read_json

    if not path.is_file():
        return None
    try:
        report = read_json(path, "backend failure report")
    except Exception:  # noqa: BLE001 - (written atomically; unreadable still means the backend failed)
        report = None
    if not isinstance(report, dict) or not report.get("error"):
        return {"error": "simulation backend failed (its report could not be read)"}
    return report


def report_failed(run, failure: dict) -> int:
    """The one line naming the backend's failure; the run (if the ServerApp had created it) marked failed with
    it, the traceback in its logs/."""
    if run is not None and run.liveness() not in ("completed", "failed"):
        log = mark_backend_failed(run, failure)
        then = (
            f"continue it with: fl-ietagc resume {run.path}"
            if run.resume_path.is_file()
            else "it had not started training: start it again under a new run-name"
        )
        print(f"flower-simulation: run FAILED: {failure['error']} (traceback: {log}; {then})", file=sys.stderr)
    else:
        if failure.get("details"):
            print(failure["details"].rstrip(), file=sys.stderr)
        print(f"flower-simulation: run FAILED: {failure['error']}", file=sys.stderr)
    return 1


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_here(app_dir: Path, backend: dict, components: dict, run_config: dict, k: int, verbose: bool) -> int:
    """The child: run the simulation in this process. On SIGTERM/SIGINT, or when the parent dies, mark the
    run interrupted and end the whole process group (this process and Ray's). When the backend fails under a
    living ServerApp, report it to the parent (`report_backend_failure`) and end this process at once."""
    from fl_ietagc.runs.rundir import ACTIVE_RUNS

    def stop(why: str):
        for run in list(ACTIVE_RUNS):
            run.mark_interrupted(why)
            print(
                f"flower-simulation: run interrupted ({why}); continue it with: fl-ietagc resume {run.path}",
                file=sys.stderr,
                flush=True,
            )
        os.killpg(os.getpgrp(), signal.SIGKILL)

    for s in (signal.SIGINT, signal.SIGTERM, STOP_SIGNAL):
        signal.signal(
            s, lambda signum, frame: stop("SIGINT/SIGTERM" if signum == STOP_SIGNAL else signal.Signals(signum).name)
        )
    parent = os.getppid()

    def watch_parent():
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        stop("flower-simulation was killed")

    threading.Thread(target=watch_parent, daemon=True).start()
    os.environ[BACKEND_ENV] = json.dumps(backend)
    os.environ.update(ray_env(backend))
    server, client = with_run_config(
        load_object(components["serverapp"]), load_object(components["clientapp"]), run_config
    )
    try:
        simulation_runtime.run(server, client, k, backend, verbose)
    except simulation_runtime.BackendFailed as e:
        report_backend_failure(e)  # does not return
    except Exception as e:  # the ServerApp's exception, re-raised by Flower
        print(f"flower-simulation: run FAILED: {failure_line(e)}", file=sys.stderr)
        return 1
    return 0


def ray_env(backend: dict) -> dict:
    """Environment for Ray that changes nothing but silences its FutureWarning about RAY_ACCEL_ENV_VAR_OVERRIDE_ON_
    ZERO: setting it to 0 (what the warning asks) matters only for clients given no GPU on a machine with GPUs,
    whom Ray still hides the GPUs from by default; there the default (and its notice) is kept."""
    if "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" in os.environ:
        return {}
    gpus_per_client = float((backend.get("client_resources") or {}).get("num_gpus", 0) or 0)
    if gpus_per_client > 0 or not _gpus_here():
        return {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    return {}


def _gpus_here() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


BACKEND_FAILURE_WAIT_S = 60.0  # at most this long a failed backend waits for the ServerApp to begin its run directory
# (the ServerApp sets up (data, model) while Ray starts; it usually has begun well before: then the wait ends)


def report_backend_failure(failure) -> None:
    """The backend failed and the ServerApp thread waits for replies that will never come: wait (at most
    BACKEND_FAILURE_WAIT_S) until the ServerApp has its run directory, hand the cause to the supervising parent
    (which marks the run failed once this process group is gone) and end this process without waiting for the
    ServerApp thread."""
    from fl_ietagc.runs.checkpoints import atomic_write_json
    from fl_ietagc.runs.rundir import ACTIVE_RUNS, ANNOUNCE_ENV

    def begun():  # the run directory exists with its round-0 commit point (what `fl-ietagc resume` needs)
        return ACTIVE_RUNS and all(run.resume_path.is_file() for run in list(ACTIVE_RUNS))

    deadline = time.monotonic() + BACKEND_FAILURE_WAIT_S
    while not begun() and time.monotonic() < deadline and simulation_runtime.server_threads():
        time.sleep(0.1)
    report = {"error": failure.line, "details": failure.details}
    if os.environ.get(ANNOUNCE_ENV):
        atomic_write_json(backend_failure_file(Path(os.environ[ANNOUNCE_ENV])), report)
    else:  # not under a supervisor: mark the run here
        for run in list(ACTIVE_RUNS):
            mark_backend_failed(run, report)
        print(f"flower-simulation: run FAILED: {failure.line}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def backend_failure_file(announce: Path) -> Path:
    return announce.parent / "backend-failure.json"


BACKEND_LOG = "simulation-backend.log"  # in the run's logs/: Flower's and Ray's report of a backend failure


def mark_backend_failed(run, report: dict) -> Path:
    """Status failed with the cause line; the backend's traceback in logs/simulation-backend.log."""
    log = run.write_log(BACKEND_LOG, report.get("details") or report["error"])
    run.write_status(
        "failed",
        error=report["error"],
        log=str(log),
        round=run._committed_or_zero(),
        resume=f"fl-ietagc resume {run.path}",
    )
    return log


def failure_line(exc: BaseException) -> str:
    """The ServerApp's own error (Flower wraps it), in one line."""
    from fl_ietagc.federation.protocol import one_line

    while exc.__cause__ is not None and ("Ending simulation" in str(exc) or "Simulation Runtime crashed" in str(exc)):
        exc = exc.__cause__
    return f"{type(exc).__name__}: {one_line(str(exc)) if str(exc) else ''}"


if __name__ == "__main__":
    sys.exit(main())
