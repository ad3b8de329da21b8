"""Bad input by class (issue 24), each refused before any work in one line naming the culprit.

Tracebacks (now one line), late failures (now found up front), input accepted silently (now refused or warned
about) and unclear messages (now saying what is wrong). Every refusal asserts the exit status, the exact line,
that no simulation process or training started, that nothing was written, and a time bound. No case starts Ray.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from experiments.launch import simulate
from experiments.studies import cli as studies
from fl_ietagc import cli
from fl_ietagc.runs.checkpoints import BadFileError, load_torch, save_checkpoint
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import INT_MAX, ConfigError, ineffective_keys, parse_config, parse_overrides
from fl_ietagc.training.models import build_unet

ROOT = Path(__file__).resolve().parents[1]
BACKEND = '{"client_resources": {"num_cpus": 1}}'
TINY_RUN = {
    "max-images": 64,
    "batch-size": 16,
    "local-epochs": 1,
    "num-server-rounds": 1,
    "diffusion-steps": 20,
    "warmup-steps": 2,
    "sample-count": 0,
}


@pytest.fixture(scope="module")
def t(tmp_path_factory):
    """Bad files and links of every kind, and one federated run (the real ServerApp and ClientApp on an in-process
    grid, no Ray) stopped after round 1, to resume."""
    t = tmp_path_factory.mktemp("classes")
    (t / "out").mkdir()
    (t / "a-file").write_text("x")
    os.mkfifo(t / "pipe.pt")
    os.mkfifo(t / "pipe.toml")
    os.symlink(t / "loop-b", t / "loop-a")
    os.symlink(t / "loop-a", t / "loop-b")
    os.symlink(t / "nowhere", t / "dangling")
    os.symlink("/tmp", t / "out" / "escape")  # a run-name that leads out of output-dir
    rgb = build_unet("tiny", 16, 3)  # digits are 1 channel: another architecture
    save_checkpoint(t / "rgb.pt", rgb.state_dict(), rgb.state_dict(), server_round=1, config={})
    gray = build_unet("tiny", 16, 1).state_dict()
    gray["time_embedding.linear_1.weight"] = torch.zeros(7, 7)  # one tensor of another shape
    save_checkpoint(t / "one-shape.pt", gray, gray, server_round=1, config={})
    for name, text in (("not-toml", "[tool.flwr.app\n"), ("no-app", "[project]\nname = 'x'\n")):
        (t / name).mkdir()
        (t / name / "pyproject.toml").write_text(text)

    from tests.local_grid import run_server

    torch.set_num_threads(1)
    try:
        run_server({**TINY_RUN, "output-dir": str(t / "runs"), "run-name": "fed"}, 2)
    finally:
        torch.set_num_threads(2)
    return t


def resumable_copy(t: Path, name: str) -> RunDir:
    """A copy of the federated run, marked interrupted (so it can be resumed)."""
    import shutil

    dst = t / "runs" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(t / "runs" / "fed", dst, symlinks=True)
    run = RunDir(dst)
    run.write_status("interrupted")
    return run


def listing(t: Path) -> list[str]:
    return sorted(str(p.relative_to(t)) for p in t.rglob("*") if "client-state" not in p.parts)


def refused(t: Path, capsys, call, expected, code: int = 2) -> str:
    """Run `call`; assert exit `code`, exactly one stderr line equal to `expected` ({t}: the fixture folder),
    nothing written under t, no file that ran code, well under Ray's start-up."""
    before = listing(t)
    t0 = time.perf_counter()
    try:
        got = call()
    except SystemExit as e:  # argparse-level refusals
        got = e.code
    seconds = time.perf_counter() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert got == code, err
    if isinstance(expected, re.Pattern):  # (a message that quotes a library's own text, cut at its length)
        assert len(err) == 1 and expected.fullmatch(err[0]), err
    else:
        assert err == [expected.replace("{t}", str(t))], err
    assert "Traceback" not in "\n".join(err)
    assert listing(t) == before
    assert seconds < 8, seconds
    return err[0]


def sim(t, run_config: str, *extra, k="2"):
    argv = [
        "--app",
        str(ROOT),
        "--backend-config",
        BACKEND,
        "--num-supernodes",
        k,
        "--run-config",
        run_config.replace("{t}", str(t)),
        *extra,
    ]
    return lambda: simulate.main(argv)


