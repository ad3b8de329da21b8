"""Text-to-image through the Flower app: a latent text-conditional UNet (tiny random Stable Diffusion parts saved as a
local checkpoint) fine-tuned by IET-AGC on image-caption pairs, by the real ServerApp and ClientApp (in-process grid).
"""

import numpy as np
import pytest
import torch

from fl_ietagc.data import latent
from fl_ietagc.runs.checkpoints import load_checkpoint
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, parse_config
from tests.local_grid import run_server


def caption_folder(root, n=24, size=16):
    """n images: a coloured square at a position that depends on i, captions naming colour and position."""
    from tests.t2i_fixtures import write_pairs

    rng = np.random.default_rng(0)
    arrays, captions = [], []
    for i in range(n):
        arr = np.full((size, size, 3), 255, np.uint8)
        x, y = (i * 3) % (size - 6), (i * 5) % (size - 6)
        arr[y : y + 6, x : x + 6] = rng.integers(0, 200, 3)
        arrays.append(arr)
        captions.append(f"square {i % 7} at {x} {y}")
    return write_pairs(root, arrays, captions)


@pytest.fixture(scope="module")
def t2i_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2i")
    sd = latent.save_components(latent.tiny_components(seed=0, image_size=16), base / "tiny-sd")
    return {
        "model-type": "latent-t2i",
        "dataset": "captions",
        "data-root": str(caption_folder(base / "pairs")),
        "pretrained-dir": str(sd),
        "image-size": 16,
        "batch-size": 4,
        "num-server-rounds": 2,
        "local-epochs": 3,
        "diffusion-steps": 4,
        "agc-lambda": 0.8,
        "warmup-steps": 2,
        "lr": 1e-3,
        "sample-count": 2,
        "sample-steps": 2,
        "num-clients": 2,
    }


def test_iet_agc_fine_tunes_the_text_conditional_unet_through_the_app(t2i_setup, tmp_path, monkeypatch):
    from fl_ietagc.loops.iet import run_iet_loop

    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    conf = {**t2i_setup, "output-dir": str(tmp_path)}
    torch.set_num_threads(1)
    try:
        run_server({**conf, "run-name": "app"}, 2)
        run_iet_loop(
            parse_config({**conf, "run-name": "loop"}), 2, torch.device("cpu"), RunDir.create(str(tmp_path), "loop", "")
        )
    finally:
        torch.set_num_threads(2)
    run = RunDir(tmp_path / "app")
    assert run.read_status()["status"] == "completed"
    metrics = run.read_metrics()
    # 21 training pairs (3 held out), shards of 11 and 10: 6 steps of 4 per round each; 4 timesteps, so the bank
    # slots fill at once
    assert [sorted(c["partition-id"] for c in m["clients"]) for m in metrics] == [[0, 1], [0, 1]]
    assert sum(m["skipped"] for m in metrics) > 0  # AGC skipped conditional latent losses
    assert (run.path / "samples.png").is_file()
    # the UNet trained and was averaged; the frozen parts' encodings were computed once and reused
    final = load_checkpoint(run.final_checkpoint)
    pretrained = latent.unet_for(t2i_setup["pretrained-dir"]).state_dict()
    assert final["net"].keys() == pretrained.keys()
    assert any(not torch.equal(final["net"][k], pretrained[k]) for k in pretrained)
    assert len(list((tmp_path / "cache" / "latents").glob("*.pt"))) == 1
    # the Flower-free loop (same rule, no Flower) ends bit-identical
    loop = load_checkpoint(RunDir(tmp_path / "loop").final_checkpoint)
    for part in ("net", "ema"):
        assert all(torch.equal(final[part][k], loop[part][k]) for k in final[part]), part


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dataset": "digits", "data-root": ""}, r"^model-type = 'latent-t2i': needs dataset = \"captions\""),
        ({"pretrained-dir": ""}, r"^pretrained-dir = '': model-type = \"latent-t2i\" fine-tunes"),
        ({"preset": "ddpm-cifar10"}, r"^preset = 'ddpm-cifar10': model-type = \"latent-t2i\" trains"),
        ({"model-type": "pixel"}, r"^model-type = 'pixel': dataset = \"captions\" needs model-type = \"latent-t2i\""),
    ],
)
def test_text_to_image_keys_are_checked_together(t2i_setup, change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**t2i_setup, **change})


def test_frozen_dtype_without_a_latent_model_8bit_adam_without_bitsandbytes_and_bad_sizes_are_refused(
    t2i_setup, tmp_path, monkeypatch
):
    from fl_ietagc.validate import validate_run

    with pytest.raises(ConfigError, match=r"^frozen-dtype = 'bf16': only used with model-type = \"latent-t2i\""):
        parse_config({"frozen-dtype": "bf16"})
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=r"^optimizer = 'adam8bit': needs bitsandbytes \(pip install "
        r"'fl-ietagc\[memory\]'\)",
    ):
        validate_run(parse_config({"optimizer": "adam8bit", "output-dir": str(tmp_path)}), 2)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"^image-size = 18: pretrained-dir's VAE and UNet downsample by 4"):
        validate_run(parse_config({**t2i_setup, "image-size": 18, "output-dir": str(tmp_path)}), 2)
    with pytest.raises(ConfigError, match=r"^pretrained-dir = '/nowhere': not a directory"):
        validate_run(parse_config({**t2i_setup, "pretrained-dir": "/nowhere", "output-dir": str(tmp_path)}), 2)


