"""Bad input is refused before any work starts: over 100 malformed inputs to flower-simulation, fl-ietagc
(centralized, resume, evaluate, config) and fl-ietagc-study.

Each case asserts the exit code (2: bad input), that the one-line message names the key or the file and
what is wrong, that no simulation process (hence no Ray) was started and no run directory was created,
and that the refusal took well under the time Ray needs to start (~6 s here).
"""

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from experiments.launch import simulate
from experiments.studies import cli as studies
from experiments.studies import runner
from fl_ietagc import cli
from fl_ietagc.runs.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
BACKEND = '{"client_resources": {"num_cpus": 1}}'


class Evil:
    """Unpickling this writes a marker file: a file that runs code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    (t / "out").mkdir()
    (t / "a-file").write_text("x")
    (t / "empty.pt").write_bytes(b"")
    (t / "corrupt.pt").write_bytes(os.urandom(300))
    (t / "foreign.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, t / "foreign.pt")
    with open(t / "evil.pt", "wb") as f:
        pickle.dump(Evil(t / "marker"), f)
    torch.save({"format": "fl-ietagc-checkpoint/1", "evil": Evil(t / "marker")}, t / "evil-torch.pt")
    (t / "unet-dir").mkdir()
    (t / "bad.toml").write_text("lr = = 3\n")
    (t / "nested.toml").write_text("[model]\npreset = 'tiny'\n")
    (t / "unknown.toml").write_text("learning-rate = 0.1\n")
    (t / "notes.txt").write_text("this is not toml at all ===\n")
    (t / "images").mkdir()
    # run directories in the output dir: completed, killed (process gone), live (this process), failed early
    for name, status in [
        ("taken", {"status": "completed"}),
        ("stale", {"status": "running", "pid": 2**22 + 7}),
        ("live", {"status": "running"}),
        ("early", {"status": "failed"}),
    ]:
        run = RunDir(t / "out" / name)
        run.path.mkdir()
        run.write_config({"kind": "federated", "num_clients": 2})
        run.write_status(**{"status": status.pop("status")})
        if status:
            s = json.loads(run.status_path.read_text())
            run.status_path.write_text(json.dumps({**s, **status}))
    central = RunDir(t / "central")
    central.path.mkdir()
    central.write_config({"kind": "centralized", "num_clients": 1})
    central.write_status("failed")
    corrupt = RunDir(t / "corrupt-run")
    corrupt.path.mkdir()
    corrupt.config_path.write_text("{oops")
    return t


def sim(overrides="", *args, k="2", backend=BACKEND):
    argv = ["--app", str(ROOT), "--backend-config", backend]
    if k is not None:
        argv += ["--num-supernodes", k]
    out = "" if overrides and "output-dir=" in overrides else 'output-dir="{t}/out" '  # (a key given twice is refused)
    return ("sim", argv + (["--run-config", f"{out}{overrides}"] if overrides is not None else []) + list(args))


def sim_raw(*argv):
    return ("sim", [*([] if "--app" in argv else ["--app", str(ROOT)]), *argv])  # (an option given twice is refused)


def fl(*argv):
    return ("cli", list(argv))


# (id, command, expected message regex); every case must exit 2. {t} is the fixture directory.
CASES = [
    # --- run-config text: parsed completely or refused ---
    ("spaces-around-equals", sim("num-server-rounds = 1"), r"run-config item 'num-server-rounds': expected key=value"),
    ("empty-value", sim("lr="), r"run-config item 'lr=': lr has no value"),
    ("unbalanced-quote", sim('run-name="abc'), r"unbalanced quotes"),
    ("not-a-number", sim("lr=abc"), r"lr = 'abc': must be a number"),
    ("negative-lr", sim("lr=-1"), r"lr = -1.0: must be > 0"),
    ("nan-lr", sim("lr=nan"), r"lr = nan: must be finite"),
    ("inf-lr", sim("lr=inf"), r"lr = inf: must be finite"),
    ("zero-rounds", sim("num-server-rounds=0"), r"num-server-rounds = 0: must be >= 1"),
    ("fractional-rounds", sim("num-server-rounds=1.5"), r"num-server-rounds = 1.5: must be an integer"),
    ("bool-rounds", sim("num-server-rounds=true"), r"num-server-rounds = True: must be an integer"),
    ("string-rounds", sim('num-server-rounds="3"'), r"num-server-rounds = '3': must be an integer"),
    ("zero-batch", sim("batch-size=0"), r"batch-size = 0: must be >= 1"),
    ("negative-epochs", sim("local-epochs=-1"), r"local-epochs = -1: must be >= 1"),
    ("agc-yes", sim("agc=yes"), r"agc = 'yes': must be true or false"),
    ("agc-1", sim("agc=1"), r"agc = 1: must be true or false"),
    ("zero-lambda", sim("agc-lambda=0"), r"agc-lambda = 0.0: must be > 0"),
    ("bank-decay-1", sim("agc-bank-decay=1.0"), r"agc-bank-decay = 1.0: must be in \[0, 1\)"),
    ("ema-decay-1", sim("ema-decay=1"), r"ema-decay = 1.0: must be in \[0, 1\)"),
    ("unknown-dataset", sim('dataset="imagenet"'), r"dataset = 'imagenet': must be one of digits"),
    ("unknown-preset", sim('preset="huge"'), r"preset = 'huge': must be one of tiny"),
    ("unknown-sharding", sim('sharding="x"'), r"sharding = 'x': must be one of balanced"),
    ("unknown-hflip", sim('hflip="maybe"'), r"hflip = 'maybe': must be one of auto"),
    ("unknown-device", sim('device="tpu"'), r"device = 'tpu': must be one of auto, cpu, cuda"),
    ("unknown-strategy", sim('strategy="fedfoo"'), r"strategy = 'fedfoo': must be one of"),
    ("negative-seed", sim("seed=-1"), r"seed = -1: must be in \[0, 2\^32\)"),
    ("seed-2-32", sim("seed=4294967296"), r"seed = 4294967296: must be in \[0, 2\^32\)"),
    ("zero-beta-start", sim("beta-start=0"), r"beta-start = 0.0: must be in \(0, 1\)"),
    ("beta-end-over-1", sim("beta-end=1.5"), r"beta-end = 1.5: must be in \(0, 1\)"),
    ("beta-order", sim("beta-start=0.03"), r"beta-end = 0.02: must be > beta-start \(0.03\)"),
    ("one-timestep", sim("diffusion-steps=1"), r"diffusion-steps = 1: must be >= 2"),
    ("holdout-half", sim("holdout-fraction=0.5"), r"holdout-fraction = 0.5: must be in \[0, 0.5\)"),
    ("ret-fraction-range", sim("ret-fraction=0.6"), r"ret-fraction = 0.6: must be in \(0, 0.5\]"),
    ("ret-fraction-unused", sim("ret-fraction=0.2"), r"ret-fraction = 0.2: only used with ret-every > 0"),
    ("taa-without-agc", sim("taa=true agc=false"), r"taa = true: threshold-aware augmentation needs agc = true"),
    ("taa-gamma-unused", sim("taa-gamma=2.0"), r"taa-gamma / taa-max-shift: only used with taa = true"),
    ("taa-gamma-range", sim("taa=true taa-gamma=1.0"), r"taa-gamma = 1.0: must be > 1"),
    ("dp-noise-without-clip", sim("dp-noise-multiplier=1.0"), r"dp-noise-multiplier = 1.0: needs dp-clip-norm > 0"),
    ("foreign-strategy-key", sim("fedprox-mu=0.5"), r"fedprox-mu = 0.5: only used by strategy fedprox, not iet"),
    ("trim-beta-range", sim('strategy="fedtrimmedavg" trim-beta=0.5'), r"trim-beta = 0.5: must be in \(0, 0.5\)"),
    (
        "min-fraction-unused",
        sim("min-clients-fraction=0.5"),
        r'min-clients-fraction = 0.5: only used with client-failures = "tolerate"',
    ),
    (
        "min-fraction-zero",
        sim('client-failures="tolerate" min-clients-fraction=0'),
        r"min-clients-fraction = 0.0: must be in \(0, 1\]",
    ),
    ("unknown-failure-policy", sim('client-failures="ignore"'), r"client-failures = 'ignore': must be one of fail"),
    ("unknown-key-lr", sim("lrr=0.1"), r"unknown run-config key\(s\): lrr \(did you mean lr\?\)"),
    ("unknown-key-rounds", sim("num-rounds=3"), r"num-rounds \(did you mean num-server-rounds\?\)"),
    ("digits-with-root", sim('data-root="/x"'), r"data-root = '/x': digits is embedded"),
    ("folder-without-root", sim('dataset="folder"'), r"data-root = '': dataset folder needs the path"),
    (
        "folder-missing-root",
        sim('dataset="folder" data-root="{t}/nope"'),
        r"data-root = '.*/nope': path does not exist",
    ),
    (
        "folder-download",
        sim('dataset="folder" data-root="{t}/images" data-download=true'),
        r"data-download = true: dataset folder cannot be downloaded",
    ),
    ("image-size-not-8", sim("image-size=12"), r"image-size = 12: must be a multiple of 8"),
    (
        "image-size-preset",
        sim('image-size=8 preset="ddpm-afhq64"'),
        r"image-size = 8: preset ddpm-afhq64 downsamples by 16, so the image size must be a multiple of 16",
    ),
    ("negative-image-size", sim("image-size=-8"), r"image-size = -8: must be >= 0"),
    ("num-clients-mismatch", sim("num-clients=3"), r"num-clients = 3 but --num-supernodes = 2"),
    ("too-few-images", sim("max-images=40"), r"num-clients = 2: 40 training images cannot give 2 shards"),
    ("huge-batch", sim("batch-size=100000"), r"cannot give 2 shards of at least 100000 image\(s\) \(batch-size\)"),
    ("checkpoint-every-0", sim("checkpoint-every=0"), r"checkpoint-every = 0: must be >= 1"),
    ("sample-steps-0", sim("sample-steps=0"), r"sample-steps = 0: must be >= 1"),
    ("sample-count-negative", sim("sample-count=-1"), r"sample-count = -1: must be >= 0"),
    ("timeout-0", sim("round-timeout-s=0"), r"round-timeout-s = 0.0: must be > 0"),
    ("dirichlet-alpha-0", sim('sharding="dirichlet" dirichlet-alpha=0'), r"dirichlet-alpha = 0.0: must be > 0"),
    ("max-images-negative", sim("max-images=-5"), r"max-images = -5: must be >= 0"),
    ("warmup-negative", sim("warmup-steps=-1"), r"warmup-steps = -1: must be >= 0"),
    ("grad-clip-negative", sim("grad-clip=-1"), r"grad-clip = -1.0: must be >= 0"),
    ("taa-shift-0", sim("taa=true taa-max-shift=0"), r"taa-max-shift = 0: must be >= 1"),
    (
        "fedavgm-momentum-1",
        sim('strategy="fedavgm" fedavgm-momentum=1'),
        r"fedavgm-momentum = 1.0: must be in \[0, 1\)",
    ),
    ("fedopt-eta-0", sim('strategy="fedadam" fedopt-eta=0'), r"fedopt-eta = 0.0: must be > 0"),
    # --- paths and run directories ---
    ("run-name-slash", sim('run-name="a/b"'), r"run-name = 'a/b': must be a plain directory name"),
    ("run-name-dotdot", sim('run-name=".."'), r"run-name = '..': must be a plain directory name"),
    ("run-name-hidden", sim('run-name=".x"'), r"run-name = '.x': must be a plain directory name"),
    ("run-name-spaces", sim('run-name=" x"'), r"run-name = ' x': must be a plain directory name"),
    (
        "run-name-completed",
        sim('run-name="taken"'),
        r"run-name = 'taken': .*/out/taken already exists: it holds a "
        r"completed run; choose another run-name",
    ),
    (
        "run-name-killed",
        sim('run-name="stale"'),
        r"it holds a run whose process is gone \(killed\?\); continue it "
        r"with: fl-ietagc resume .*/out/stale",
    ),
    ("run-name-live", sim('run-name="live"'), r"a run is still writing it .* choose another run-name"),
    ("run-name-failed", sim('run-name="early"'), r"it holds a failed run; fix the cause and continue it with"),
    ("output-dir-file", sim('output-dir="{t}/a-file/runs"'), r"output-dir = '.*/a-file/runs': .*/a-file is a file"),
    ("cuda-without-gpu", sim('device="cuda"'), r"device = 'cuda': no CUDA GPU is visible here"),
    (
        "init-relative-missing",
        sim('init-checkpoint="ckpt/missing.pt"'),
        r"init-checkpoint = 'ckpt/missing.pt': no such file or directory",
    ),
    ("init-empty", sim('init-checkpoint="{t}/empty.pt"'), r"init-checkpoint = '.*empty.pt': .*empty.pt: empty file"),
    ("init-corrupt", sim('init-checkpoint="{t}/corrupt.pt"'), r"corrupt.pt: not a readable checkpoint"),
    ("init-pickle-code", sim('init-checkpoint="{t}/evil.pt"'), r"evil.pt: not a readable checkpoint"),
    (
        "init-torch-code",
        sim('init-checkpoint="{t}/evil-torch.pt"'),
        r"evil-torch.pt: not a readable checkpoint \(UnpicklingError",
    ),
    ("init-foreign", sim('init-checkpoint="{t}/foreign.pt"'), r"foreign.pt is not an fl-ietagc checkpoint"),
    (
        "init-dir-not-unet",
        sim('init-checkpoint="{t}/unet-dir"'),
        r"init-checkpoint = '.*unet-dir': cannot load a diffusers UNet2DModel from it",
    ),
    ("resume-from-missing", sim('resume-from="{t}/nope"'), r"resume: .*/nope is not a run directory"),
    # --- config files ---
    ("toml-syntax", sim(None, "--run-config", "{t}/bad.toml"), r"config file .*bad.toml: not valid TOML"),
    ("toml-missing", sim(None, "--run-config", "{t}/missing.toml"), r"config file .*missing.toml: not found"),
    (
        "toml-nested",
        sim(None, "--run-config", "{t}/nested.toml"),
        r"nested.toml: run-config keys are flat; tables are "
        r"not keys \(model\)",
    ),
    ("toml-unknown-key", sim(None, "--run-config", "{t}/unknown.toml"), r"learning-rate"),
    ("toml-not-toml-suffix", sim(None, "--run-config", "{t}/notes.txt"), r"notes.txt: not valid TOML"),
    (
        "toml-nonexistent-plain",
        sim(None, "--run-config", "nothing-here"),
        r"run-config 'nothing-here': neither key=value items nor an existing .toml file",
    ),
    # --- backend config: resources that cannot be granted are an error, never a wait ---
    ("backend-not-json", sim("", backend="{"), r"--backend-config is not valid JSON"),
    ("backend-list", sim("", backend="[]"), r"--backend-config must be a JSON object"),
    (
        "backend-gpu-without-gpu",
        sim("", backend='{"client_resources": {"num_gpus": 1}}'),
        r"client_resources.num_gpus = 1: no CUDA GPU is visible here",
    ),
    (
        "backend-too-many-cpus",
        sim("", backend='{"client_resources": {"num_cpus": 4096}}'),
        r"client_resources.num_cpus = 4096: this machine has \d+ CPUs; a client could never be scheduled",
    ),
    (
        "backend-negative-cpus",
        sim("", backend='{"client_resources": {"num_cpus": -1}}'),
        r"client_resources.num_cpus = -1: must be a number >= 0",
    ),
    (
        "backend-string-cpus",
        sim("", backend='{"client_resources": {"num_cpus": "two"}}'),
        r"client_resources.num_cpus = 'two': must be a number >= 0",
    ),
    (
        "backend-unknown-resource",
        sim("", backend='{"client_resources": {"gpus": 1}}'),
        r"client_resources: unknown key\(s\) \['gpus'\]",
    ),
    ("backend-unknown-key", sim("", backend='{"foo": 1}'), r"unknown --backend-config key\(s\) \['foo'\]"),
    ("backend-resources-list", sim("", backend='{"client_resources": []}'), r"client_resources: must be a JSON object"),
    # --- flower-simulation's own options ---
    (
        "ray-address-unreachable",
        sim("", "--ray-address", "127.0.0.1:1"),
        r"--ray-address 127.0.0.1:1: no Ray cluster answers there \(Connection refused\); start its head with "
        r"`ray start --head --port 1`",
    ),
    (
        "ray-address-url",
        sim("", "--ray-address", "ray://10.0.0.5:10001"),
        r"--ray-address ray://10.0.0.5:10001: give the head's HOST:PORT .*not a ray:// URL",
    ),
    ("ray-address-no-port", sim("", "--ray-address", "headnode"), r"--ray-address headnode: expected HOST:PORT"),
    ("zero-supernodes", sim("", k="0"), r"--num-supernodes = 0: must be >= 1"),
    ("no-supernodes", sim("", k=None), r"--num-supernodes is required"),
    ("app-without-pyproject", sim_raw("--app", "{t}", "--num-supernodes", "2"), r"--app .*: no pyproject.toml there"),
    ("resume-missing", sim_raw("--resume", "{t}/nope"), r"--resume .*/nope: not a run directory"),
    ("resume-completed", sim_raw("--resume", "{t}/out/taken"), r"holds a completed run; nothing to resume"),
    ("resume-live", sim_raw("--resume", "{t}/out/live"), r"is still being written by .* pid \d+; stop that process"),
    (
        "resume-no-commit",
        sim_raw("--resume", "{t}/out/early"),
        r"has no resume.pt \(the run stopped before it "
        r"started training\)",
    ),
    (
        "resume-changed-config",
        sim_raw("--resume", "{t}/out/stale", "--run-config", "lr=0.5"),
        r"--resume: a resumed run keeps its config; these differ: lr = 0.5 \(run has 0.002\)",
    ),
    (
        "resume-other-k",
        sim_raw("--resume", "{t}/out/stale", "--num-supernodes", "3"),
        r"--num-supernodes = 3: the run has 2 clients",
    ),
    ("resume-centralized", sim_raw("--resume", "{t}/central"), r"a centralized run; continue it with fl-ietagc resume"),
    ("resume-corrupt-config", sim_raw("--resume", "{t}/corrupt-run"), r"corrupt-run/config.json: corrupt run config"),
    # --- fl-ietagc centralized / resume / config / evaluate ---
    ("centralized-empty-value", fl("centralized", "--run-config", "lr="), r"lr has no value"),
    ("centralized-agc-without-flag", fl("centralized", "--run-config", "agc=true"), r"agc = true: use --agc"),
    ("centralized-config-missing", fl("centralized", "--config", "{t}/missing.toml"), r"missing.toml: not found"),
    ("centralized-config-syntax", fl("centralized", "--config", "{t}/bad.toml"), r"bad.toml: not valid TOML"),
    (
        "centralized-match-negative",
        fl("centralized", "--match-federated", "-1", "--run-config", 'output-dir="{t}/out"'),
        r"--match-federated = -1: must be >= 0",
    ),
    (
        "centralized-run-name-taken",
        fl("centralized", "--run-config", 'output-dir="{t}/out" run-name="taken"'),
        r"holds a completed run",
    ),
    (
        "centralized-too-few-images",
        fl("centralized", "--run-config", 'output-dir="{t}/out" max-images=10'),
        r"batch-size = 32: .*10",
    ),
    (
        "centralized-resume-federated",
        fl("centralized", "--resume", "{t}/out/stale"),
        r"resume: .*/out/stale is a federated run, not a centralized one",
    ),
    ("baseline-alias-unknown-key", fl("baseline", "--run-config", "rounds=3"), r"unknown run-config key\(s\): rounds"),
    ("resume-cli-missing", fl("resume", "{t}/nope"), r"resume: .*/nope is not a run directory"),
    ("resume-cli-completed", fl("resume", "{t}/out/taken"), r"holds a completed run; nothing to resume"),
    ("resume-cli-corrupt", fl("resume", "{t}/corrupt-run"), r"config.json: corrupt run config"),
    ("config-check-bad", fl("config", "--check", "x=1"), r"unknown run-config key\(s\): x"),
    ("config-check-syntax", fl("config", "--check", "lr = 1"), r"run-config item 'lr': expected key=value"),
    ("evaluate-missing-run", fl("evaluate", "{t}/nope", "--no-fid"), r"nope"),
]


def run_case(command, argv):
    if command == "sim":
        return simulate.main(argv)
    if command == "cli":
        return cli.main(argv)
    raise AssertionError(command)


@pytest.mark.parametrize("name,case,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_work(name, case, message, files, no_work, capsys):
    command, argv = case
    argv = [a.replace("{t}", str(files)) for a in argv]
    before = sorted(p.name for p in (files / "out").iterdir())
    t0 = time.perf_counter()
    code = run_case(command, argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line
    import re

    assert re.search(message.replace("{t}", re.escape(str(files))), lines[0]), lines[0]
    assert sorted(p.name for p in (files / "out").iterdir()) == before  # no run directory was created
    assert not (files / "marker").exists()  # no file given by the user ran code
    assert seconds < 5, seconds  # well under Ray's start-up


def test_there_are_over_100_cases():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


def test_a_bad_study_name_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        studies.main(["no-such-study", "--smoke"])
    assert e.value.code == 2 and "invalid choice: 'no-such-study'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["paper-cifar10", "--full", "--data-root", "{t}/nope"],
            r"\[default-training\] data-root = '.*/nope': path does not "
            r"exist",
        ),
        (["ablations", "--smoke", "--gpus-per-client", "0.5"], None),  # smoke runs use no GPU: valid
        (["paper-cifar10", "--full", "--gpus-per-client", "-1"], r"--gpus-per-client = -1.0: must be >= 0"),
        (["ablations", "--smoke", "--eval-samples", "1"], r"--eval-samples = 1: must be >= 2"),
        (["finetune", "--full"], r"--pretrained: finetune --full needs"),
        (["ablations", "--smoke", "--fid-weights", "{t}/evil.pt"], r"--fid-weights .*evil.pt"),
    ],
)
def test_a_study_checks_every_run_before_the_first_trains(argv, message, files, no_work, capsys, monkeypatch):
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    argv = [a.replace("{t}", str(files)) for a in argv] + ["--out", str(files / "studies")]
    if message is None:
        with pytest.raises(AssertionError, match="trained"):  # validation passed, the first run would start
            studies.main(argv)
        return
    assert studies.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    import re

    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (files / "marker").exists()