SIM = "flower-simulation: invalid input: "
CLI = "fl-ietagc: invalid run config: "
STUDY = "fl-ietagc-study: invalid input: "


# --- Tracebacks (7): now one line ---
def test_an_image_size_of_petabytes_is_refused_with_the_estimate(t, capsys, no_work, monkeypatch):
    import fl_ietagc.validate as v

    monkeypatch.setattr(v, "memory_here", lambda device="auto": (24 * 2**30, "24.0 GiB of RAM"))
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" image-size=1048576'),
        SIM + "image-size = 1048576: a batch of 32 at 1048576x1048576 needs at least 4.0 PiB for the UNet's "
        "first layer alone (float32), more than the 24.0 GiB of RAM here",
    )


def test_an_init_checkpoint_of_another_architecture_names_the_first_mismatching_weight(t, capsys, no_work):
    n = f"{sum(p.numel() for p in build_unet('tiny', 16, 1).parameters()):,}"
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" init-checkpoint="{t}/rgb.pt"'),
        SIM + f"init-checkpoint = '{{t}}/rgb.pt': its raw weights do not match this model (UNet2DModel, {n} "
        f"parameters): conv_in.weight has shape [32, 3, 3, 3], the model needs [32, 1, 3, 3]",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" init-checkpoint="{t}/one-shape.pt"'),
        SIM + f"init-checkpoint = '{{t}}/one-shape.pt': its raw weights do not match this model (UNet2DModel, "
        f"{n} parameters): time_embedding.linear_1.weight has shape [7, 7], the model needs [128, 32]",
    )


def test_an_app_folder_whose_pyproject_is_not_a_flower_app_names_the_file(t, capsys, no_work):
    for name, why in (
        ("not-toml", "is not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 15))"),
        ("no-app", "has no [tool.flwr.app] table (not a Flower app)"),
    ):
        refused(
            t,
            capsys,
            lambda: simulate.main(["--app", str(t / name), "--num-supernodes", "2"]),
            SIM + f"--app {{t}}/{name}: {{t}}/{name}/pyproject.toml {why}",
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_study_set_device_cuda_without_a_gpu_is_one_line(t, capsys, no_work):
    refused(
        t,
        capsys,
        lambda: studies.main(["small-data", "--smoke", "--set", "device=cuda", "--out", str(t / "studies")]),
        STUDY + "[default-s0] device = 'cuda': no CUDA GPU is visible here; use device = 'auto' or 'cpu'",
    )


def test_flwr_run_with_more_gpus_per_client_than_exist_is_refused_before_the_superlink(t, capsys):
    from fl_ietagc.settings.script_args import main

    have = torch.cuda.device_count()
    refused(
        t,
        capsys,
        lambda: main(
            [
                "--script",
                "flwr-run",
                "--",
                "--federation-config",
                f"num-supernodes=2 client-resources-num-gpus={have + 1}",
            ]
        ),
        f"flwr-run: invalid input: --federation-config client-resources-num-gpus = {have + 1}: this machine has "
        f"{have} GPU(s); a client could never be scheduled (must be <= {have})",
    )
    assert main(["--script", "flwr-run", "--", "--federation-config", "client-resources-num-gpus=0"]) == 0


# --- Late (9): now found before anything starts ---
def test_a_run_name_longer_than_the_file_system_allows(t, capsys, no_work):
    name = "r" * 300
    refused(
        t,
        capsys,
        sim(t, f'output-dir="{{t}}/out" run-name="{name}"'),
        SIM + f"run-name = '{name}': the name {name[:40]}... is 300 bytes; the file system allows at most 255",
    )


@pytest.mark.parametrize(
    "target,what",
    [
        ("loop-a", "a symbolic link loop"),
        ("dangling", "a dangling symbolic link (to {t}/nowhere, which does not exist)"),
    ],
)
def test_an_output_dir_that_is_a_link_loop_or_dangling(t, capsys, no_work, target, what):
    refused(
        t,
        capsys,
        sim(t, f'output-dir="{{t}}/{target}/runs"'),
        SIM + f"output-dir = '{{t}}/{target}/runs': {{t}}/{target} is {what}, not a directory",
    )
    refused(
        t,
        capsys,
        sim(t, f'output-dir="{{t}}/{target}"'),
        SIM + f"output-dir = '{{t}}/{target}': {what}, not a directory",
    )


def test_a_client_state_dir_that_is_a_file(t, capsys, no_work):
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" client-state-dir="{t}/a-file"'),
        SIM + "client-state-dir = '{t}/a-file': a file, not a directory",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" client-state-dir="{t}/pipe.pt/x"'),
        SIM + "client-state-dir = '{t}/pipe.pt/x': {t}/pipe.pt is a named pipe (FIFO), not a directory",
    )


