"""The installed wheel claims one import name, fl_ietagc, and still runs the Flower app it ships.

The app's packages (strategies/, clients/, experiments/) keep their short names inside the app folder, where Flower
imports them; the wheel carries them as data under fl_ietagc/app/ (fl_ietagc/app_dir.py). Checked on a wheel built
from this checkout and unpacked outside it, in Python processes that see only that copy and the dependencies.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.backends import ONE_ACTOR_JSON

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, a folder with it unpacked as pip installs it)."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(base)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(base.glob("fl_ietagc-*.whl"))
    target = base / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return wheel, target


def isolated(target: Path, code: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -S -c code`: no site-packages processing, so no editable install of this checkout; only the
    unpacked wheel and the dependencies' site-packages on the path."""
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps])}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_installs_one_top_level_name_and_ships_the_app(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fl_ietagc", "fl_ietagc-0.1.0.dist-info"}
    for shipped in (
        "fl_ietagc/app/pyproject.toml",
        "fl_ietagc/app/strategies/server_app.py",
        "fl_ietagc/app/clients/client_app.py",
        "fl_ietagc/app/experiments/launch/simulate.py",
        "fl_ietagc/app/experiments/configs/paper-cifar10.toml",
    ):
        assert shipped in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    entry_points = zipfile.ZipFile(wheel).read("fl_ietagc-0.1.0.dist-info/entry_points.txt").decode()
    assert "flower-simulation = fl_ietagc.app_dir:flower_simulation" in entry_points
    assert "fl-ietagc-study = fl_ietagc.app_dir:study" in entry_points


def test_installed_the_generic_names_stay_free_and_the_app_is_found_in_the_package(installed, tmp_path):
    _, target = installed
    r = isolated(
        target,
        "import importlib.util as u, json\n"
        "free = [n for n in ('strategies', 'clients', 'experiments') if u.find_spec(n) is None]\n"
        "from fl_ietagc.app_dir import app_dir, app_module\n"
        "server = app_module('strategies.server_app')\n"
        "print(json.dumps([free, str(app_dir()), server.__file__]))",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    free, folder, server = json.loads(r.stdout.strip().splitlines()[-1])
    assert free == ["strategies", "clients", "experiments"]  # before the app folder is put on sys.path
    assert folder == str(target / "fl_ietagc" / "app")
    assert server == str(target / "fl_ietagc" / "app" / "strategies" / "server_app.py")


@pytest.mark.slow
def test_the_installed_flower_simulation_runs_the_shipped_app(installed, tmp_path):
    """`flower-simulation` of the installed package, from a folder without any app, trains 1 round (Ray)."""
    _, target = installed
    argv = [
        "flower-simulation",
        "--num-supernodes",
        "2",
        "--backend-config",
        ONE_ACTOR_JSON,
        "--run-config",
        f"output-dir='{tmp_path / 'runs'}' run-name='w' num-server-rounds=1 local-epochs=1 max-images=64 "
        f"batch-size=16 sample-count=0 diffusion-steps=20",
    ]
    r = isolated(
        target,
        f"import sys; sys.argv = {argv!r}\nfrom fl_ietagc.app_dir import flower_simulation\n"
        f"sys.exit(flower_simulation())",
        cwd=tmp_path,
        timeout=400,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    status = json.loads((tmp_path / "runs" / "w" / "status.json").read_text())
    assert status["status"] == "completed"
    config = json.loads((tmp_path / "runs" / "w" / "config.json").read_text())
    assert config["num-clients"] == 2
