"""Flower's Simulation Runtime, reached without the deprecated `flwr.simulation.run_simulation`, and told apart
from the ServerApp when it fails.

Why `_run_simulation` (flwr 1.41, read in its source): the public `run_simulation` is deprecated and is only a
warning plus a call of `flwr.simulation.run_simulation._run_simulation`. That function is also what Flower's own
`flwr-simulation` process (flwr/simulation/app.py, `run_simulation_process`) calls for every `flwr run` on a
simulation SuperLink, so it is the runtime `flwr run` uses, minus the SuperLink around it. Reaching it through a
SuperLink of our own (`flower-superlink --simulation`, a FAB of the app, the Control API, `flwr-simulation` three
processes down) would lose what this command promises: the backend config would shrink to Flower's
`SimulationConfig` fields (no `actor`, no `init_args` beyond num_cpus/num_gpus/logging_level/log_to_driver, an int
num_cpus), the ServerApp would run from an installed FAB copy in the SuperLink's process tree, and every run would
pay two more process starts. The name is private, so `check_runtime()` checks the keyword arguments used here
before anything starts (flwr is pinned to 1.41.x in pyproject.toml; a Flower that changes them is refused in one
line, and tests/test_backend_failures.py fails).

How the runtime fails: `_run_simulation` starts the ServerApp on a thread, then runs the backend (Ray) on the
calling thread. When the backend itself fails (ray.init refusing an argument, Ray failing to import, an empty actor
pool), Flower raises "Simulation Runtime crashed" here but leaves the ServerApp thread waiting for replies that
will never come, and Python would wait for that thread at exit: the old hang. `run()` therefore raises
`BackendFailed` (cause in one line, tracebacks collected) whenever the runtime has ended while the ServerApp thread
is still alive; the caller must end the process.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import threading
import traceback

# the keyword arguments of flwr.simulation.run_simulation._run_simulation this module passes
RUNTIME_KEYWORDS = (
    "num_supernodes",
    "exit_event",
    "client_app",
    "server_app",
    "backend_name",
    "backend_config",
    "verbose_logging",
)
# where Flower logs the backend's crash (with its traceback) before raising it: (module, function); a client's
# error, logged by vce_api's worker, stays on the console
_CRASH_LOGGERS = {("vce_api", "run_api"), ("run_simulation", "_main_loop")}


class RuntimeMismatch(RuntimeError):
    """The installed Flower's Simulation Runtime is not the one this module was written for."""


class BackendFailed(RuntimeError):
    """The simulation backend failed while the ServerApp was still running; `line` names the cause."""

    def __init__(self, line: str, details: str):
        super().__init__(line)
        self.line, self.details = line, details


def check_runtime():
    """Flower's `_run_simulation`, after checking it takes the keywords used here."""
    import flwr

    module = importlib.import_module("flwr.simulation.run_simulation")  # (the package re-exports a function so named)

    func = getattr(module, "_run_simulation", None)
    params = inspect.signature(func).parameters if callable(func) else {}
    missing = [k for k in RUNTIME_KEYWORDS if k not in params]
    if not missing and SERVER_THREAD not in inspect.getsource(getattr(module, "run_serverapp_th", lambda: None)):
        missing = [f"a ServerApp thread named after {SERVER_THREAD}"]
    if missing:
        raise RuntimeMismatch(
            f"flwr {flwr.__version__}: flwr.simulation.run_simulation._run_simulation "
            f"{'is missing' if not params else 'lacks ' + ', '.join(missing)}; flower-simulation "
            f"needs flwr 1.41.x (pip install 'flwr[simulation]>=1.41,<1.42')"
        )
    return func


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of Flower's wrappers ("Ending simulation", "Simulation Runtime crashed")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def cause_line(exc: BaseException) -> str:
    from fl_ietagc.federation.protocol import one_line  # (numpy: flower-simulation imports this module at start)

    root = root_cause(exc)
    text = one_line(str(root)) if str(root).strip() else ""
    return f"simulation backend failed: {type(root).__name__}: {text}".rstrip(": ").rstrip()


class _CrashLog(logging.Filter):
    """Holds back Flower's own report of a backend crash (an ERROR line and a traceback, logged twice) from the
    console; the traceback goes to the run's log instead (see BackendFailed.details)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.module, record.funcName) in _CRASH_LOGGERS and record.levelno >= logging.WARNING:
            self.lines.append(record.getMessage())
            return False
        return True


SERVER_THREAD = "server_th_with_start_checks"  # the target of Flower's ServerApp thread (in its name, Python >= 3.10)


def server_threads() -> list[threading.Thread]:
    """Flower's ServerApp thread, while it lives (a non-daemon thread: Python waits for it at exit)."""
    return [t for t in threading.enumerate() if SERVER_THREAD in t.name and t.is_alive()]


def run(server_app, client_app, num_supernodes: int, backend: dict, verbose: bool) -> None:
    """Run the simulation; the ServerApp's own exception propagates as Flower re-raises it. Raises BackendFailed
    when the backend has failed (or ended) and left the ServerApp thread behind."""
    from flwr.supercore.telemetry import EventType

    runtime = check_runtime()
    crash_log = _CrashLog()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(crash_log)
    try:
        # a copy: Flower fills in its defaults (init_args logging_level, ...) in place
        runtime(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=_copy(backend),
            verbose_logging=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - sorted below: the ServerApp's own error, or the backend's
        if not server_threads():
            for line in crash_log.lines:  # (a crash the ServerApp did not outlive: its report, as Flower gave it)
                print(line, file=sys.stderr)
            raise
        # (Flower's held-back report holds the same traceback, twice: the full chain once is enough)
        raise BackendFailed(cause_line(exc), "".join(traceback.format_exception(exc))) from exc
    finally:
        flwr_logger.removeFilter(crash_log)
    if server_threads():
        raise BackendFailed(
            "simulation backend failed: the Simulation Runtime ended while the ServerApp was still running",
            "\n".join(crash_log.lines),
        )


def _copy(d):
    return {k: _copy(v) for k, v in d.items()} if isinstance(d, dict) else d