def test_a_resume_with_an_edited_preset_is_refused_by_the_resume_check(t, capsys, no_work):
    run = resumable_copy(t, "edited")
    run.write_config({**run.read_config(), "preset": "ddpm-cifar10"})
    refused(
        t,
        capsys,
        lambda: simulate.main(["--resume", str(run.path)]),
        SIM + f"resume: {run.resume_path} does not fit the model of {run.config_path} (preset ddpm-cifar10, "
        f"image-size default): conv_in.weight has shape [32, 1, 3, 3], the model needs [128, 1, 3, 3]; "
        f"was config.json edited?",
    )


def test_a_resume_missing_or_with_a_damaged_client_state_is_refused_before_anything_starts(t, capsys, no_work):
    run = resumable_copy(t, "no-state")
    state = run.client_state(1, 1)
    state.unlink()
    refused(
        t,
        capsys,
        lambda: simulate.main(["--resume", str(run.path)]),
        SIM + f"resume: client 1's state after round 1: {state} is missing (the next round starts from it; its "
        f"optimizer and memory bank cannot be rebuilt)",
    )
    state.write_bytes((t / "rgb.pt").read_bytes()[:300])  # a truncated torch file
    refused(
        t,
        capsys,
        lambda: simulate.main(["--resume", str(run.path)]),
        re.compile(
            re.escape(
                SIM + f"resume: client 1's state after round 1: {state}: not a readable client "
                f"state (RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                f"finding central directory"
            )
            + r".*\)"
        ),
    )
    state.unlink()
    os.mkfifo(state)
    refused(
        t,
        capsys,
        lambda: simulate.main(["--resume", str(run.path)]),
        SIM + f"resume: client 1's state after round 1: {state} is a named pipe (FIFO) (the next round starts from "
        f"it; its optimizer and memory bank cannot be rebuilt)",
    )


def test_an_intact_run_passes_the_resume_check(t):
    from fl_ietagc.resume_check import check_resume_contents
    from fl_ietagc.settings.config import RunConfig

    run = resumable_copy(t, "intact")
    keys = RunConfig().to_dict()
    check_resume_contents(
        parse_config({**{k: v for k, v in run.read_config().items() if k in keys}, "resume-from": str(run.path)})
    )  # raises nothing


# --- Accepted silently (22): now refused, or one warning line ---
def test_an_option_given_twice_is_refused(t, capsys, no_work):
    refused(
        t,
        capsys,
        lambda: simulate.main(
            ["--app", str(ROOT), "--num-supernodes", "2", "--run-config", "lr=1", "--run-config", "lr=2"]
        ),
        SIM + "--run-config is given twice; give it once (the first would be dropped silently)",
    )
    refused(
        t,
        capsys,
        lambda: cli.main(["config", "--check", "lr=1", "--check", "lr=2"]),
        CLI + "--check 'lr=2': lr also given in an earlier --check",
    )
    refused(
        t,
        capsys,
        lambda: cli.main(["centralized", "--run-config=lr=1", "--run-config", "lr=2"]),
        "fl-ietagc: invalid input: --run-config is given twice; give it once (the first would be dropped silently)",
    )


def test_a_key_given_twice_and_integers_beyond_range(t, capsys, no_work):
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" lr=1e-3 lr=2e-3'),
        SIM + "run-config item 'lr=2e-3': lr is given twice; give each key once",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" num-server-rounds=1e30'),
        SIM + f"num-server-rounds = 1e+30: out of range; must be an integer in [1, {INT_MAX}]",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" batch-size=99999999999'),
        SIM + f"batch-size = 99999999999: out of range; must be an integer in [1, {INT_MAX}]",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" sample-count=-1e12'),
        SIM + f"sample-count = -1000000000000.0: out of range; must be an integer in [0, {INT_MAX}]",
    )


