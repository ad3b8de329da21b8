"""The local SuperLink that `flwr run` starts for scripts/flwr-run.sh: find exactly it, record it, stop exactly it.

    python -m experiments.launch.local_superlink running           # exit 0 if a local SuperLink answers on its port
    python -m experiments.launch.local_superlink record            # find the one of $FLWR_HOME, write its pid file
    python -m experiments.launch.local_superlink stop              # stop what the pid file names (nothing else)

`flwr run` on a local federation starts `flower-superlink` detached (its own session) when none answers on
127.0.0.1:39091, and leaves it running; that SuperLink starts a SuperExec, which starts each run's simulation.
Flower records no PID. This SuperLink is recognised by its command line: `flower-superlink ... --log-file
$FLWR_HOME/local-superlink/superlink.log` (Flower's own path under this FLWR_HOME), so a SuperLink of another
user or another FLWR_HOME is never touched. The pid file lists that SuperLink and its direct children (the
SuperExec), each with its start time, so a recycled PID is not signalled by mistake.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PID_FILE = "fl-ietagc-superlink.pid"
STOP_WAIT_S = 15.0  # the SuperLink stops its SuperExec within ~1 s of SIGTERM; SIGKILL after this


def flwr_home() -> Path:
    """As Flower's get_flwr_home(): $FLWR_HOME as given, else ~/.flwr."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def runtime_dir(home: Path) -> Path:
    return home / "local-superlink"


def pid_file(home: Path) -> Path:
    return runtime_dir(home) / PID_FILE


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the PID, names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _pids() -> list[int]:
    return sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())


def is_local_superlink(argv: list[str], home: Path, cwd: str = "/") -> bool:
    """`flower-superlink ... --log-file <home>/local-superlink/superlink.log` (the one `flwr run` starts); paths
    compared after resolving symlinks, a relative --log-file against the process's working directory `cwd`."""
    if not any(Path(a).name == "flower-superlink" for a in argv[:2]):
        return False
    log = os.path.realpath(runtime_dir(home) / "superlink.log")
    return any(a == "--log-file" and os.path.realpath(os.path.join(cwd, b)) == log for a, b in zip(argv, argv[1:]))


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return "/"


def find(home: Path) -> list[tuple[int, str, str]]:
    """[(pid, start time, what)] of this FLWR_HOME's local SuperLink and its direct children, SuperLink first."""
    found = []
    pids = _pids()
    for pid in pids:
        if is_local_superlink(_cmdline(pid), home, _cwd(pid)):
            found.append((pid, _start_time(pid), "SuperLink"))
            for child in pids:
                if _parent(child) == pid:
                    argv = _cmdline(child)
                    name = (
                        Path(argv[1]).name
                        if len(argv) > 1 and argv[0].endswith(("python", "python3"))
                        else Path(argv[0]).name
                        if argv
                        else "?"
                    )
                    found.append((child, _start_time(child), "SuperExec" if name == "flower-superexec" else name))
    return found


def record(home: Path) -> list[tuple[int, str, str]]:
    """Write the pid file (atomically) for what find() sees; [] (and no file) when nothing is found."""
    procs = find(home)
    path = pid_file(home)
    if not procs:
        path.unlink(missing_ok=True)
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{pid} {start} {what}\n" for pid, start, what in procs))
    os.replace(tmp, path)
    return procs


def read(home: Path) -> list[tuple[int, str, str]]:
    path = pid_file(home)
    if not path.is_file():
        return []
    procs = []
    for line in path.read_text().splitlines():
        pid, start, what = line.split(" ", 2)
        procs.append((int(pid), start, what))
    return procs


def describe(procs: list[tuple[int, str, str]]) -> str:
    return ", ".join(f"{what} PID {pid}" for pid, _, what in procs)


def stop(home: Path, wait_s: float = STOP_WAIT_S) -> list[tuple[int, str, str]]:
    """SIGTERM each process the pid file names that is still that process (same PID and start time), wait up
    to `wait_s`, SIGKILL what is left; remove the pid file. Returns what was signalled."""
    alive = [(pid, start, what) for pid, start, what in read(home) if start and _start_time(pid) == start]
    for pid, _, _ in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_start_time(pid) == start for pid, start, _ in alive):
        time.sleep(0.1)
    for pid, start, _ in alive:
        if _start_time(pid) == start:
            _signal(pid, signal.SIGKILL)
    pid_file(home).unlink(missing_ok=True)
    return alive


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def running(port: str | None = None, timeout_s: float = 2.0) -> bool:
    """Whether a local SuperLink answers on 127.0.0.1 at Flower's port (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT)."""
    port = port or os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="local_superlink")
    p.add_argument("action", choices=("running", "record", "stop"))
    args = p.parse_args(argv)
    home = flwr_home()
    if args.action == "running":
        return 0 if running() else 1
    if args.action == "record":
        procs = record(home)
        print(describe(procs) if procs else "")
        return 0 if procs else 1
    procs = stop(home)
    if procs:
        print(f"flwr-run: stopped the local SuperLink of FLWR_HOME={home}: {describe(procs)}")
    else:
        print(f"flwr-run: nothing to stop (no running SuperLink recorded in {pid_file(home)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
