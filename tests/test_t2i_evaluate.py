"""`fl-ietagc evaluate` on a text-to-image run (model-type = latent-t2i) built by hand: tiny random Stable Diffusion
parts, 10 captioned images (the last 2 held out), a final and a round-1 checkpoint of the UNet."""

import json
import re

import numpy as np
import pytest
import torch

from fl_ietagc.cli import main as cli
from fl_ietagc.data import latent
from fl_ietagc.data.captions import captioned_splits
from fl_ietagc.evaluation import t2i_evaluate as t2e
from fl_ietagc.evaluation.evaluate import load_samples
from fl_ietagc.evaluation.t2i_eval import PixelEmbedder, memorization_scores
from fl_ietagc.runs.checkpoints import save_checkpoint
from fl_ietagc.runs.rundir import RunDir

N, HELD_OUT = 10, 2  # holdout-fraction 0.2 of 10 pairs


def caption_folder(root):
    """N noise images with distinct captions; the last (held out) is a duplicate of the first (trained on)."""
    from tests.t2i_fixtures import write_pairs

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(N - 1)]
    return write_pairs(root, arrays + [arrays[0]], [f"photo of item {i}" for i in range(N)])


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2i-eval")
    parts = latent.tiny_components(seed=0, image_size=16)
    conf = {
        "model-type": "latent-t2i",
        "dataset": "captions",
        "data-root": str(caption_folder(base / "pairs")),
        "pretrained-dir": str(latent.save_components(parts, base / "tiny-sd")),
        "image-size": 16,
        "holdout-fraction": 0.2,
        "diffusion-steps": 20,
        "seed": 0,
        "sample-count": 0,
    }
    run = RunDir(base / "run")
    run.write_config(conf, kind="centralized", **{"num-clients": 1})
    net = parts.unet.state_dict()
    torch.manual_seed(1)
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.items()}
    for path, server_round in ((run.checkpoint(1), 1), (run.final_checkpoint, 2)):
        save_checkpoint(path, net, ema, server_round=server_round, config=conf)
    run.mark_completed(2)
    return run, conf


@pytest.fixture(scope="module")
def pairs(t2i_run):
    _, conf = t2i_run
    return captioned_splits(conf["data-root"], 16, 0, 0.2)


def opts(out, **kw):
    return t2e.T2IOptions(
        **{
            "num_captions": 0,
            "seeds_per_caption": 2,
            "steps": 2,
            "batch_size": 8,
            "device": "cpu",
            "out": str(out),
            **kw,
        }
    )


def planted_sampler(train, plants: dict[int, int]):
    """Stand-in for `sample_from_captions`: noise, except generation k = training image plants[k]."""

    def fake(parts, schedule, captions, seeds_per_caption, **kw):
        n = len(captions) * seeds_per_caption
        images = torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
        for k, j in plants.items():
            images[k] = train.images[j]
        return images, torch.arange(len(captions)).repeat_interleave(seeds_per_caption)

    return fake


