"""scripts/gpu-check.sh: a missing package named in one line before anything runs, each step bounded in time, each
table written as soon as its step ends (a later failure keeps it), and the whole check run end to end on a CPU
with the tiny preset (slow: it starts two Ray simulations)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.check_deps import missing  # noqa: E402


def gpu_check(*args, python=sys.executable, timeout=900, **env):
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": str(python), **env},
    )


def test_check_deps_names_what_does_not_import(tmp_path, monkeypatch):
    assert missing((("json", "json"),)) == []
    assert missing((("no_such_module_h4", "no-such-pkg"),)) == [
        "no-such-pkg (ModuleNotFoundError: No module named 'no_such_module_h4')"
    ]
    # a package that fails because one it imports is missing is named by that one, once
    (tmp_path / "needs_absent_h4.py").write_text("import absent_dep_h4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing((("absent_dep_h4", "absent-dep"), ("needs_absent_h4", "needs"))) == [
        "absent-dep (ModuleNotFoundError: No module named 'absent_dep_h4')"
    ]
    assert missing((("needs_absent_h4", "needs"),)) == [
        "absent_dep_h4 (needed by needs_absent_h4: ModuleNotFoundError: No module named 'absent_dep_h4')"
    ]


def test_a_missing_package_stops_the_check_in_seconds_naming_it(tmp_path):
    shadow = tmp_path / "shadow" / "jsonschema"  # as if Ray's jsonschema were not installed
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'jsonschema'\", name='jsonschema')\n"
    )
    out = tmp_path / "results.md"
    t0 = time.perf_counter()
    proc = gpu_check(
        "--cpu",
        "--out",
        str(out),
        timeout=200,
        PYTHONPATH=f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("check_deps: 1 package(s) missing or broken for ")
    assert lines[0].endswith(": jsonschema (ray) (ModuleNotFoundError: No module named 'jsonschema')")
    assert lines[1] == f"gpu-check: nothing was measured and {out} is unchanged"
    assert not out.exists() and time.perf_counter() - t0 < 150


FAKE_PYTHON = """#!/bin/sh
case "$1" in
  benchmarks/check_deps.py) exit 0 ;;
  -c) echo "fake machine" ;;
  benchmarks/train_step.py) printf '| variant | img/s |\\n|---|---|\\n| fake | 1 |\\n' ;;
  benchmarks/sampling.py) sleep 60 ;;
  benchmarks/gpu_packing.py) echo "gpu_packing: boom" >&2; exit 5 ;;
  *) exit 9 ;;
esac
"""


def test_each_step_is_bounded_and_a_failed_step_keeps_the_earlier_tables(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "results.md"
    out.write_text("# earlier results\n")
    t0 = time.perf_counter()
    proc = gpu_check("--cpu", "--out", str(out), python=fake, timeout=60, GPU_CHECK_LIMIT_S="2")
    took = time.perf_counter() - t0
    assert proc.returncode == 1 and took < 30
    text = out.read_text()
    assert text.startswith("# earlier results\n\n## GPU check (`scripts/gpu-check.sh` --cpu")
    assert "Machine: fake machine." in text
    assert "| variant | img/s |\n|---|---|\n| fake | 1 |\n" in text
    assert "**sampling: not measured: stopped at its limit of 2 s**" in text
    assert "**packing: not measured: failed (exit 5) after " in text and text.rstrip().endswith("gpu_packing: boom")
    assert text.index("| fake | 1 |") < text.index("sampling: not measured") < text.index("packing: not measured")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"gpu-check: not measured: sampling (exit 124) packing (exit 5); the other tables are in {out}"
    )


@pytest.mark.slow
def test_the_whole_check_runs_on_a_cpu_with_the_tiny_preset(tmp_path):
    out = tmp_path / "results.md"
    t0 = time.perf_counter()
    proc = gpu_check("--cpu", "--profile", "--out", str(out))
    took = time.perf_counter() - t0
    text = out.read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not measured" not in text
    for heading, table in (
        ("### Training step", "| variant | warm-up (s) | img/s |"),
        ("### Sampling and memorization pass", "| sampling variant | warm-up (s) | img/s |"),
        ("### Clients packed on one device", "| clients on the GPU | num_gpus each |"),
        ("### Profile of one compiled training step", "| category | ms per step | share |"),
    ):
        assert heading in text and table in text.split(heading, 1)[1], heading
    assert text.count("(step took ") == 4
    print(f"gpu-check --cpu --profile took {took:.0f} s")