def test_an_empty_output_dir_and_a_run_name_leading_out_of_it(t, capsys, no_work):
    refused(
        t,
        capsys,
        sim(t, 'output-dir=""'),
        SIM + "output-dir = '': must name a directory (e.g. \"runs\"); an empty one would scatter the run into "
        "the current directory",
    )
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" run-name="escape"'),
        SIM + "run-name = 'escape': {t}/out/escape is a symbolic link to /tmp; a run directory must be a folder "
        "of its own inside output-dir",
    )


def test_centralized_agc_contradicting_agc_false(t, capsys, no_work):
    refused(
        t,
        capsys,
        lambda: cli.main(["centralized", "--agc", "--run-config", f'output-dir="{t}/out" agc=false']),
        CLI + "agc = false contradicts --agc; give one of them",
    )


def test_study_settings_it_controls_are_refused_and_its_options_are_not_ignored(t, capsys, no_work):
    out = str(t / "studies")
    cases = [
        (
            ["small-data", "--smoke", "--set", "seed=5"],
            "--set seed: the small-data study sets seed for each run itself; use --set seeds (e.g. --set seeds=5,6,7)",
        ),
        (
            ["small-data", "--smoke", "--set", "run-name=mine"],
            "--set run-name: the small-data study sets run-name for each run itself",
        ),
        (
            ["small-data", "--smoke", "--set", "train-images=5000"],
            "[default-s0] --set train-images=5000: the digits training set has 1612 images (after the held-out part); "
            "must be in [1, 1612]",
        ),
        (
            ["small-data", "--smoke", "--set", "ema-decay=0.9", "--set", "ema-decay=0.8"],
            "--set ema-decay: given twice; give each key once",
        ),
        (
            ["small-data", "--smoke", "--fid-weights", "w.pth"],
            "--fid-weights: not read by the small-data study at --smoke size; drop it",
        ),
        (
            ["ablations", "--smoke", "--pretrained", "x"],
            "--pretrained: not read by the ablations study at --smoke size; drop it",
        ),
        (
            ["ablations", "--smoke", "--data-root", "/data"],
            "--data-root: not read by the ablations study at --smoke size; drop it",
        ),
        (["paper-cifar10", "--full", "--workers", "3"], "--workers: not read by the paper-cifar10 study; drop it"),
    ]
    for argv, line in cases:
        refused(t, capsys, lambda: studies.main(argv + ["--out", out]), STUDY + line)
    assert not (t / "studies").exists()