def test_a_planted_copy_is_found_with_its_caption_and_reported(t2i_run, pairs, tmp_path, monkeypatch):
    run, _ = t2i_run
    train, _ = pairs
    # generation 6 = caption 3, seed 0: its own caption's training image; generation 3 = caption 1: image 5
    monkeypatch.setattr(t2e, "sample_from_captions", planted_sampler(train, {6: 3, 3: 5}))
    results = t2e.evaluate_t2i(run.path, opts(tmp_path), progress=False)
    assert results["model-type"] == "latent-t2i" and results["num_train"] == N - HELD_OUT
    assert results["num_generations"] == 2 * (N - HELD_OUT) and results["embedder"] == "latent-cosine"
    assert results["memorization"]["embedder"] == "latent-cosine" and set(results["by_embedder"]) == {
        "latent-cosine",
        "pixel-cosine",
    }
    pixel = results["by_embedder"]["pixel-cosine"]
    top = pixel["most_similar"][:2]
    assert {(t["generation"], t["nearest"], t["own_caption"]) for t in top} == {(3, 5, False), (6, 3, True)}
    assert all(t["similarity"] == pytest.approx(1.0, abs=1e-5) for t in top)
    assert top[0]["caption"] == train.captions[top[0]["caption_index"]]
    assert pixel["generated"]["count_above"] == 2  # noise is nowhere near any training image in pixels
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["by_embedder"]["pixel-cosine"]["most_similar"] == pixel["most_similar"]

    arrays = load_samples(tmp_path / "samples.npz")
    assert arrays["samples"].dtype == np.uint8 and arrays["samples"].shape == (16, 3, 16, 16)
    assert arrays["caption_index"].tolist() == [i for i in range(N - HELD_OUT) for _ in range(2)]
    for tag in ("latent_cosine", "pixel_cosine"):  # the plants, under both embedders
        assert arrays[f"nearest_{tag}"][[6, 3]].tolist() == [3, 5]
        assert np.allclose(arrays[f"similarity_{tag}"][[6, 3]], 1.0, atol=1e-5)
        own = arrays[f"nearest_{tag}"] == arrays["caption_index"]
        name = tag.replace("_", "-")
        assert results["by_embedder"][name]["generated"]["fraction_nearest_own_caption"] == pytest.approx(own.mean())
    assert "clip_score" not in arrays
    page = (tmp_path / "report.html").read_text()
    assert "latent-cosine: mean top-1 similarity" in page and "pixel-cosine" in page and "No --sscd model" in page
    assert (tmp_path / "report" / "similar_pairs.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.rglob(".*.tmp*"))  # every file was renamed into place


def test_the_null_rate_is_measured_on_the_held_out_images_only(t2i_run, pairs, tmp_path, monkeypatch):
    run, _ = t2i_run
    train, heldout = pairs
    assert len(heldout) == HELD_OUT and torch.equal(heldout.images[-1], train.images[0])  # the planted duplicate
    monkeypatch.setattr(t2e, "sample_from_captions", planted_sampler(train, {}))
    results = t2e.evaluate_t2i(run.path, opts(tmp_path), progress=False)
    null = results["by_embedder"]["pixel-cosine"]["null"]
    assert null["num_heldout"] == HELD_OUT and "fraction_nearest_own_caption" not in null
    assert null["count_above"] == 1  # the held-out duplicate of a training image; no generation counts here
    assert results["null"] == results["by_embedder"]["latent-cosine"]["null"]
    assert results["null"]["embedder"] == "latent-cosine" and results["null"]["num_heldout"] == HELD_OUT
    arrays = load_samples(tmp_path / "samples.npz")
    assert arrays["null_nearest_pixel_cosine"][-1] == 0
    assert arrays["null_similarity_pixel_cosine"][-1] == pytest.approx(1.0, abs=1e-5)
    direct = memorization_scores(heldout.images, [-1] * HELD_OUT, train.images, PixelEmbedder())
    assert np.allclose(arrays["null_similarity_pixel_cosine"], direct.similarity)
    assert null["mean_top1"] == pytest.approx(float(direct.similarity.mean()))
    assert arrays["null_similarity_latent_cosine"].shape == (HELD_OUT,)


def test_without_held_out_images_the_null_is_not_measured(t2i_run, pairs, tmp_path, monkeypatch, capsys):
    import shutil

    run, conf = t2i_run
    shutil.copytree(run.path, tmp_path / "run")
    RunDir(tmp_path / "run").write_config({**conf, "holdout-fraction": 0.0}, kind="centralized")
    monkeypatch.setattr(t2e, "sample_from_captions", planted_sampler(pairs[0], {}))
    assert cli(["evaluate", str(tmp_path / "run"), "--steps", "2", "--num-captions", "2"]) == 0
    assert "(null not measured)" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_heldout"] == 0 and results["num_train"] == N
    assert results["null"] == {
        "embedder": "latent-cosine",
        "measured": False,
        "reason": "holdout-fraction = 0: no held-out images",
    }
    assert "null_similarity_pixel_cosine" not in load_samples(tmp_path / "run" / "samples.npz")
    assert "No null rate: holdout-fraction = 0" in (tmp_path / "run" / "report.html").read_text()


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("timings", "options", "figures", "samples_file")}


