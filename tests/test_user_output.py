"""What a user reads and looks at: sample grids large enough to see, FID's reason, the skip histogram's bins."""

import numpy as np
import torch
from PIL import Image

from fl_ietagc.cli import _fid_text
from fl_ietagc.evaluation.images import save_grid


def test_sample_grids_are_enlarged_by_pixel_repetition_to_at_least_512_px(tmp_path):
    gen = torch.Generator().manual_seed(0)
    digits = torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1  # the main job's 64 samples of 16 px: was 146 px
    with Image.open(save_grid(digits, tmp_path / "a.png")) as im:
        assert im.size == (530, 530)  # 8 columns of 16 x 4 px + 9 x 2 px padding
        grid = np.asarray(im.convert("L"))
    first = grid[2:66, 2:66]  # the first image, 4 x 4 blocks of one value each (nearest, not interpolated)
    expected = ((digits[0, 0].clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(first, np.kron(expected, np.ones((4, 4), np.uint8)))
    sd = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1  # sd-finetune --smoke's 4 samples: was 38 px
    with Image.open(save_grid(sd, tmp_path / "b.png")) as im:
        assert im.size == (518, 518)  # 2 columns of 16 x 16 px
    big = torch.zeros(4, 3, 256, 256)
    with Image.open(save_grid(big, tmp_path / "c.png")) as im:
        assert im.size == (518, 518)  # already wide enough: unchanged


def test_evaluate_prints_why_fid_was_not_computed():
    assert _fid_text({"computed": False, "reason": "disabled (--no-fid)"}) == "not computed (disabled (--no-fid))"
    assert (
        _fid_text({"computed": False, "reason": "no Inception\n weights at /x"})
        == "not computed (no Inception weights at /x)"
    )
    assert _fid_text({"computed": True, "fid": 12.5}) == "12.5"


def test_skip_histogram_bins_hold_whole_counts_so_no_bin_is_falsely_empty():
    from fl_ietagc.evaluation.report import skip_bins

    np.testing.assert_array_equal(skip_bins(3), [-0.5, 0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(skip_bins(0), [-0.5, 0.5])
    for top in (49, 50, 60, 99, 100, 137, 1000):
        edges = skip_bins(top)
        assert len(edges) - 1 <= 50 and edges[0] == -0.5 and edges[-1] >= top + 0.5
        counts, _ = np.histogram(np.arange(top + 1), bins=edges)  # every count 0..top once
        assert set(counts[:-1]) == {counts[0]}, top  # the same number of integers in every bin but the last
        assert counts.min() > 0, top  # (the old even split of 0..60 into 50 bins held 1 or 2 counts per bin)


def test_the_server_log_names_the_text_to_image_unet_not_a_preset():
    from fl_ietagc.settings.config import parse_config
    from strategies.server_app import model_description

    assert model_description(parse_config({})) == "tiny preset"
    t2i = parse_config({"model-type": "latent-t2i", "dataset": "captions", "pretrained-dir": "/m/sd"})
    assert model_description(t2i) == "text-to-image UNet from /m/sd"


def _write_results(tmp_path, name, fraction, **changes):
    import json

    from tests.test_evaluate import results_with

    d = tmp_path / name
    d.mkdir()
    r = {**results_with(fraction, 10.0), "run": str(d), **changes}
    (d / "results.json").write_text(json.dumps(r))
    return str(d)


def test_compare_refuses_runs_evaluated_with_different_sample_counts(tmp_path, capsys):
    from fl_ietagc.cli import main as cli

    a = _write_results(tmp_path, "a", 0.2)
    b = _write_results(tmp_path, "b", 0.1, num_samples=64)
    assert cli(["compare", a, b, "--out", str(tmp_path / "cmp")]) == 2
    assert capsys.readouterr().err == (
        "fl-ietagc compare: these runs were evaluated with different numbers of samples (a: 100, b: 64); evaluate "
        "them again with the same --num-samples (text-to-image: --num-captions x --seeds-per-caption) and compare\n"
    )
    assert not (tmp_path / "cmp").exists()


def test_compare_keeps_evaluates_unreliable_flag_on_mq(tmp_path):
    from fl_ietagc.evaluation.compare import compare, to_markdown

    a = _write_results(tmp_path, "a", 0.2)
    b = _write_results(tmp_path, "b", 0.1)
    for d, reliable in ((a, True), (b, False)):
        import json
        from pathlib import Path

        r = json.loads((Path(d) / "results.json").read_text())
        r["memorization"]["mq_reliable"] = reliable
        (Path(d) / "results.json").write_text(json.dumps(r))
    table = compare([a, b])
    assert [s["mq_reliable"] for s in table["settings"]] == [True, False]
    md = to_markdown(table).splitlines()
    assert "| MQ r<0.2 | 0.2 | 0.1 (-50.0%) unreliable |" in md
    assert "| 1/3 rule | 0.2 | 0.1 (-50.0%) |" in md  # other rules unmarked
    assert "| null: MQ r<0.2 | 0.01 | 0.01 (+0.0%) unreliable |" in md
    assert md[-1].endswith(
        "MQ is marked unreliable for b: the training set is small for its k nearest neighbours "
        "(fl-ietagc evaluate's flag); lean on the 1/3 rule."
    )


def test_pytest_names_each_slow_test_as_it_starts_and_fast_tests_stay_dots(tmp_path):
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent
    shutil.copy(root / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n\ndef test_fast():\n    pass\n\n\n@pytest.mark.slow\ndef test_long():\n    pass\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "markers=slow"]
    for workers in ([], ["-n", "2"]):  # serial, and as scripts/test.sh runs it (pytest-xdist, two workers)
        out = subprocess.run(
            [*cmd, *workers, str(tmp_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert out.returncode == 0, out.stdout + out.stderr
        started = [x for x in out.stdout.splitlines() if x.startswith("slow test started ")]
        assert len(started) == 1 and started[0].endswith(": test_inner.py::test_long"), out.stdout
        assert re.fullmatch(r"slow test started \d\d:\d\d:\d\d( on gw[01])?: test_inner.py::test_long", started[0])
        assert ("on gw" in started[0]) == bool(workers) and "test_fast" not in out.stdout


def test_smoke_figures_carry_a_red_pipeline_check_banner_once(tmp_path):
    from experiments.studies.pipeline_check import is_labelled, label_figures

    (tmp_path / "run" / "report").mkdir(parents=True)
    Image.new("RGB", (530, 530), (0, 0, 255)).save(tmp_path / "run" / "samples.png")
    Image.new("L", (200, 100), 128).save(tmp_path / "run" / "report" / "skip_histogram.png")
    (tmp_path / "digit-pairs").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "digit-pairs" / "0.png")  # training data: not a figure
    assert [p.name for p in label_figures(tmp_path)] == ["skip_histogram.png", "samples.png"]
    assert not is_labelled(tmp_path / "digit-pairs" / "0.png")
    with Image.open(tmp_path / "run" / "samples.png") as im:
        assert im.size == (530, 530 + 14)  # a 14 px banner above the unchanged figure
        px = np.asarray(im.convert("RGB"))
    assert (px[14:, :] == (0, 0, 255)).all()
    banner = px[:14].reshape(-1, 3)
    assert (banner == (200, 0, 0)).all(axis=1).mean() > 0.5 and (banner.min(axis=1) > 200).sum() > 50  # text
    assert is_labelled(tmp_path / "run" / "report" / "skip_histogram.png")
    assert label_figures(tmp_path) == []  # stamped once: a second study call adds nothing
