"""The Deployment Engine secured as on real machines (TLS + SuperNode authentication), on 127.0.0.1 only.

One deployment serves the first three tests (it takes ~2.5 min on 2 cores): `scripts/deploy-local.sh` in its
secure mode (certificates from scripts/make-certs.sh, a SuperLink with TLS and `--enable-supernode-auth`, 2
registered SuperNodes) with Flower's default `ISOLATION=subprocess` (a new ClientApp process per message) runs 2
rounds of a tiny job. While that run trains, two intruders try to join: a SuperNode whose key pair was never
registered, and a SuperNode holding a registered key but trusting another CA. Both must be refused with a clear
message, and the run must end completed with the weights of the in-process grid.

Then the script's default `ISOLATION=process` (one long-lived ClientApp process per SuperNode,
experiments/launch/warm_clientapp.py): the same job, the same weights, and the same ClientApp pid in both rounds (each
client reports its pid in its reply); and SIGTERM to the script mid-run stops everything within seconds.
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

from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir
from tests.local_grid import run_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow(minutes=5.5)  # (the whole file, measured; conftest.py orders by it)

CONFIG = {
    "num-server-rounds": 2,
    "local-epochs": 1,
    "max-images": 128,
    "batch-size": 32,
    "sample-count": 0,
    "diffusion-steps": 20,
}
RUN_NAME = "secure"
# Flower's exit code 305, "The SuperNode could not establish a connection to the SuperLink", is logged; the process
# itself exits with 1 (its HTTP runtime server shuts down after the error).
REFUSED = "Exit Code: 305"
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # every process (ServerApp, ClientApps) computes with 2 threads, as the in-process reference (conftest)
    "OMP_NUM_THREADS": "2",
}


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block() -> int:
    """A SuperLink port P (9300..9399; pytest-xdist worker gwN: 1000 * N higher) with P+100..P+103 (SuperNodes' and
    intruders' runtime APIs) also free. Per worker, because two workers checking the same ports at the same moment
    would both find 9300 free and the second SuperLink would fail to bind."""
    base = 9300 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    for port in range(base, base + 100):
        if all(_free(p) for p in (port, port + 100, port + 101, port + 102, port + 103)):
            return port
    raise RuntimeError(f"no free port block in {base}..{base + 203} on 127.0.0.1")


def leftovers(work: Path, ports: list[int]) -> list[int]:
    """Pids of this deployment's processes still alive (SuperExecs run in their own sessions)."""
    pattern = re.compile("|".join([re.escape(str(work))] + [rf"127\.0\.0\.1:{p}\b" for p in ports]))
    mine = []
    # -ww: whole command lines (ps cuts them to $COLUMNS, which pytest sets to 80, without it)
    for line in subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if (
            int(pid) != os.getpid()
            and pattern.search(args)
            and any(name in args for name in ("flower-", "flwr", "warm_clientapp", "experiments.launch.supernode"))
        ):
            mine.append(int(pid))
    return mine


def kill_leftovers(work: Path, ports: list[int]) -> None:
    """Stop any process of this deployment still alive, by pid."""
    for _ in range(2):
        for pid in leftovers(work, ports):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def write_unregistered_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format, like make-certs.sh's, that nobody registers."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def start_supernode(log: Path, port: int, runtime_port: int, ca: Path, key: Path, state: Path):
    return subprocess.Popen(
        [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(runtime_port),
            "--root-certificates",
            str(ca),
            "--auth-supernode-private-key",
            str(key),
            "--max-wait-time",
            "60",
            "--node-config",
            f"partition-id=0 num-partitions=2 state-dir='{state}'",
        ],
        cwd=ROOT,
        env={**ENV, "FLWR_HOME": str(log.with_suffix(""))},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def start_deploy(
    base: Path, isolation: str, config: dict = CONFIG, threads: int = 2
) -> tuple[subprocess.Popen, Path, list[int]]:
    """scripts/deploy-local.sh (secure, K = 2) in its own session, every process computing with `threads` torch
    threads; (process, its output file, its ports)."""
    work, runs = base / "work", base / "runs"
    port = free_port_block()
    ports = [port, port + 100, port + 101, port + 102, port + 103]
    overrides = " ".join(f"{k}={v}" for k, v in config.items()) + f" run-name='{RUN_NAME}' output-dir='{runs}'"
    out = base / "deploy-local.out"
    deploy = subprocess.Popen(
        ["bash", "scripts/deploy-local.sh", "-c", overrides],
        cwd=ROOT,
        env={
            **ENV,
            "WORK": str(work),
            "PORT": str(port),
            "K": "2",
            "ISOLATION": isolation,
            "OMP_NUM_THREADS": str(threads),
        },
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return deploy, out, ports


def stop_deploy(deploy: subprocess.Popen, work: Path, ports: list[int]) -> None:
    if deploy.poll() is None:
        os.killpg(deploy.pid, signal.SIGTERM)  # deploy-local.sh's trap stops the SuperLink and SuperNodes
        try:
            deploy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(deploy.pid, signal.SIGKILL)
            deploy.wait(timeout=30)
    kill_leftovers(work, ports)


def reference_weights(tmp_path: Path, config: dict = CONFIG, threads: int = 2) -> dict:
    """The same ServerApp and ClientApp without Flower's transport, in this process (tests/local_grid.py), with
    `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_server({**config, "num-clients": 2, "output-dir": str(tmp_path), "run-name": "ref"}, 2)
    finally:
        torch.set_num_threads(before)
    return load_checkpoint(tmp_path / "ref" / "checkpoints" / "final.pt")


def assert_same_weights(ref: dict, got: dict) -> None:
    for part in ("net", "ema"):
        assert ref[part].keys() == got[part].keys()
        worst = max((ref[part][k] - got[part][k]).abs().max().item() for k in ref[part])
        assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), (part, worst)


def client_pids(run: RunDir) -> dict[int, list[int]]:
    """partition -> the pid of the ClientApp process that trained it, round by round (from the replies)."""
    pids: dict[int, list[int]] = {}
    for m in run.read_metrics():
        for c in m["clients"]:
            pids.setdefault(c["partition-id"], []).append(c["pid"])
    return pids


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    base = tmp_path_factory.mktemp("deployment")
    work, runs = base / "work", base / "runs"
    deploy, out, ports = start_deploy(base, "subprocess")
    port = ports[0]
    intruders = {}
    try:
        deadline = time.time() + 180
        while "submitted to the local SuperLink" not in out.read_text():
            assert deploy.poll() is None, f"deploy-local.sh ended early:\n{out.read_text()[-3000:]}"
            assert time.time() < deadline, f"no run submitted within 180 s:\n{out.read_text()[-3000:]}"
            time.sleep(1)

        # the intruders knock while the registered SuperNodes train
        certs = work / "certs"
        subprocess.run(
            ["bash", "scripts/make-certs.sh", str(base / "other-ca"), "-k", "1"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )
        unregistered_key = write_unregistered_key(base / "unregistered-key")
        intruders["unregistered"] = start_supernode(
            base / "unregistered.log", port, port + 102, certs / "ca.crt", unregistered_key, base / "state-unregistered"
        )
        intruders["wrong-ca"] = start_supernode(
            base / "wrong-ca.log",
            port,
            port + 103,
            base / "other-ca" / "ca.crt",
            certs / "supernode-1",
            base / "state-wrong-ca",
        )
        codes = {name: proc.wait(timeout=120) for name, proc in intruders.items()}
        refused_during_run = deploy.poll() is None

        code = deploy.wait(timeout=480)
        yield {
            "code": code,
            "out": out.read_text(),
            "work": work,
            "run": RunDir(runs / RUN_NAME),
            "codes": codes,
            "refused_during_run": refused_during_run,
            "logs": {name: (base / f"{name}.log").read_text() for name in intruders},
        }
    finally:
        for proc in intruders.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        stop_deploy(deploy, work, ports)


def test_secured_deployment_completes_with_the_weights_of_the_in_process_grid(deployment, tmp_path):
    assert deployment["code"] == 0, deployment["out"][-4000:]
    out = deployment["out"]
    assert "2 SuperNodes, TLS + SuperNode authentication, ClientApps: a new process per message" in out
    assert "finished:completed" in out
    work = deployment["work"]
    superlink_log = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log  # TLS, not plain HTTP
    assert "SuperNode authentication is disabled" not in superlink_log
    for i in (0, 1):
        assert "insecure" not in (work / f"supernode{i}.log").read_text().lower()
    run = deployment["run"]
    assert run.read_status()["status"] == "completed"
    assert [m["round"] for m in run.read_metrics()] == [1, 2]
    pids = client_pids(run)  # Flower's subprocess isolation: a fresh process per message
    assert sorted(pids) == [0, 1] and all(len(set(p)) == 2 for p in pids.values()), pids

    # The same ServerApp and ClientApp without Flower's transport, in this process: the same weights, bit for bit
    # (same seeds, shards and client state; every process computes with 2 threads). Measured: max difference 0.0.
    assert_same_weights(reference_weights(tmp_path), load_checkpoint(run.final_checkpoint))


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


def test_process_isolation_one_long_lived_clientapp_per_supernode_same_weights(tmp_path):
    """ISOLATION=process (the default): each SuperNode's messages are served by one ClientApp process, which
    reports its pid in every reply; the weights are those of the in-process grid. One torch thread per ClientApp
    (the script's default on 2 cores with K = 2; also Ray's in simulation), and in the reference."""
    deploy, out, ports = start_deploy(tmp_path, "process", threads=1)
    work = tmp_path / "work"
    try:
        code = deploy.wait(timeout=420)
        left = leftovers(work, ports)  # what the script's own stop left behind
    finally:
        stop_deploy(deploy, work, ports)
    text = out.read_text()
    assert code == 0, text[-4000:]
    assert "2 SuperNodes, TLS + SuperNode authentication, ClientApps: one long-lived process per SuperNode" in text
    assert not left, left
    run = RunDir(tmp_path / "runs" / RUN_NAME)
    assert run.read_status()["status"] == "completed"
    assert [m["round"] for m in run.read_metrics()] == [1, 2]

    pids = client_pids(run)
    assert sorted(pids) == [0, 1], pids
    assert all(len(p) == 2 and len(set(p)) == 1 for p in pids.values()), pids  # the same process in both rounds
    assert pids[0][0] != pids[1][0], pids  # one process per SuperNode
    for i in (0, 1):  # ... and it is the warm ClientApp process the script started beside SuperNode i
        log = (work / f"clientapp{i}.log").read_text()
        served = re.findall(r"warm-clientapp\[(\d+)\]: task \d+ \(run \d+, train\) completed", log)
        assert len(served) == 2 and len(set(served)) == 1, log[-3000:]
        assert int(served[0]) in (pids[0][0], pids[1][0])

    assert_same_weights(reference_weights(tmp_path / "ref", threads=1), load_checkpoint(run.final_checkpoint))


def test_sigterm_stops_the_whole_process_isolated_deployment_within_seconds(tmp_path):
    """SIGTERM to deploy-local.sh alone (not its group) while round 2 trains: exit 143 within seconds, no
    SuperLink, SuperNode, SuperExec, ServerApp or ClientApp process of the deployment is left, and the run is
    marked interrupted (not left "stale")."""
    deploy, out, ports = start_deploy(tmp_path, "process", {**CONFIG, "num-server-rounds": 3}, threads=1)
    work = tmp_path / "work"
    try:
        run = RunDir(tmp_path / "runs" / RUN_NAME)
        deadline = time.time() + 300
        while not (run.metrics_path.is_file() and run.read_metrics()):
            assert deploy.poll() is None, out.read_text()[-3000:]
            assert time.time() < deadline, "round 1 not committed within 300 s"
            time.sleep(0.5)
        assert leftovers(work, ports)  # (the check below can see the deployment's processes)
        t0 = time.time()
        deploy.send_signal(signal.SIGTERM)
        code = deploy.wait(timeout=60)
        seconds = time.time() - t0
        left = leftovers(work, ports)
    finally:
        stop_deploy(deploy, work, ports)
    assert code == 143 and seconds < 15, (code, seconds, out.read_text()[-3000:])
    assert "deploy-local: stopped" in out.read_text()
    assert "killing what did not stop" not in out.read_text()  # all went on SIGTERM, none needed SIGKILL
    assert not left, left
    # the ServerApp process marked its run interrupted on the way out: `fl-ietagc resume` continues it
    status = run.read_status()
    assert status["status"] == "interrupted" and status["round"] >= 1, status


def test_a_supernode_lost_mid_round_is_handled_by_the_client_failure_policy(tmp_path):
    """SIGKILL SuperNode 1 and its ClientApp process (a machine that disappears) once round 1 is committed. The
    SuperLink notices the missing heartbeats (Flower 1.41: 30 s interval x patience 2) and answers round 2's
    message for that node with an error; with client-failures = tolerate the round aggregates partition 0 alone,
    round 3 waits node-wait-s for the lost SuperNode and goes on without it, and the run completes."""
    config = {
        **CONFIG,
        "num-server-rounds": 3,
        "client-failures": "'tolerate'",
        "min-clients-fraction": 0.5,
        "node-wait-s": 5,
    }
    deploy, out, ports = start_deploy(tmp_path, "process", config, threads=1)
    work = tmp_path / "work"
    run = RunDir(tmp_path / "runs" / RUN_NAME)
    try:
        deadline = time.time() + 300
        while not (run.metrics_path.is_file() and run.read_metrics()):
            assert deploy.poll() is None, out.read_text()[-3000:]
            assert time.time() < deadline, "round 1 not committed within 300 s"
            time.sleep(0.5)
        node1 = re.compile(rf"127\.0\.0\.1:{ports[2]}\b|--port {ports[2]}\b")
        lost = [
            int(line.split()[0])
            for line in subprocess.run(
                ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True
            ).stdout.splitlines()
            if node1.search(line)
            and ("flower-supernode" in line or "experiments.launch.supernode" in line or "warm_clientapp" in line)
        ]
        assert len(lost) == 2, lost  # the SuperNode and its long-lived ClientApp
        t_lost = time.time()
        for pid in lost:
            os.kill(pid, signal.SIGKILL)
        while len(run.read_metrics()) < 2:
            assert deploy.poll() is None, out.read_text()[-3000:]
            assert time.time() - t_lost < 240, "round 2 not committed within 240 s of losing a SuperNode"
            time.sleep(0.5)
        detected = time.time() - t_lost
        code = deploy.wait(timeout=300)
    finally:
        stop_deploy(deploy, work, ports)
    text = out.read_text()
    assert code == 0, text[-4000:]
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    assert [[c["partition-id"] for c in m["clients"]] for m in metrics] == [[0, 1], [0], [0]]
    assert [f["partition-id"] for f in metrics[1]["failed"]] == [1]
    assert metrics[1]["failed"][0]["error"].startswith("Flower error on node"), metrics[1]["failed"]
    assert metrics[2]["failed"] == [
        {
            "partition-id": 1,
            "step": -1,
            "error": "SuperNode not connected at the start of the round (waited node-wait-s = 5 s)",
        }
    ]
    # measured on 2 cores: about 60-75 s (the heartbeat expiry) plus partition 0's round
    print(f"lost SuperNode handled: round 2 committed {detected:.0f} s after the SIGKILL")
    assert detected < 200, detected


def netns_available() -> str:
    """'' where scripts/deploy-netns.sh can make namespaces, veth pairs and tbf qdiscs here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    check = subprocess.run(["bash", "scripts/deploy-netns.sh", "--check"], cwd=ROOT, capture_output=True, text=True)
    return "" if check.returncode == 0 else (check.stdout + check.stderr).strip()


def our_namespaces(tag: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(f"{tag}-")]


def test_deployment_across_namespaces_over_shaped_links_matches_the_in_process_grid(tmp_path):
    """The SuperLink and each SuperNode (with its ClientApp) in their own network namespaces, joined by veth links
    shaped to 100 Mbit/s with tc tbf, TLS + SuperNode authentication naming the namespace address: the run completes
    with the weights of the in-process grid, the round's weights travel as 2 flat arrays, and the script leaves no
    namespace or process behind."""
    why = netns_available()
    if why:
        pytest.skip(f"cannot emulate machines here: {why}")
    work, runs = tmp_path / "work", tmp_path / "runs"
    port = 9750  # (free in the namespaces made for this run, whatever runs on this machine's own ports)
    overrides = " ".join(f"{k}={v}" for k, v in CONFIG.items()) + f" run-name='{RUN_NAME}' output-dir='{runs}'"
    out = tmp_path / "deploy-netns.out"
    deploy = subprocess.Popen(
        ["bash", "scripts/deploy-netns.sh", "-c", overrides],
        cwd=ROOT,
        env={
            **ENV,
            "WORK": str(work),
            "PORT": str(port),
            "K": "2",
            "RATE": "100mbit",
            "SUBNET": "10.213.7",
            "OMP_NUM_THREADS": "1",
        },
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tag = f"fl{deploy.pid}"
    try:
        code = deploy.wait(timeout=480)
    finally:
        if deploy.poll() is None:
            os.killpg(deploy.pid, signal.SIGTERM)
            deploy.wait(timeout=60)
    text = out.read_text()
    assert code == 0, text[-4000:]
    assert f"SuperLink in namespace {tag}-link at 10.213.7.1, 2 SuperNodes" in text and "links 100mbit" in text
    assert "submitted to the local SuperLink at 10.213.7.1:" in text and "TLS + SuperNode authentication" in text
    assert "Uvicorn running on https://0.0.0.0" in (work / "superlink.log").read_text()  # TLS, in its namespace
    deadline = time.time() + 20  # (the watcher runs the same teardown once the script is gone)
    while our_namespaces(tag) and time.time() < deadline:
        time.sleep(0.5)
    assert our_namespaces(tag) == []
    assert not leftovers(work, [])
    run = RunDir(runs / RUN_NAME)
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]
    assert [c["partition-id"] for c in metrics[1]["timing"]["clients"]] == [0, 1]
    assert_same_weights(reference_weights(tmp_path / "ref", threads=1), load_checkpoint(run.final_checkpoint))


def test_deploy_netns_cleans_up_after_a_sigkill(tmp_path):
    """SIGKILL to deploy-netns.sh (no trap runs): its watcher removes the namespaces and every process in them."""
    why = netns_available()
    if why:
        pytest.skip(f"cannot emulate machines here: {why}")
    work = tmp_path / "work"
    port = 9760
    deploy = subprocess.Popen(
        [
            "bash",
            "scripts/deploy-netns.sh",
            "-c",
            f"num-server-rounds=50 max-images=128 output-dir='{tmp_path / 'runs'}'",
        ],
        cwd=ROOT,
        env={**ENV, "WORK": str(work), "PORT": str(port), "K": "2", "SUBNET": "10.213.8"},
        stdout=(tmp_path / "out").open("w"),
        stderr=subprocess.STDOUT,
    )
    tag = f"fl{deploy.pid}"
    try:
        deadline = time.time() + 120
        while not (work / "supernode1.log").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert len(our_namespaces(tag)) == 3, (tmp_path / "out").read_text()[-3000:]
        deploy.kill()
        deploy.wait(timeout=10)
        deadline = time.time() + 30
        while our_namespaces(tag) and time.time() < deadline:
            time.sleep(0.5)
        assert our_namespaces(tag) == []
    finally:
        for ns in our_namespaces(tag):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    deadline = time.time() + 30  # deploy-local.sh, left in the root namespace, stops once its processes are gone
    while leftovers(work, []) and time.time() < deadline:
        time.sleep(0.5)
    assert not leftovers(work, [])
