"""No file a user passes (or a cache holds) can run code: --fid-weights and torch-fidelity's feature/statistics
cache are loaded with weights_only=True before torch-fidelity sees anything, and a pickle that would run code is
refused without running.

The malicious files below unpickle to `open(marker, "w")`: the marker file exists afterwards if and only if
unpickling ran their code.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings

import pytest
import torch

from fl_ietagc.cli import main as cli
from fl_ietagc.evaluation import evaluate as ev
from fl_ietagc.evaluation import inception_quality as fid
from fl_ietagc.evaluation.inception_quality import (
    CACHE_FORMAT,
    FidCacheWarning,
    InceptionWeightsError,
    UnsafeFileError,
    compute_quality,
    inception_state_shapes,
    load_inception_weights,
    safe_torch_load,
    weights_fingerprint,
)
from fl_ietagc.settings.config import parse_config

REFUSED_OPEN = (
    "refused: unpickling this {what} would run code or build objects other than tensors (Unsupported "
    "global: GLOBAL io.open was not an allowed global by default); only plain tensor files are loaded"
)


class _OpensMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious(path, marker, how: str = "torch.save"):
    payload = {"Conv2d_1a_3x3.conv.weight": _OpensMarker(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:  # a plain pickle (protocol 2: GLOBAL opcode), which torch.load also accepts
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    return path


def tiny_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture
def no_fidelity(monkeypatch):
    """torch-fidelity must not be called at all."""
    import torch_fidelity

    def refuse(*args, **kwargs):
        raise AssertionError("torch-fidelity was called")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", refuse)


@pytest.fixture
def cheap_fid(monkeypatch):
    """Fast stand-ins for the two costly steps, InceptionV3 on 299x299 images (features: a fixed function of the
    images) and the Frechet distance (a 2048x2048 matrix square root; here the squared mean difference). Every
    cache path of torch-fidelity (lookups, recomputation, writes) still runs for real. Returns the datasets whose
    features were computed."""
    import numpy as np
    import torch_fidelity.metric_fid
    import torch_fidelity.metrics
    import torch_fidelity.utils

    computed = []

    def features(dataset, *args, **kwargs):
        computed.append(len(dataset))
        images = torch.stack([dataset[i] for i in range(len(dataset))]).float().flatten(1)
        return {"2048": images[:, :2048].repeat(1, 2048 // images.shape[1] + 1)[:, :2048]}

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", features)

    def mean_distance(stat_1, stat_2, verbose):
        return {"frechet_inception_distance": float(np.sum((stat_1["mu"] - stat_2["mu"]) ** 2))}

    monkeypatch.setattr(torch_fidelity.metric_fid, "fid_statistics_to_metric", mean_distance)
    monkeypatch.setattr(torch_fidelity.metrics, "fid_statistics_to_metric", mean_distance)
    return computed


# --- the loader ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_safe_torch_load_refuses_a_pickle_that_would_run_code(tmp_path, how):
    marker = tmp_path / "ran"
    path = malicious(tmp_path / "evil.pt", marker, how)
    with pytest.raises(UnsafeFileError) as e:
        safe_torch_load(path, path, "test file")
    assert str(e.value) == f"{path}: " + REFUSED_OPEN.format(what="test file")
    assert not marker.exists()


def truncated_torch_file(path):
    blob = io.BytesIO()
    torch.save({"x": torch.zeros(3)}, blob)
    path.write_bytes(blob.getvalue()[:100])
    return path


def test_safe_torch_load_names_unreadable_files(tmp_path):
    empty, truncated, junk = tmp_path / "empty.pt", truncated_torch_file(tmp_path / "cut.pt"), tmp_path / "junk.pt"
    empty.write_bytes(b"")
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as e:
        safe_torch_load(empty, empty, "test file")
    assert str(e.value) == f"{empty}: empty file"
    with pytest.raises(ValueError) as e:
        safe_torch_load(truncated, truncated, "test file")
    assert str(e.value).startswith(
        f"{truncated}: not a readable test file (RuntimeError: PytorchStreamReader "
        f"failed reading zip archive: failed finding central directory."
    )
    assert str(e.value).endswith(")") and "\n" not in str(e.value)
    assert not isinstance(e.value, UnsafeFileError)
    with pytest.raises(UnsafeFileError) as e:  # not a tensor file: refused, with no claim that it holds code
        safe_torch_load(junk, junk, "test file")
    assert str(e.value) == (
        f"{junk}: refused: not a plain tensor file (Unsupported operand 0); only plain tensor files are loaded"
    )


# --- Inception weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_weights_are_refused_before_torch_fidelity(tmp_path, no_fidelity, how):
    marker = tmp_path / "ran"
    weights = malicious(tmp_path / "weights-inception-2015-12-05-6726825d.pth", marker, how)
    with pytest.raises(InceptionWeightsError) as e:  # a FidUnavailable: evaluate reports it, nothing crashes
        compute_quality(
            tiny_images(2, 0),
            tiny_images(2, 1),
            reference_key="k",
            weights_path=str(weights),
            cache_root=str(tmp_path / "cache"),
        )
    assert str(e.value) == f"Inception weights {weights}: " + REFUSED_OPEN.format(what="Inception weights file")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists()


def test_weights_of_another_network_are_refused_by_name(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(InceptionWeightsError) as e:
        load_inception_weights(str(other))
    missing = len(inception_state_shapes()) - 1  # all but fc.weight
    assert str(e.value) == (
        f"Inception weights {other}: not torch-fidelity's InceptionV3 weights ({missing} missing "
        f"keys (e.g. Conv2d_1a_3x3.bn.bias); 1 wrong shapes (e.g. fc.weight: (3, 3), expected "
        f"(1008, 2048)))"
    )
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(InceptionWeightsError) as e:
        load_inception_weights(str(notdict), "--fid-weights x")
    assert str(e.value) == "--fid-weights x: not a state dict (expected a dict of name -> tensor, got list)"


def test_torch_fidelity_gets_the_verified_tensors_never_the_path(weights, tmp_path, monkeypatch):
    import torch_fidelity

    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", capture)
    with pytest.raises(RuntimeError, match="stop"):
        compute_quality(
            tiny_images(2, 0), tiny_images(2, 1), reference_key="k", weights_path=weights, cache_root=str(tmp_path)
        )
    given = seen["feature_extractor_weights_path"]
    assert isinstance(given, io.BytesIO)  # in-memory bytes we serialised, not a file torch-fidelity would open
    state = torch.load(given, weights_only=True)
    reference = torch.load(weights, weights_only=True)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    # torch-fidelity's own cache loaders (weights_only=False) are replaced by the safe ones
    import torch_fidelity.metric_fid
    import torch_fidelity.utils

    assert torch_fidelity.utils.cache_lookup_one_recompute_on_miss is fid._safe_lookup_one
    assert torch_fidelity.utils.cache_lookup_group_recompute_all_on_any_miss is fid._safe_lookup_group
    assert torch_fidelity.metric_fid.cache_lookup_one_recompute_on_miss is fid._safe_lookup_one


# --- the feature / statistics cache -------------------------------------------------------------------------------


def cache_files(root, weights, key):
    base = root / weights_fingerprint(weights)[:16]
    return (base / f"{key}-inception-v3-compat-stat-fid-2048.pt", base / f"{key}-inception-v3-compat-features-2048.pt")


def test_malicious_statistics_cache_is_refused_without_running_and_rebuilt(weights, tmp_path, cheap_fid):
    marker = tmp_path / "ran"
    root = tmp_path / "cache"
    stats, features = cache_files(root, weights, "ref")
    stats.parent.mkdir(parents=True)
    malicious(stats, marker)
    malicious(features, marker, "pickle")
    kwargs = dict(reference_key="ref", weights_path=weights, cache_root=str(root), batch_size=8)
    generated, reference = tiny_images(2, 0), tiny_images(3, 1)
    with pytest.warns(FidCacheWarning) as caught:
        first = compute_quality(generated, reference, **kwargs)
    assert cheap_fid == [2, 3]  # the reference went through the network: nothing of the planted files was used
    assert [str(w.message) for w in caught] == [
        f"{stats}: " + REFUSED_OPEN.format(what="FID cache file") + "; ignoring it and rebuilding it",
        f"{features}: " + REFUSED_OPEN.format(what="FID cache file") + "; ignoring it and rebuilding it",
    ]
    assert not marker.exists()
    for path in (stats, features):  # rebuilt in the safe format
        assert torch.load(path, weights_only=True)["format"] == CACHE_FORMAT
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidCacheWarning)
        again = compute_quality(generated, tiny_images(3, 9), **kwargs)  # reference read from the cache now
    assert cheap_fid == [2, 3, 2] and again["fid"] == first["fid"]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"\x00garbage", "refused: not a plain tensor file (Unsupported operand 0)"),
        ("truncated", "not a readable FID cache file (RuntimeError: PytorchStreamReader failed"),
        ("torch-fidelity", "not an fl-ietagc FID cache file (expected format fl-ietagc-fidelity-cache/1)"),
        ("bad-shape", "corrupt FID cache file (unexpected content)"),
    ],
)
def test_corrupt_cache_file_is_rebuilt_with_a_warning_naming_it(tmp_path, content, reason):
    import numpy as np

    path = tmp_path / "ref-inception-v3-compat-stat-fid-2048.pt"
    if content == "torch-fidelity":  # the format torch-fidelity itself writes: a pickle of numpy arrays
        torch.save({"mu": torch.zeros(4), "sigma": torch.eye(4)}, path)
    elif content == "truncated":
        truncated_torch_file(path)
    elif content == "bad-shape":
        fid._write_cached(str(path), {"mu": np.zeros(4), "sigma": np.eye(3)})
    else:
        path.write_bytes(content)
    good = {"mu": np.arange(4.0), "sigma": np.eye(4)}
    calls = []

    def recompute():
        calls.append(1)
        return good

    with pytest.warns(FidCacheWarning) as caught:
        item = fid._safe_lookup_one(path.stem, recompute, cache=True, cache_root=str(tmp_path))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path}: {reason}") and message.endswith("; ignoring it and rebuilding it")
    assert calls == [1] and item is good
    # rebuilt: the next lookup reads it back (numpy arrays again), without recomputing or warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidCacheWarning)
        back = fid._safe_lookup_one(path.stem, recompute, cache=True, cache_root=str(tmp_path))
    assert calls == [1] and isinstance(back["mu"], np.ndarray)
    assert np.array_equal(back["mu"], good["mu"]) and np.array_equal(back["sigma"], good["sigma"])


# --- the evaluate command -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A completed run directory as centralized training leaves it (config, status, final checkpoint), with untrained
    weights: evaluate's checks are all that run here, so no training is needed."""
    from fl_ietagc.runs.checkpoints import save_checkpoint
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.training.run_model import build_for_config

    cfg = parse_config({"max-images": 40, "sample-count": 0})
    run = RunDir(tmp_path_factory.mktemp("runs") / "tiny")
    run.path.mkdir()
    run.write_config(cfg.to_dict(), kind="centralized")
    state = build_for_config(cfg).state_dict()
    save_checkpoint(run.final_checkpoint, state, state, server_round=1, config=cfg.to_dict())
    run.mark_completed(1)
    return run


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(ev, "sample", refuse)