def test_a_small_data_dry_run_trains_nothing_and_writes_nothing(t, capsys, no_work, monkeypatch):
    import experiments.studies.small_data as sd

    monkeypatch.setattr(sd, "train_and_evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    assert studies.main(["small-data", "--smoke", "--dry-run", "--out", str(t / "studies")]) == 0
    out = capsys.readouterr().out
    assert "dry run: 10 runs (5 variants x 2 seeds)" in out and not (t / "studies").exists()


def test_a_refused_study_leaves_no_directory(t, capsys, no_work):
    refused(
        t,
        capsys,
        lambda: studies.main(["ablations", "--smoke", "--eval-samples", "1", "--out", str(t / "studies")]),
        STUDY + "--eval-samples = 1: must be >= 2",
    )
    n = f"{sum(p.numel() for p in build_unet('tiny', 16, 1).parameters()):,}"
    refused(
        t,
        capsys,
        lambda: studies.main(["finetune", "--smoke", "--pretrained", str(t / "rgb.pt"), "--out", str(t / "studies")]),
        STUDY + f"[pretrained-then-iet-agc] init-checkpoint = '{{t}}/rgb.pt': its raw weights do not match this "
        f"model (UNet2DModel, {n} parameters): conv_in.weight has shape [32, 3, 3, 3], the model needs "
        f"[32, 1, 3, 3]",
    )
    assert not (t / "studies").exists()


def test_script_run_configs_go_through_the_strict_parser(t, capsys):
    from fl_ietagc.settings.script_args import main

    cases = [
        (
            ["-c", "num-server-rounds = 1"],
            "run-config item 'num-server-rounds': expected key=value with no spaces "
            "around '=' (quote values with spaces: key=\"a b\")",
        ),
        (["-c", "lr=1e-3", "-c=lr=2e-3"], "-c 'lr=2e-3': lr is also given in 'lr=1e-3'; give each key once"),
        (
            ["-c", "num-clients=3"],
            "-c 'num-clients=3': num-clients = 3 contradicts the script's num-clients = 2 (set "
            "it through the script's own setting)",
        ),
        (["-c", "lr=abc"], "lr = 'abc': must be a number"),
        (["-c"], "-c: needs a value"),
    ]
    for args, line in cases:
        refused(
            t,
            capsys,
            lambda: main(["--script", "deploy-local", "--fixed", "num-clients=2", "--", *args]),
            "deploy-local: invalid input: " + line,
        )
    assert main(["--script", "deploy-local", "--fixed", "num-clients=2", "--", "-c", "num-clients=2 lr=1e-3"]) == 0


def test_keys_without_effect_get_one_warning_line_each_and_a_default_run_none(t, capsys, no_work, monkeypatch):
    from fl_ietagc.app_dir import check_app_project

    defaults = check_app_project(ROOT)["tool"]["flwr"]["app"]["config"]
    assert ineffective_keys(parse_config(defaults)) == []  # the pyproject repeats every default: no warning
    cfg = parse_config(
        {
            "sharding": "random",
            "dirichlet-alpha": 0.3,
            "agc": False,
            "agc-lambda": 3.0,
            "sample-count": 0,
            "sample-steps": 20,
        }
    )
    assert ineffective_keys(cfg) == [
        'dirichlet-alpha = 0.3 has no effect: only used with sharding = "dirichlet" (sharding is "random")',
        "agc-lambda = 3.0 has no effect: only used with agc = true",
        "sample-steps = 20 has no effect: sample-count = 0 (no final samples)",
    ]
    launched = []
    monkeypatch.setattr(simulate, "supervise", lambda *a, **k: launched.append(a) or 0)
    argv = ["--app", str(ROOT), "--backend-config", BACKEND, "--num-supernodes", "2", "--run-config"]
    assert simulate.main(argv + [f'output-dir="{t}/out" agc=false agc-lambda=3.0']) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: agc-lambda = 3.0 has no effect: only used with agc = true"
    ]
    assert simulate.main(argv + [f'output-dir="{t}/out"']) == 0
    assert capsys.readouterr().err == "" and len(launched) == 2


# --- Unclear (6): now saying what is wrong ---
def test_a_checkpoint_that_is_a_pipe_says_so(t, capsys, no_work):
    with pytest.raises(BadFileError, match=r"^.*pipe.pt: a named pipe \(FIFO\), not a checkpoint file$"):
        load_torch(t / "pipe.pt", "checkpoint")
    refused(
        t,
        capsys,
        sim(t, 'output-dir="{t}/out" init-checkpoint="{t}/pipe.pt"'),
        SIM + "init-checkpoint = '{t}/pipe.pt': a named pipe (FIFO); expected a file or a folder",
    )
    refused(
        t,
        capsys,
        lambda: simulate.main(["--app", str(ROOT), "--num-supernodes", "2", "--run-config", str(t / "pipe.toml")]),
        SIM + "config file {t}/pipe.toml: a named pipe (FIFO), not a TOML file",
    )


def test_captions_rows_name_the_line_and_what_is_wrong(tmp_path):
    from fl_ietagc.data.captions import check_rows, read_rows

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "quote.csv").write_text('file_name,text\na.png,"a dog\na.png,a cat\n')
    with pytest.raises(ConfigError) as e:
        read_rows(tmp_path / "quote.csv")
    assert str(e.value) == (
        f"{tmp_path}/quote.csv: line 2: not valid CSV (unexpected end of data; an unterminated quote?)"
    )
    (tmp_path / "fields.csv").write_text("file_name,text\na.png,a dog,extra\n")
    with pytest.raises(ConfigError) as e:
        read_rows(tmp_path / "fields.csv")
    assert str(e.value) == f"{tmp_path}/fields.csv: line 2: 3 field(s), the header has 2"
    (tmp_path / "number.jsonl").write_text(json.dumps({"file_name": "a.png", "text": 42}) + "\n")
    folder, rows, meta = read_rows(tmp_path / "number.jsonl")
    with pytest.raises(ConfigError) as e:
        check_rows(folder, rows, meta)
    assert str(e.value) == f"{tmp_path}/number.jsonl: row 1 (a.png): text is int 42, not a string"


