"""scripts/flwr-run.sh's SuperLink bookkeeping (experiments/launch/local_superlink.py): it finds the SuperLink `flwr run`
started for this FLWR_HOME and its SuperExec by command line, records their PIDs, and stops exactly those; a
SuperLink of another FLWR_HOME is never touched. Stand-ins with the same command lines replace Flower's processes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.launch import local_superlink as L

ROOT = Path(__file__).resolve().parent.parent

SUPERLINK = """import subprocess, sys, time
subprocess.Popen([sys.executable, sys.argv[0].replace("flower-superlink", "flower-superexec")])
time.sleep(600)
"""


def _start(bin_dir: Path, home: Path) -> subprocess.Popen:
    log = home / "local-superlink" / "superlink.log"
    return subprocess.Popen(
        [sys.executable, str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--log-file", str(log)],
        start_new_session=True,
    )


def _children(pid: int, tries: int = 100) -> list[int]:
    for _ in range(tries):
        kids = [p for p in L._pids() if L._parent(p) == pid]
        if kids:
            return kids
        time.sleep(0.05)
    return []


@pytest.fixture
def fake_flower(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flower-superlink").write_text(SUPERLINK)
    (bin_dir / "flower-superexec").write_text("import time\ntime.sleep(600)\n")
    started = []
    yield bin_dir, started
    for p in started:  # only what this test started, by PID
        for kid in [k for k in L._pids() if L._parent(k) == p.pid]:
            L._signal(kid, 9)
        p.kill()
        p.wait()


def test_record_and_stop_exactly_this_flwr_home(fake_flower, tmp_path):
    bin_dir, started = fake_flower
    home, other = tmp_path / "home", tmp_path / "other"
    ours, theirs = _start(bin_dir, home), _start(bin_dir, other)
    started += [ours, theirs]
    exec_pid = _children(ours.pid)
    theirs_exec = _children(theirs.pid)
    assert len(exec_pid) == 1 and len(theirs_exec) == 1

    procs = L.record(home)
    assert [(pid, what) for pid, _, what in procs] == [(ours.pid, "SuperLink"), (exec_pid[0], "SuperExec")]
    assert L.describe(procs) == f"SuperLink PID {ours.pid}, SuperExec PID {exec_pid[0]}"
    assert L.read(home) == procs  # the pid file holds them, start times included

    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.launch.local_superlink", "stop"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert out.stdout == (
        f"flwr-run: stopped the local SuperLink of FLWR_HOME={home}: "
        f"SuperLink PID {ours.pid}, SuperExec PID {exec_pid[0]}\n"
    )
    assert ours.wait(timeout=10) == -15
    assert not L._start_time(exec_pid[0])  # gone
    assert not L.pid_file(home).exists()
    assert theirs.poll() is None and L._start_time(theirs_exec[0])  # another FLWR_HOME's: untouched

    out = subprocess.run(
        [sys.executable, "-m", "experiments.launch.local_superlink", "stop"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout == f"flwr-run: nothing to stop (no running SuperLink recorded in {L.pid_file(home)})\n"


def test_a_recycled_pid_is_not_signalled(tmp_path):
    home = tmp_path.resolve()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        L.pid_file(home).parent.mkdir(parents=True)
        L.pid_file(home).write_text(f"{bystander.pid} 1 SuperLink\n")  # same PID, another start time
        assert L.stop(home, wait_s=0.1) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_readme_and_scripts_suggest_no_broad_kill():
    for path in [ROOT / "README.md", *(ROOT / "scripts").iterdir()]:
        text = path.read_text()
        assert "pkill -f" not in text and "killall" not in text, path


def test_the_log_path_is_compared_after_resolving_links_and_relative_paths(tmp_path):
    real = tmp_path / "real"
    (real / "local-superlink").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    argv = ["/venv/bin/python3", "/venv/bin/flower-superlink", "--insecure", "--log-file"]
    assert L.is_local_superlink(argv + [str(real / "local-superlink" / "superlink.log")], tmp_path / "link")
    assert L.is_local_superlink(argv + ["real/local-superlink/superlink.log"], tmp_path / "link", cwd=str(tmp_path))
    assert not L.is_local_superlink(argv + [str(tmp_path / "other" / "local-superlink" / "superlink.log")], real)
    assert not L.is_local_superlink(
        [
            "/venv/bin/python3",
            "/venv/bin/flower-supernode",
            "--log-file",
            str(real / "local-superlink" / "superlink.log"),
        ],
        real,
    )