def test_the_same_seed_gives_the_same_results(t2i_run, tmp_path):
    run, _ = t2i_run
    first = t2e.evaluate_t2i(run.path, opts(tmp_path / "a", num_captions=3, seeds_per_caption=1), progress=False)
    again = t2e.evaluate_t2i(run.path, opts(tmp_path / "b", num_captions=3, seeds_per_caption=1), progress=False)
    t2e.evaluate_t2i(run.path, opts(tmp_path / "c", num_captions=3, seeds_per_caption=1, seed=1), progress=False)
    assert comparable(first) == comparable(again)
    a, b, c = (load_samples(tmp_path / d / "samples.npz") for d in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["samples"].shape == (3, 3, 16, 16) and len(set(a["caption_index"].tolist())) == 3
    assert not np.array_equal(a["samples"], c["samples"])
    saved = [json.loads((tmp_path / d / "results.json").read_text()) for d in "ab"]
    assert comparable(saved[0]) == comparable(saved[1])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.t2i_fixtures import save_tiny_clip

    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    save_tiny_clip(d, latent.tiny_components(seed=0, image_size=16).tokenizer)
    return d


def test_the_clip_score_is_measured_only_with_a_clip_dir(t2i_run, pairs, tmp_path, monkeypatch, tiny_clip):
    from fl_ietagc.evaluation.t2i_eval import clip_score

    run, _ = t2i_run
    train, _ = pairs
    monkeypatch.setattr(t2e, "sample_from_captions", planted_sampler(train, {}))
    without = t2e.evaluate_t2i(run.path, opts(tmp_path / "without"), progress=False)
    assert without["clip_score"] == "not measured (no --clip-dir)"
    assert "CLIP score not measured" in (tmp_path / "without" / "report.html").read_text()
    results = t2e.evaluate_t2i(run.path, opts(tmp_path / "with", clip_dir=str(tiny_clip)), progress=False)
    arrays = load_samples(tmp_path / "with" / "samples.npz")
    assert arrays["clip_score"].shape == (16,) and 0 <= results["clip_score"] <= 100
    expected = clip_score(
        torch.from_numpy(arrays["samples"]), [train.captions[i] for i in arrays["caption_index"]], tiny_clip
    )
    assert results["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert comparable(without)["by_embedder"] == comparable(results)["by_embedder"]


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(t2e, "sample_from_captions", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "5", "--fid-weights", "w.pth"], r"--k, --fid-weights: only for pixel runs; .* is a latent-t2i run"),
        (["--num-samples", "8"], r"--num-samples: only for pixel runs"),
        (["--seeds-per-caption", "0"], r"--seeds-per-caption 0: must be >= 1"),
        (["--num-captions", "-1", "--steps", "0"], r"--num-captions -1: must be >= 0 .*; --steps 0: must be >= 1"),
        (["--guidance-scale", "nan"], r"--guidance-scale nan: must be a finite number"),
        (["--steps", "21"], r"--steps 21: must be <= 20 \(the run's diffusion timesteps\)"),
        (["--round", "7"], r"--round 7: no checkpoint of round 7 in .*checkpoints \(saved rounds: 1\)"),
        (["--sscd", "{tmp}/nope.torchscript.pt"], r"--sscd: SSCD model '.*nope.torchscript.pt': not found"),
        (["--clip-dir", "{tmp}/nowhere"], r"--clip-dir: CLIP directory '.*nowhere': not a directory"),
        (["--out", "{tmp}/file.txt/x"], r"--out .*: .*file.txt is not a directory"),
    ],
)
def test_bad_options_fail_in_one_line_naming_the_option_before_sampling(
    t2i_run, tmp_path, capsys, no_sampling, args, message
):
    run, _ = t2i_run
    (tmp_path / "file.txt").write_text("x")
    steps = [] if "--steps" in args else ["--steps", "2"]  # (an option given twice is refused on its own)
    code = cli(["evaluate", str(run.path), *steps, *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fl-ietagc evaluate: ")
    assert re.search(message, err), err


def test_text_to_image_options_on_a_pixel_run_are_refused_before_any_model(tmp_path, capsys, monkeypatch):
    import fl_ietagc.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "prepare", lambda *a, **k: pytest.fail("the pixel run was prepared"))
    RunDir(tmp_path / "pixel").write_config({"dataset": "digits"}, kind="centralized")
    code = cli(["evaluate", str(tmp_path / "pixel"), "--sscd", "m.pt", "--guidance-scale", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--guidance-scale, --sscd: only for latent-t2i runs; " in err and "is a pixel run" in err


def test_fl_ietagc_evaluate_dispatches_a_text_to_image_run(t2i_run, tmp_path, capsys):
    run, _ = t2i_run
    out = tmp_path / "cli"
    code = cli(
        [
            "evaluate",
            str(run.path),
            "--num-captions",
            "2",
            "--seeds-per-caption",
            "1",
            "--steps",
            "2",
            "--guidance-scale",
            "3",
            "--round",
            "1",
            "--weights",
            "ema",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "latent-cosine: mean top-1 similarity" in stdout and "CLIP score: not measured" in stdout
    assert f"results: {out}/results.json" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["model-type"] == "latent-t2i" and results["round"] == 1 and results["weights"] == "ema"
    assert results["checkpoint"].endswith("round_0001.pt") and results["guidance_scale"] == 3.0
    assert results["num_generations"] == 2 and results["kind"] == "centralized"
    for name in ("results.json", "samples.npz", "report.html", "report/similar_pairs.png"):
        assert (out / name).is_file(), name


def t2i_results(run: str, mean: float, clip) -> dict:
    return {
        "model-type": "latent-t2i",
        "run": run,
        "kind": "federated",
        "num_generations": 8,
        "sampler": "ddim",
        "steps": 5,
        "weights": "raw",
        "round": 2,
        "clip_score": clip,
        "memorization": {
            "embedder": "sscd",
            "threshold": 0.5,
            "mean_top1": mean,
            "q95_top1": mean + 0.1,
            "fraction_above": 0.25,
            "fraction_nearest_own_caption": 0.5,
        },
        "null": {"embedder": "sscd", "mean_top1": 0.3},
    }


def test_compare_tables_text_to_image_runs_and_refuses_mixing_them_with_pixel_runs(tmp_path, capsys):
    from fl_ietagc.cli import main
    from fl_ietagc.evaluation.compare import compare

    for name, mean, clip in (("plain", 0.5, 30.0), ("iet", 0.4, "not measured (no --clip-dir)")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(t2i_results(str(tmp_path / name), mean, clip)))
    table = compare([str(tmp_path / "plain"), str(tmp_path / "iet")])
    assert table["metrics"]["sscd: mean top-1 similarity"] == [0.5, 0.4]
    assert table["relative_to_first"]["sscd: mean top-1 similarity"][1] == "-20.0%"
    assert table["metrics"]["CLIP score"] == [30.0, None]  # "not measured" is not a number
    (tmp_path / "pixel").mkdir()
    (tmp_path / "pixel" / "results.json").write_text(json.dumps({"run": "p", "kind": "federated"}))
    assert main(["compare", str(tmp_path / "plain"), str(tmp_path / "pixel"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-ietagc compare: ") and "incomplete evaluation results (no memorization, null" in err
    assert len(err.strip().splitlines()) == 1
    other = t2i_results(str(tmp_path / "latent"), 0.4, None)
    other["memorization"]["embedder"] = "latent-cosine"
    (tmp_path / "latent").mkdir()
    (tmp_path / "latent" / "results.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "plain"), str(tmp_path / "latent"), "--out", str(tmp_path)]) == 2
    assert "evaluated with different metrics" in capsys.readouterr().err
