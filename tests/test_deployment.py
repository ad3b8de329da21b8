"""The Deployment Engine secured as on real machines (TLS + SuperNode authentication), on 127.0.0.1 only.

One deployment serves every test here (it takes ~2.5 min on 2 cores): `scripts/deploy-local.sh` in its default
secure mode (certificates from scripts/make-certs.sh, a SuperLink with TLS and `--enable-supernode-auth`, 2
registered SuperNodes) runs 2 rounds of a tiny job. While that run trains, two intruders try to join: a SuperNode
whose key pair was never registered, and a SuperNode holding a registered key but trusting another CA. Both must be
refused with a clear message, and the run must end completed with the weights of the in-process grid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl_ietagc.checkpoints import load_checkpoint
from fl_ietagc.rundir import RunDir
from tests.local_grid import run_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CONFIG = {"num-server-rounds": 2, "local-epochs": 1, "max-images": 128, "batch-size": 32, "sample-count": 0,
          "diffusion-steps": 20}
RUN_NAME = "secure"
# Flower's exit code 305, "The SuperNode could not establish a connection to the SuperLink", is logged; the process
# itself exits with 1 (its HTTP runtime server shuts down after the error).
REFUSED = "Exit Code: 305"
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
       # every process (ServerApp, ClientApps) computes with 2 threads, as the in-process reference (conftest)
       "OMP_NUM_THREADS": "2"}


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block() -> int:
    """A SuperLink port P (9300..9399) with P+100..P+103 (SuperNodes' and intruders' runtime APIs) also free."""
    for port in range(9300, 9400):
        if all(_free(p) for p in (port, port + 100, port + 101, port + 102, port + 103)):
            return port
    raise RuntimeError("no free port block in 9300..9503 on 127.0.0.1")


def kill_leftovers(work: Path, ports: list[int]) -> None:
    """Stop any process of this deployment still alive (SuperExecs run in their own sessions), by pid."""
    pattern = re.compile("|".join([re.escape(str(work))] + [rf"127\.0\.0\.1:{p}\b" for p in ports]))
    for _ in range(2):
        mine = []
        for line in subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if int(pid) != os.getpid() and pattern.search(args) and ("flower-" in args or "flwr" in args):
                mine.append(int(pid))
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def write_unregistered_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format, like make-certs.sh's, that nobody registers."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def start_supernode(log: Path, port: int, runtime_port: int, ca: Path, key: Path, state: Path):
    return subprocess.Popen(
        ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(runtime_port),
         "--root-certificates", str(ca), "--auth-supernode-private-key", str(key), "--max-wait-time", "60",
         "--node-config", f"partition-id=0 num-partitions=2 state-dir='{state}'"],
        cwd=ROOT, env={**ENV, "FLWR_HOME": str(log.with_suffix(""))}, stdout=log.open("w"),
        stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    base = tmp_path_factory.mktemp("deployment")
    work, runs = base / "work", base / "runs"
    port = free_port_block()
    ports = [port, port + 100, port + 101, port + 102, port + 103]
    overrides = " ".join(f"{k}={v}" for k, v in CONFIG.items()) + f" run-name='{RUN_NAME}' output-dir='{runs}'"
    out = base / "deploy-local.out"
    deploy = subprocess.Popen(["bash", "scripts/deploy-local.sh", "-c", overrides], cwd=ROOT,
                              env={**ENV, "WORK": str(work), "PORT": str(port), "K": "2"},
                              stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    intruders = {}
    try:
        deadline = time.time() + 180
        while "submitted to the local SuperLink" not in out.read_text():
            assert deploy.poll() is None, f"deploy-local.sh ended early:\n{out.read_text()[-3000:]}"
            assert time.time() < deadline, f"no run submitted within 180 s:\n{out.read_text()[-3000:]}"
            time.sleep(1)

        # the intruders knock while the registered SuperNodes train
        certs = work / "certs"
        subprocess.run(["bash", "scripts/make-certs.sh", str(base / "other-ca"), "-k", "1"], cwd=ROOT, check=True,
                       capture_output=True, timeout=60)
        unregistered_key = write_unregistered_key(base / "unregistered-key")
        intruders["unregistered"] = start_supernode(base / "unregistered.log", port, port + 102, certs / "ca.crt",
                                                    unregistered_key, base / "state-unregistered")
        intruders["wrong-ca"] = start_supernode(base / "wrong-ca.log", port, port + 103,
                                                base / "other-ca" / "ca.crt", certs / "supernode-1",
                                                base / "state-wrong-ca")
        codes = {name: proc.wait(timeout=120) for name, proc in intruders.items()}
        refused_during_run = deploy.poll() is None

        code = deploy.wait(timeout=480)
        yield {"code": code, "out": out.read_text(), "work": work, "run": RunDir(runs / RUN_NAME),
               "codes": codes, "refused_during_run": refused_during_run,
               "logs": {name: (base / f"{name}.log").read_text() for name in intruders}}
    finally:
        for proc in intruders.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if deploy.poll() is None:
            os.killpg(deploy.pid, signal.SIGTERM)  # deploy-local.sh's trap stops the SuperLink and SuperNodes
            try:
                deploy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(deploy.pid, signal.SIGKILL)
                deploy.wait(timeout=30)
        kill_leftovers(work, ports)


def test_secured_deployment_completes_with_the_weights_of_the_in_process_grid(deployment, tmp_path):
    assert deployment["code"] == 0, deployment["out"][-4000:]
    out = deployment["out"]
    assert "2 SuperNodes, TLS + SuperNode authentication" in out and "finished:completed" in out
    work = deployment["work"]
    superlink_log = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log  # TLS, not plain HTTP
    assert "SuperNode authentication is disabled" not in superlink_log
    for i in (0, 1):
        assert "insecure" not in (work / f"supernode{i}.log").read_text().lower()
    run = deployment["run"]
    assert run.read_status()["status"] == "completed"
    assert [m["round"] for m in run.read_metrics()] == [1, 2]

    # The same ServerApp and ClientApp without Flower's transport, in this process: the same weights, bit for bit
    # (same seeds, shards and client state; every process computes with 2 threads). Measured: max difference 0.0.
    run_server({**CONFIG, "num-clients": 2, "output-dir": str(tmp_path), "run-name": "ref"}, 2)
    ref = load_checkpoint(tmp_path / "ref" / "checkpoints" / "final.pt")
    got = load_checkpoint(run.final_checkpoint)
    for part in ("net", "ema"):
        assert ref[part].keys() == got[part].keys()
        worst = max((ref[part][k] - got[part][k]).abs().max().item() for k in ref[part])
        assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), (part, worst)


def test_unregistered_supernode_is_refused_and_the_run_goes_on(deployment):
    log = deployment["logs"]["unregistered"]
    assert deployment["codes"]["unregistered"] != 0 and REFUSED in log, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    superlink_log = (deployment["work"] / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert deployment["refused_during_run"] and deployment["code"] == 0


def test_supernode_trusting_another_ca_cannot_connect_and_the_run_goes_on(deployment):
    log = deployment["logs"]["wrong-ca"]
    assert deployment["codes"]["wrong-ca"] != 0 and REFUSED in log, log[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log and "certificate verify failed" in log, log[-3000:]
    assert deployment["refused_during_run"] and deployment["code"] == 0