def test_gradient_checkpointing_trains_to_the_same_weights(t2i_setup, tmp_path, monkeypatch):
    """gradient-checkpointing recomputes activations in the backward pass: same gradients, same weights."""
    import copy

    from fl_ietagc.data.shards import shard_inputs
    from fl_ietagc.training.run_model import build_for_config
    from fl_ietagc.training.trainer import LocalTrainer, TrainState

    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    weights = []
    for checkpointing in (False, True):
        cfg = parse_config({**t2i_setup, "gradient-checkpointing": checkpointing})
        model = build_for_config(cfg)
        assert model.is_gradient_checkpointing == checkpointing
        inputs, cond = shard_inputs(cfg, np.arange(8))
        trainer = LocalTrainer(
            cfg, model, copy.deepcopy(model), inputs, TrainState.fresh(np.arange(8)), torch.device("cpu"), cond=cond
        )
        trainer.run(epochs=1, seed=3)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_checkpoints_own_noise_schedule_is_used_and_checked(t2i_setup, tmp_path):
    """A checkpoint with scheduler/ (as Stable Diffusion's): training and sampling use its schedule (SD's
    scaled_linear betas, not the pixel runs' linear ones); a v-prediction checkpoint, another number of timesteps
    or changed betas are refused naming the key."""
    import shutil

    from diffusers import DDPMScheduler

    from fl_ietagc.training.diffusion import Diffusion
    from fl_ietagc.validate import validate_run

    sd = tmp_path / "sd"
    shutil.copytree(t2i_setup["pretrained-dir"], sd)
    theirs = DDPMScheduler(num_train_timesteps=4, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    theirs.save_pretrained(sd / "scheduler")
    conf = {**t2i_setup, "pretrained-dir": str(sd), "output-dir": str(tmp_path / "runs")}
    ours = Diffusion.for_config(parse_config(conf))
    assert torch.allclose(ours._sqrt_abar.double() ** 2, theirs.alphas_cumprod.double(), atol=1e-7)
    validate_run(parse_config(conf), 2)
    with pytest.raises(ConfigError, match=r"^diffusion-steps = 1000: pretrained-dir's scheduler has 4 timesteps"):
        validate_run(parse_config({**conf, "diffusion-steps": 1000}), 2)
    with pytest.raises(ConfigError, match=r"^beta-end = 0.03: the noise schedule comes from pretrained-dir"):
        validate_run(parse_config({**conf, "beta-end": 0.03}), 2)
    DDPMScheduler(num_train_timesteps=4, prediction_type="v_prediction").save_pretrained(sd / "scheduler")
    with pytest.raises(
        ConfigError,
        match=r"its scheduler predicts 'v_prediction'; this project trains "
        r"epsilon-prediction only",
    ):
        validate_run(parse_config(conf), 2)


def test_8bit_adam_keeps_a_quantized_state_that_survives_the_client_state_file(t2i_setup, tmp_path, monkeypatch):
    """optimizer = adam8bit (bitsandbytes): the optimizer state of large tensors is 8-bit, and a client whose state
    went through its state file between rounds ends exactly where one that kept it in memory does."""
    pytest.importorskip("bitsandbytes")
    import copy

    from fl_ietagc.data.shards import shard_inputs
    from fl_ietagc.training.run_model import build_for_config
    from fl_ietagc.training.trainer import LocalTrainer, TrainState

    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path / "cache"))
    cfg = parse_config({**t2i_setup, "optimizer": "adam8bit"})
    inputs, cond = shard_inputs(cfg, np.arange(8))

    def two_rounds(through_file: bool):
        torch.manual_seed(0)
        model = build_for_config(cfg)
        ema = copy.deepcopy(model)
        state = TrainState.fresh(np.arange(8))
        for r in (1, 2):
            trainer = LocalTrainer(cfg, model, ema, inputs, state, torch.device("cpu"), cond=cond)
            trainer.run(epochs=1, seed=r)
            if through_file:
                state.save(tmp_path / f"state{r}.pt")
                state = TrainState.load(tmp_path / f"state{r}.pt", state.token, np.arange(8))
        return model.state_dict(), trainer.optimizer

    kept, optimizer = two_rounds(False)
    assert type(optimizer).__name__ == "Adam8bit"
    quantized = [
        v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dtype == torch.uint8
    ]
    assert quantized  # 8-bit moments for the large weight tensors
    reloaded, _ = two_rounds(True)
    assert all(torch.equal(kept[k], reloaded[k]) for k in kept)