def test_evaluate_refuses_malicious_fid_weights_before_sampling(tiny_run, tmp_path, no_sampling, capsys):
    marker = tmp_path / "ran"
    weights = malicious(tmp_path / "inception.pth", marker)
    assert cli(["evaluate", str(tiny_run.path), "--fid-weights", str(weights), "--k", "5"]) == 2
    assert capsys.readouterr().err == (
        f"fl-ietagc evaluate: --fid-weights {weights}: " + REFUSED_OPEN.format(what="Inception weights file") + "\n"
    )
    assert not marker.exists()


def test_evaluate_refuses_malicious_weights_named_by_the_environment(
    tiny_run, tmp_path, no_sampling, capsys, monkeypatch
):
    marker = tmp_path / "ran"
    weights = malicious(tmp_path / "inception.pth", marker)
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(weights))
    assert cli(["evaluate", str(tiny_run.path), "--k", "5"]) == 2
    assert capsys.readouterr().err == (
        f"fl-ietagc evaluate: ${fid.WEIGHTS_ENV}={weights}: "
        + REFUSED_OPEN.format(what="Inception weights file")
        + "\n"
    )
    assert not marker.exists()


def test_evaluate_refuses_a_malicious_checkpoint_before_sampling(tiny_run, tmp_path, no_sampling, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.path, run)
    marker = tmp_path / "ran"
    malicious(run / "checkpoints" / "final.pt", marker)
    assert cli(["evaluate", str(run), "--no-fid", "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"fl-ietagc evaluate: {run / 'checkpoints' / 'final.pt'}: not a readable checkpoint "
        f"(UnpicklingError: Weights only load failed."
    )
    assert err.count("\n") == 1 and not marker.exists()


def test_results_and_run_config_are_json_never_pickles(tmp_path):
    """results.json / config.json are parsed as JSON only: a pickle there is just corrupt JSON, named."""
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    malicious(run / "results.json", marker)
    with pytest.raises(ValueError) as e:
        ev.read_results(run)
    assert str(e.value).startswith(f"{run / 'results.json'}: corrupt evaluation results (UnicodeDecodeError: ")
    (run / "results.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError) as e:
        ev.read_results(run)
    assert str(e.value) == f"{run / 'results.json'}: corrupt evaluation results (expected a JSON object, got list)"
    assert not marker.exists()
