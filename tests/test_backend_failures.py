"""The simulation backend failing never hangs `flower-simulation`, and what can be checked up front is refused.

Up front (no process started): a backend config Ray could never serve (num_cpus < 1, more GPUs per client than
exist, an init_args keyword ray.init does not take), a run-config path that is a named pipe, a Flower whose
Simulation Runtime is not the one this command was written for.

Injected at run time (validation bypassed, or a Ray that cannot be imported): the command ends within a bound with
exit status 1 and one line naming the cause, status.json "failed" with that line, the traceback in the run's
logs/simulation-backend.log, and no process of the simulation left (every process it started carries a tag in its
environment, looked for in /proc afterwards).
"""

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from experiments.launch import simulate, simulation_runtime
from fl_ietagc import validate
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, load_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "max-images=64 batch-size=32 local-epochs=1 num-server-rounds=1 diffusion-steps=20 sample-count=2 "
    'sample-steps=2 device="cpu"'
)
BOUND_S = 150  # a whole failing run, start-up included, on 2 busy cores; a hang never ends


@pytest.fixture
def nothing_starts(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError(f"a process started for bad input: {a[:1]}")

    monkeypatch.setattr(simulate, "supervise", forbidden)  # (not subprocess.Popen: importing Ray subclasses it)
    monkeypatch.setattr(simulate, "run_here", forbidden)


@pytest.mark.parametrize(
    "backend,message",
    [
        ('{"client_resources": {"num_cpus": 0}}', r"client_resources.num_cpus = 0: must be >= 1"),
        ('{"client_resources": {"num_cpus": 0.5}}', r"client_resources.num_cpus = 0.5: must be >= 1"),
        (
            '{"client_resources": {"num_cpus": 1}, "init_args": {"num_cpu": 2}}',
            r"init_args: num_cpu not a keyword of ray.init; allowed: .*num_cpus",
        ),
        (
            '{"client_resources": {"num_cpus": 1}, "init_args": {"runtime_env": {}}}',
            r"init_args.runtime_env: not allowed here \(Flower sets it\)",
        ),
        (
            '{"client_resources": {"num_cpus": 1}, "init_args": {"address": "auto"}}',
            r"init_args.address: not allowed here \(use --ray-address HOST:PORT\)",
        ),
        (
            '{"client_resources": {"num_cpus": 1, "num_gpus": 1}}',
            r"client_resources.num_gpus = 1: (no CUDA GPU is "
            r"visible here|must be <= \d+)",
        ),
    ],
    ids=[
        "num_cpus-0",
        "num_cpus-fraction",
        "init_args-unknown",
        "init_args-runtime_env",
        "init_args-address",
        "gpus-beyond-this-machine",
    ],
)
def test_a_backend_ray_could_not_serve_is_refused_before_anything_starts(
    backend, message, tmp_path, nothing_starts, capsys
):
    if "num_gpus" in backend:
        import torch

        if torch.cuda.device_count() >= 1:
            backend = backend.replace('"num_gpus": 1', f'"num_gpus": {torch.cuda.device_count() + 1}')
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--backend-config",
            backend,
            "--run-config",
            f'output-dir="{tmp_path}" {TINY}',
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert lines[0].startswith("flower-simulation: invalid input: --backend-config ")
    assert list(tmp_path.iterdir()) == []


def test_ray_init_keywords_are_the_installed_rays():
    keys = validate.ray_init_keywords()
    assert {
        "num_cpus",
        "num_gpus",
        "logging_level",
        "log_to_driver",
        "object_store_memory",
        "_temp_dir",
        "_system_config",
        "object_spilling_directory",
    } <= keys
    assert "address" not in keys and "kwargs" not in keys  # (positional / the catch-all)
    validate.check_ray_init_args({"num_cpus": 2, "_temp_dir": "/tmp/x", "logging_level": 30})  # accepted


def test_a_run_config_that_is_a_named_pipe_is_refused_without_reading_it(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the path is checked, never opened."""
    results = {}
    for name in ("pipe.toml", "pipe"):
        fifo = tmp_path / name
        os.mkfifo(fifo)

        def load():
            try:
                load_overrides(str(fifo))
            except ConfigError as e:
                results[name] = str(e)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():  # release the blocked open() before failing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"--run-config {fifo} blocked on reading the pipe")
    assert results == {
        "pipe.toml": f"config file {tmp_path}/pipe.toml: a named pipe (FIFO), not a TOML file",
        "pipe": f"run-config '{tmp_path}/pipe': neither key=value items nor an existing .toml file",
    }


def test_the_runtime_is_flowers_non_deprecated_one_and_a_changed_flower_is_refused(monkeypatch, tmp_path, capsys):
    import importlib
    import warnings

    module = importlib.import_module("flwr.simulation.run_simulation")  # (the package re-exports a function so named)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert simulation_runtime.check_runtime() is module._run_simulation

    def changed(num_supernodes, client_app=None, server_app=None):
        pass

    monkeypatch.setattr(module, "_run_simulation", changed)
    with pytest.raises(
        simulation_runtime.RuntimeMismatch,
        match=r"flwr \S+: flwr.simulation.run_simulation."
        r"_run_simulation lacks exit_event, backend_name, backend_config, verbose_logging; "
        r"flower-simulation needs flwr 1.41.x",
    ):
        simulation_runtime.check_runtime()
    monkeypatch.setattr(simulate, "supervise", lambda *a, **k: pytest.fail("started"))
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--backend-config",
            '{"client_resources": {"num_cpus": 1}}',
            "--run-config",
            f'output-dir="{tmp_path}" {TINY}',
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("flower-simulation: cannot run: flwr "), err


def _crash(exc: BaseException):
    """Flower's wrapping of a backend crash, as _main_loop raises it."""
    try:
        try:
            try:
                raise exc
            except BaseException as e:
                raise RuntimeError("Simulation Runtime crashed.") from e
        except RuntimeError as e:
            raise RuntimeError("An error was encountered. Ending simulation.") from e
    except RuntimeError as e:
        return e


def test_a_backend_crash_under_a_living_serverapp_is_told_from_the_serverapps_own_error(monkeypatch):
    """No Ray: a stand-in runtime that starts a ServerApp thread as Flower names it, then raises."""
    started: list[tuple[threading.Thread, threading.Event]] = []

    def runtime_with(server_lives: bool, error: BaseException):
        def fake(**kwargs):
            assert kwargs["backend_config"] == {"client_resources": {"num_cpus": 1}}
            release = threading.Event()
            t = threading.Thread(target=release.wait, name="Thread-9 (server_th_with_start_checks)")
            t.start()
            started.append((t, release))
            if not server_lives:
                release.set()
                t.join()
            raise error

        return fake

    def release_all():
        for t, release in started:
            release.set()
            t.join()

    crash = _crash(ValueError("ActorPool is empty. Stopping Simulation. Check `num_cpus` and/or `num_gpus`"))
    monkeypatch.setattr(simulation_runtime, "check_runtime", lambda: runtime_with(True, crash))
    backend = {"client_resources": {"num_cpus": 1}}
    try:
        with pytest.raises(simulation_runtime.BackendFailed) as failed:
            simulation_runtime.run(None, None, 2, backend, False)
    finally:
        release_all()
    assert failed.value.line == (
        "simulation backend failed: ValueError: ActorPool is empty. Stopping Simulation. "
        "Check `num_cpus` and/or `num_gpus`"
    )
    assert "Simulation Runtime crashed." in failed.value.details and "Traceback" in failed.value.details
    assert backend == {"client_resources": {"num_cpus": 1}}  # (Flower fills in defaults in a copy)

    own = ValueError("the ServerApp's own error")
    monkeypatch.setattr(simulation_runtime, "check_runtime", lambda: runtime_with(False, own))
    with pytest.raises(ValueError) as raised:
        simulation_runtime.run(None, None, 2, backend, False)
    assert raised.value is own
    assert simulate.failure_line(crash) == (
        "ValueError: ActorPool is empty. Stopping Simulation. Check `num_cpus` and/or `num_gpus`"
    )


def test_the_supervisor_marks_the_run_failed_with_the_cause_and_keeps_the_traceback(tmp_path, capsys):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_config({"kind": "federated"})
    run.write_status("running", round=0)
    code = simulate.report_failed(
        run,
        {
            "error": "simulation backend failed: RuntimeError: Unknown keyword argument(s): num_cpu",
            "details": "Traceback (most recent call last):\n  ...\n",
        },
    )
    status = run.read_status()
    assert code == 1 and status["status"] == "failed" and status["round"] == 0
    assert status["error"] == "simulation backend failed: RuntimeError: Unknown keyword argument(s): num_cpu"
    assert (run.logs_dir / "simulation-backend.log").read_text().startswith("Traceback (most recent call last):")
    assert capsys.readouterr().err.splitlines() == [
        f"flower-simulation: run FAILED: {status['error']} (traceback: {run.logs_dir}/simulation-backend.log; "
        f"it had not started training: start it again under a new run-name)"
    ]


# --- end to end: each kind of backend failure, injected, in a real flower-simulation -------------------------


def _tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (everything the simulation started inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if tag.encode() in env and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


INJECTED = {
    # Ray failing to import one of its own dependencies (a real GPU machine did): a `ray` that cannot be imported
    "ray-import-error": (
        {"client_resources": {"num_cpus": 1}},
        "simulation backend failed: ModuleNotFoundError: No module named 'grpc_injected'",
    ),
    # what up-front validation refuses, let through to Ray: ray.init refusing a keyword, an empty actor pool
    "init_args-unknown": (
        {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpu": 2}},
        "simulation backend failed: RuntimeError: Unknown keyword argument(s): num_cpu",
    ),
    "actor-pool-empty": (
        {"client_resources": {"num_cpus": 1, "num_gpus": 64}},
        "simulation backend failed: ValueError: ActorPool is empty. Stopping Simulation. Check "
        "`num_cpus` and/or `num_gpus` passed to the simulation engine",
    ),
    "num_cpus-0": (
        {"client_resources": {"num_cpus": 0}},
        "simulation backend failed: ZeroDivisionError: float division by zero",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(INJECTED))
def test_an_injected_backend_failure_ends_the_run_failed_within_seconds_leaving_no_process(
    kind, tmp_path, monkeypatch, capfd
):
    import json

    backend, cause = INJECTED[kind]
    tag = f"FL_IETAGC_TEST_TAG_{uuid.uuid4().hex}"
    monkeypatch.setenv(tag, "1")
    if kind == "ray-import-error":
        fake = tmp_path / "fake-ray" / "ray"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            'raise ModuleNotFoundError("No module named \'grpc_injected\'", name="grpc_injected")\n'
        )
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    else:
        monkeypatch.setattr(validate, "check_resources", lambda *a, **k: None)  # let it reach Ray
    t0 = time.monotonic()
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--backend-config",
            json.dumps(backend),
            "--run-config",
            f'output-dir="{tmp_path}" run-name="r" {TINY}',
        ]
    )
    seconds = time.monotonic() - t0
    err = capfd.readouterr().err
    assert code == 1 and seconds < BOUND_S, (code, seconds, err[-3000:])
    run = RunDir(tmp_path / "r")
    status = run.read_status()
    assert status["status"] == "failed" and status["error"] == cause, (status, err[-3000:])
    failed = [line for line in err.splitlines() if "run FAILED" in line]
    assert failed == [
        f"flower-simulation: run FAILED: {cause} (traceback: {run.logs_dir}/simulation-backend.log; "
        f"continue it with: fl-ietagc resume {run.path})"
    ], err[-3000:]
    log = (run.logs_dir / "simulation-backend.log").read_text()
    assert log.startswith("Traceback (most recent call last):") and "Simulation Runtime crashed." in log
    assert "Simulation Runtime crashed" not in err  # Flower's report of it went to the log, not the console
    time.sleep(1)
    assert _tagged_processes(tag) == []


def test_only_flowers_report_of_a_backend_crash_is_held_back_from_the_console():
    import logging

    def record(path, func, level=logging.ERROR):
        return logging.LogRecord("flwr", level, path, 1, "message", None, None, func=func)

    crash_log = simulation_runtime._CrashLog()
    site = "/venv/flwr/server/superlink/fleet/vce/vce_api.py"
    assert not crash_log.filter(record(site, "run_api"))  # "An exception occured!!" + traceback
    assert not crash_log.filter(record("/venv/flwr/simulation/run_simulation.py", "_main_loop"))
    assert crash_log.filter(record(site, "worker"))  # a client's error stays on the console
    assert crash_log.filter(record(site, "run_api", logging.INFO))
    assert crash_log.lines == ["message", "message"]


@pytest.mark.parametrize("child_does", ["reports-backend-failure", "dies-killed"])
def test_the_supervisor_ends_the_run_failed_when_its_child_reports_a_backend_failure_or_dies(
    child_does, tmp_path, monkeypatch, capsys
):
    """No Ray: a stand-in child announces the run as the ServerApp does, then reports or dies."""
    import json
    import signal

    from fl_ietagc.runs.rundir import ANNOUNCE_ENV

    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_config({"kind": "federated"})
    run.write_status("running", round=0)

    class FakeChild:
        pid = 2**22 + 13

        def __init__(self, argv, env, **kwargs):
            announce = Path(env[ANNOUNCE_ENV])
            announce.write_text(str(run.path))
            if child_does == "reports-backend-failure":
                simulate.backend_failure_file(announce).write_text(
                    json.dumps(
                        {
                            "error": "simulation backend failed: ValueError: ActorPool is empty.",
                            "details": "Traceback\n",
                        }
                    )
                )

        def wait(self):
            return 1 if child_does == "reports-backend-failure" else -signal.SIGKILL

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    code = simulate.supervise(ROOT, {"client_resources": {"num_cpus": 1}}, {}, 2, False)
    status = run.read_status()
    assert code == 1 and status["status"] == "failed"
    assert (
        status["error"]
        == {
            "reports-backend-failure": "simulation backend failed: ValueError: ActorPool is empty.",
            "dies-killed": "the simulation process died (killed by SIGKILL)",
        }[child_does]
    )
    assert capsys.readouterr().err.splitlines() == [
        f"flower-simulation: run FAILED: {status['error']} (traceback: {run.logs_dir}/simulation-backend.log; it had "
        f"not started training: start it again under a new run-name)"
    ]


def test_init_args_with_a_ray_that_does_not_import_are_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray._private.worker", None)  # importing it raises ImportError
    with pytest.raises(
        ConfigError,
        match=r"^--backend-config init_args: cannot be checked: Ray does not import here "
        r"\(ModuleNotFoundError: .*\); reinstall it",
    ):
        validate.check_ray_init_args({"num_cpus": 2})