SCRIPT_CASES = [
    (["make-certs.sh", "{t}/certs", "-k"], {}, "make-certs: invalid input: -k: needs a value"),
    (
        ["make-certs.sh", "{t}/certs", "--days", "-5"],
        {},
        "make-certs: invalid input: --days '-5': must be an integer in [1, 36500]",
    ),
    (
        ["make-certs.sh", "{t}/certs", "--port", "abc"],
        {},
        "make-certs: invalid input: --port 'abc': must be an integer in [1, 65535]",
    ),
    (
        ["make-certs.sh", "{t}/certs", "--port", "99999"],
        {},
        "make-certs: invalid input: --port '99999': must be an integer in [1, 65535]",
    ),
    (
        ["make-certs.sh", "{t}/certs", "--host", ""],
        {},
        "make-certs: invalid input: --host '': empty; give a host name or IP address (comma-separated for several)",
    ),
    (
        ["make-certs.sh", "{t}/certs", "-k", "2", "-k", "3"],
        {},
        "make-certs: invalid input: -k: given twice; give it once",
    ),
    (["make-certs.sh", "{t}/a-file"], {}, "make-certs: invalid input: DIR '{t}/a-file': exists and is not a directory"),
    (["deploy-local.sh"], {"K": "abc"}, "deploy-local: invalid input: K='abc': must be an integer in [1, 1000]"),
    (
        ["deploy-local.sh"],
        {"K": "2", "PORT": "65500"},
        "deploy-local: invalid input: PORT='65500': must be an integer in [1, 65433]",
    ),
    (["deploy-local.sh"], {"INSECURE": "yes"}, "deploy-local: invalid input: INSECURE='yes': must be 0 or 1"),
    (
        ["deploy-local.sh"],
        {"HOST": "a b"},
        "deploy-local: invalid input: HOST='a b': must be a host name or IP address (letters, digits, '.', '-', ':')",
    ),
]


@pytest.mark.parametrize(
    "argv,env,line", SCRIPT_CASES, ids=[" ".join(c[0][:1] + c[0][2:]) + str(c[1]) for c in SCRIPT_CASES]
)
def test_scripts_check_their_arguments_first(t, argv, env, line):
    before = listing(t)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", f"scripts/{argv[0]}", *(a.replace("{t}", str(t)) for a in argv[1:])],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [line.replace("{t}", str(t))] and proc.stdout == ""
    assert listing(t) == before and time.perf_counter() - t0 < 5


def test_overrides_parser_refuses_a_repeated_key():
    with pytest.raises(ConfigError, match=r"^run-config item 'seed=2': seed is given twice; give each key once$"):
        parse_overrides("seed=1 seed=2")
    assert parse_config({"seed": 2**32 - 1}).seed == 2**32 - 1  # seed keeps its own wider range


def test_sd_finetune_evaluation_inputs_are_checked_before_training(t, capsys, no_work):
    refused(
        t,
        capsys,
        lambda: studies.main(["sd-finetune", "--smoke", "--sscd", str(t / "pipe.pt"), "--out", str(t / "studies")]),
        STUDY + "--sscd = '{t}/pipe.pt': a named pipe (FIFO); expected a file",
    )
    refused(
        t,
        capsys,
        lambda: studies.main(["sd-finetune", "--smoke", "--clip-dir", str(t / "a-file"), "--out", str(t / "studies")]),
        STUDY + "--clip-dir = '{t}/a-file': a file; expected a folder",
    )


@pytest.mark.slow  # (builds the tiny Stable Diffusion parts: ~40 s on 2 busy cores)
def test_a_sd_finetune_smoke_dry_run_writes_nothing(t, capsys, no_work):
    # no_work forbids runner.train_run, which sd_finetune looks up at call time
    assert studies.main(["sd-finetune", "--smoke", "--dry-run", "--out", str(t / "studies")]) == 0
    assert "study sd-finetune (smoke): 5 runs" in capsys.readouterr().out and not (t / "studies").exists()
