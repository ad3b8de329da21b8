"""flower-simulation on an existing Ray cluster (`--ray-address`), as on several machines.

The slow test starts a real two-node cluster on this machine with `ray start --block` (a head with 1 CPU and a
second node with 1 CPU, in a private temp dir and on private ports), runs 2 clients x 2 rounds attached to it,
and checks that the clients ran on both nodes (each client reports its Ray node id) and that the weights are
those of the same run on a private single-node Ray instance. The cluster is always stopped, by the pids of the
two `ray start` processes and their process groups (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from experiments.launch import simulate
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_attaching_drops_the_init_args_ray_refuses_and_keeps_the_rest(capsys):
    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": 30}}
    attached = simulate.attach_backend(backend, "10.0.0.5:6379")
    assert attached == {"client_resources": {"num_cpus": 1}, "init_args": {"logging_level": 30}}
    assert backend["init_args"]["num_cpus"] == 2  # the caller's dict is not changed
    assert "init_args num_cpus, num_gpus ignored" in capsys.readouterr().err
    assert simulate.attach_backend(backend, None) is backend
    assert simulate.attach_backend({"client_resources": {}}, "h:1") == {"client_resources": {}}


def test_ray_address_reaches_the_simulation_process_only(monkeypatch, tmp_path):
    """--ray-address is checked, then given to the simulation process as RAY_ADDRESS (not to this process)."""
    captured = {}

    class FakeChild:
        pid = 2**22 + 11

        def __init__(self, argv, env, **kwargs):
            captured.update(argv=argv, env=env)

        def wait(self):
            return 0

    with socket.socket() as listener:  # something that accepts connections, standing in for a Ray head
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setattr(subprocess, "Popen", FakeChild)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        code = simulate.main(
            [
                "--app",
                str(ROOT),
                "--num-supernodes",
                "2",
                "--ray-address",
                address,
                "--backend-config",
                '{"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}',
                "--run-config",
                f'output-dir="{tmp_path}" max-images=128',
            ]
        )
    assert code == 0
    assert captured["env"]["RAY_ADDRESS"] == address and "RAY_ADDRESS" not in os.environ
    backend = json.loads(captured["argv"][captured["argv"].index("--backend-config") + 1])
    assert backend == {"client_resources": {"num_cpus": 1}, "init_args": {}}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_ports() -> list[str]:
    """Private ports for one node's Ray processes (two nodes on one machine must not share the defaults)."""
    p = free_ports(6)
    return [
        "--node-manager-port",
        str(p[0]),
        "--object-manager-port",
        str(p[1]),
        "--dashboard-agent-listen-port",
        str(p[2]),
        "--dashboard-agent-grpc-port",
        str(p[3]),
        "--runtime-env-agent-port",
        str(p[4]),
        "--metrics-export-port",
        str(p[5]),
    ]


def ray_processes(marks: list[str]) -> list[int]:
    """Pids of live processes whose command line names this cluster (its temp dir or head address)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout  # whole lines
    pids = []
    for line in out.splitlines():
        pid, stat, args = (line.strip().split(None, 2) + ["", ""])[:3]
        if int(pid) != os.getpid() and not stat.startswith("Z") and any(m in args for m in marks):
            pids.append(int(pid))
    return pids


def wait_for_head(head: subprocess.Popen, address: str, log: Path) -> None:
    """Until the head's GCS accepts connections (at most 90 s; a head that exits fails with its log's tail)."""
    deadline = time.time() + 90
    while True:
        assert head.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the Ray head did not start within 90 s"
        try:
            simulate.check_ray_address(address)
            return
        except Exception:
            time.sleep(0.5)


def stop_nodes(starts: list[subprocess.Popen], marks: list[str], temp: Path) -> None:
    """Stop the nodes started here by their own pids (never `ray stop`, which stops every Ray on the machine):
    SIGTERM (`ray start --block` stops its node's processes on it), then SIGKILL to each node's session, then to
    any process still naming this cluster; the temp dir goes last."""
    for proc in reversed(starts):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in starts:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that node still in its session
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while (left := ray_processes(marks)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def cluster_nodes(address: str, want: int, timeout: float = 120) -> dict[str, dict]:
    """{node id: resources} of the cluster's live nodes once `want` are up (asked from a separate driver)."""
    probe = (
        "import json, sys, time, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "t0 = time.time()\n"
        "while True:\n"
        "    nodes = {n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}\n"
        "    if len(nodes) >= int(sys.argv[2]) or time.time() - t0 > float(sys.argv[3]):\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(nodes))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, address, str(want), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_cluster(tmp_path):
    """A head (1 CPU, resource "head") and a second node (1 CPU) on 127.0.0.1; stopped afterwards, always."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    port, client_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    starts = []
    try:
        starts.append(
            subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--head",
                    "--port",
                    str(port),
                    "--node-ip-address",
                    "127.0.0.1",
                    "--temp-dir",
                    str(temp),
                    "--include-dashboard",
                    "false",
                    "--ray-client-server-port",
                    str(client_port),
                    "--resources",
                    '{"head": 1}',
                    *common,
                    *node_ports(),
                ],
                stdout=(tmp_path / "head.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        )
        wait_for_head(starts[0], address, tmp_path / "head.log")
        starts.append(
            subprocess.Popen(
                [RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common, *node_ports()],
                stdout=(tmp_path / "node.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        )
        nodes = cluster_nodes(address, 2)
        assert len(nodes) == 2, (nodes, (tmp_path / "node.log").read_text()[-3000:])
        yield {"address": address, "nodes": nodes, "marks": [str(temp), address]}
    finally:
        stop_nodes(starts, [str(temp), address], temp)


@pytest.mark.slow
def test_simulation_attached_to_a_two_node_ray_cluster_uses_both_nodes_and_matches_one_node(ray_cluster, tmp_path):
    from tests.test_simulation import SMALL, reference_run

    ref = reference_run(tmp_path)  # 2 clients x 2 rounds on a private single-node Ray (made once per session)
    out = tmp_path / "attached"
    code = simulate.main(
        [
            "--app",
            str(ROOT),
            "--num-supernodes",
            "2",
            "--ray-address",
            ray_cluster["address"],
            "--run-config",
            f'{SMALL} output-dir="{out}"',
            "--backend-config",
            '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}',
        ]
    )
    assert code == 0
    run = RunDir(out / "e2e")
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]

    # 1 CPU per node, 1 CPU per client: one client actor per node, so the clients ran on both nodes
    used = {c["ray-node"] for m in metrics for c in m["clients"]}
    assert used == set(ray_cluster["nodes"]), (used, ray_cluster["nodes"])

    ref_w, got = load_checkpoint(ref.final_checkpoint), load_checkpoint(run.final_checkpoint)
    for part in ("net", "ema"):
        worst = max((ref_w[part][k] - got[part][k]).abs().max().item() for k in ref_w[part])
        assert all(torch.equal(ref_w[part][k], got[part][k]) for k in ref_w[part]), (part, worst)

    # the attached run left the cluster up (it is not ours to stop) and both nodes still serve
    assert len(cluster_nodes(ray_cluster["address"], 2, timeout=5)) == 2
