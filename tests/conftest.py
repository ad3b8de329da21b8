from pathlib import Path

import pytest
import torch

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
    session = _SESSION.get("session")
    if session is None:
        return
    item = _SESSION["items"].get(nodeid)
    if item is not None and item.get_closest_marker("slow") is not None:
        import time

        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):  # after -q's dots
                reporter.write("\n")
            reporter.write_line(f"slow test started {time.strftime('%H:%M:%S')}: {nodeid}")


_SESSION: dict = {}


def pytest_collection_finish(session):
    _SESSION["session"] = session
    _SESSION["items"] = {item.nodeid: item for item in session.items}


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
