import os
import time
from pathlib import Path

# Under pytest-xdist two workers share 2 cores, each with two torch threads: OpenMP threads that spin while they
# wait would burn the other worker's core (measured: a 32 s test took 86 s beside a copy of itself, 68 s with
# passive waiting, 64 s being the ideal). Set before torch loads OpenMP; subprocesses and Ray actors inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def flower_identity():
    """Flower's Message constructor needs a task identity, which a real run sets; tests set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 with its (strict) weight loading skipped, so it can be built offline."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def make_standin_weights(path: Path, seed: int) -> Path:
    """A state dict loadable by torch-fidelity in place of the real Inception weights.

    Conv weights are Kaiming-normal: with PyTorch's default init the 2048-d features shrink to ~1e-9 and every
    FID is ~0, which would make the tests vacuous.
    """
    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)  # torch-fidelity torch.loads this, then our no-op load_state_dict ignores it
    net = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=generator)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> str:
    return str(make_standin_weights(tmp_path_factory.mktemp("inception") / "standin-0.pth", seed=0))


@pytest.fixture
def captured_features(monkeypatch) -> list:
    """The 2048-d Inception features torch-fidelity extracts in a test, in call order (to recompute FID/KID by hand)."""
    import torch_fidelity.utils

    features = []
    extract = torch_fidelity.utils.get_featuresdict_from_dataset

    def spy(dataset, *args, **kwargs):
        out = extract(dataset, *args, **kwargs)
        features.append(out["2048"])
        return out

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
    return features


def pytest_runtest_logstart(nodeid, location):
    """Name each slow test (Ray, deployments, studies: minutes each) as it starts, with the time, so a quiet
    `pytest -q` says what it is waiting for; fast tests stay dots."""
    item = _SESSION.get("items", {}).get(nodeid)
    if item is not None and item.get_closest_marker("slow") is not None:
        _announce(f"slow test started {time.strftime('%H:%M:%S')}: {nodeid}")


def pytest_runtest_logreport(report):
    """Under pytest-xdist (scripts/test.sh) the controller collects nothing, so logstart cannot tell a slow test:
    its setup report can (markers travel as keywords), with the time the test began and the worker running it."""
    worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
    if worker is not None and report.when == "setup" and "slow" in report.keywords:
        began = time.strftime("%H:%M:%S", time.localtime(getattr(report, "start", time.time())))
        _announce(f"slow test started {began} on {worker}: {report.nodeid}")


def _announce(line: str) -> None:
    reporter = _SESSION["config"].pluginmanager.get_plugin("terminalreporter") if "config" in _SESSION else None
    if reporter is not None:
        if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):  # after -q's dots
            reporter.write("\n")
        reporter.write_line(line)


_SESSION: dict = {}


def pytest_configure(config):
    _SESSION["config"] = config


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh: two workers taking whole files, in this order), slow tests first and
    the longest of them before the rest (`slow(minutes=M)`: their measured serial minutes on 2 idle cores), so
    that the fast files fill the gaps at the end instead of a 5-minute study keeping one worker busy while the
    other idles. Serial runs keep the file order."""
    if hasattr(config, "workerinput"):

        def order(item):  # (sort is stable: file order within equal keys)
            slow = item.get_closest_marker("slow")
            return (slow is None, -(slow.kwargs.get("minutes", 0) if slow else 0))

        items.sort(key=order)


def pytest_collection_finish(session):
    _SESSION["items"] = {item.nodeid: item for item in session.items}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One single-node Ray head per test module that every federated run of its smoke studies attaches to
    (RAY_ADDRESS; test_studies.py, test_study_strategies.py, test_sd_finetune.py), instead of each starting and
    stopping a Ray of its own (~20 runs). One CPU, no GPU: each run's clients share one actor (tests/backends.py: a
    second actor only adds its ~10 CPU-s of imports to a CPU-bound suite). Stopped afterwards, always, by its pids
    (never `ray stop`, which stops every Ray here)."""
    import subprocess
    import tempfile

    from tests.test_ray_cluster import RAY, free_ports, node_ports, stop_nodes, wait_for_head

    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    port, client_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--disable-usage-stats", "--port", str(port), "--node-ip-address",
         "127.0.0.1", "--temp-dir", str(temp), "--include-dashboard", "false", "--ray-client-server-port",
         str(client_port), "--num-cpus", "1", "--num-gpus", "0", *node_ports()],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    try:
        wait_for_head(head, address, log)
        yield address
    finally:
        stop_nodes([head], [str(temp), address], temp)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a simulation process (and so Ray), training or a study's run starts: bad input is refused
    before any work (tests/test_bad_input.py, test_bad_input_classes.py)."""
    import subprocess

    import fl_ietagc.loops.centralized
    from experiments.launch import simulate
    from experiments.studies import runner

    def forbidden(*a, **k):
        raise AssertionError(f"work started for bad input: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(simulate, "run_here", forbidden)
    monkeypatch.setattr(fl_ietagc.loops.centralized.LocalTrainer, "run", forbidden)
    monkeypatch.setattr(runner, "train_run", forbidden)
