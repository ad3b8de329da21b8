"""Starting a run from a checkpoint (fine-tuning): exact load, clear errors."""

import copy
import json

import pytest
import torch

from fl_ietagc.runs.checkpoints import save_checkpoint
from fl_ietagc.settings.config import ConfigError, parse_config
from fl_ietagc.training.models import build_unet
from fl_ietagc.training.run_model import initial_weights


def test_initial_weights_come_from_the_checkpoint(tmp_path):
    net = build_unet("tiny", 16, 1)
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, net.state_dict(), ema.state_dict(), server_round=3, config={})
    got_net, got_ema = initial_weights(parse_config({"init-checkpoint": str(path)}))
    for k, v in net.state_dict().items():
        assert torch.equal(got_net[k], v) and torch.equal(got_ema[k], ema.state_dict()[k])


def test_fresh_weights_depend_on_the_seed_only():
    a, _ = initial_weights(parse_config({"seed": 1}))
    b, _ = initial_weights(parse_config({"seed": 1}))
    c, _ = initial_weights(parse_config({"seed": 2}))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    other = build_unet("tiny", 32, 3)  # 3 channels: does not fit digits
    path = tmp_path / "rgb.pt"
    save_checkpoint(path, other.state_dict(), other.state_dict(), server_round=1, config={})
    with pytest.raises(ValueError, match="init-checkpoint .* do not match this model"):
        initial_weights(parse_config({"init-checkpoint": str(path)}))


def test_missing_or_foreign_checkpoint_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^init-checkpoint = .*nope.pt.: no such file or directory \(relative to "):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "nope.pt")}))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="^init-checkpoint = .*not an fl-ietagc checkpoint"):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "foreign.pt")}))


def test_a_diffusers_unet_directory_is_loaded_into_raw_and_ema(tmp_path):
    pretrained = build_unet("tiny", 16, 1)
    pretrained.save_pretrained(tmp_path / "unet")
    net, ema = initial_weights(parse_config({"init-checkpoint": str(tmp_path / "unet")}))
    for k, v in pretrained.state_dict().items():
        assert torch.equal(net[k], v) and torch.equal(ema[k], v)


def test_the_paper_preset_is_google_ddpm_cifar10_32(tmp_path):
    """google/ddpm-cifar10-32's published UNet config, field by field, loads into the ddpm-cifar10 preset."""
    from diffusers import UNet2DModel

    from fl_ietagc.training.models import load_diffusers_unet

    google = UNet2DModel(
        act_fn="silu",
        attention_head_dim=None,
        block_out_channels=(128, 256, 256, 256),
        center_input_sample=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        in_channels=3,
        layers_per_block=2,
        mid_block_scale_factor=1,
        norm_eps=1e-06,
        norm_num_groups=32,
        out_channels=3,
        sample_size=32,
        time_embedding_type="positional",
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    google.save_pretrained(tmp_path / "ddpm-cifar10-32")
    ours = build_unet("ddpm-cifar10", 32, 3)
    loaded = load_diffusers_unet(ours, str(tmp_path / "ddpm-cifar10-32"))
    assert list(loaded) == list(ours.state_dict())  # every key of the preset, in its order, no extra
    for k, v in google.state_dict().items():
        assert torch.equal(loaded[k], v), k
    ours.load_state_dict(loaded)  # strict: shapes and keys fit the preset
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in google.state_dict().items())


def test_a_diffusers_unet_of_another_architecture_names_the_difference(tmp_path):
    other = build_unet("tiny", 16, 1)
    other.register_to_config(norm_eps=1e-3)  # same tensor shapes, different computation
    other.save_pretrained(tmp_path / "eps")
    with pytest.raises(ConfigError, match=r"^init-checkpoint = .*architecture differs.*norm_eps"):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "eps")}))
    build_unet("tiny", 32, 3).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match=r"in_channels: ours 1 vs 3"):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "rgb")}))


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: setting the variable now would not stop it from
    # trying the network, so the constant itself is patched.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="^init-checkpoint = 'google/no-such-unet': cannot load a diffusers") as e:
        initial_weights(parse_config({"init-checkpoint": "google/no-such-unet"}))
    assert "cause: OfflineModeIsEnabled: Cannot reach https://huggingface.co/google/no-such-unet/" in str(e.value)
    assert "offline mode is enabled" in str(e.value)


def test_unloadable_diffusers_directories_name_the_cause(tmp_path):
    from fl_ietagc.training.models import load_diffusers_unet

    model = build_unet("tiny", 16, 1)
    with pytest.raises(
        ConfigError,
        match=r"^init-checkpoint = '.*empty': cannot load a diffusers UNet2DModel "
        r"from it \(OSError: Error no file named config.json found in directory",
    ):
        (tmp_path / "empty").mkdir()
        load_diffusers_unet(model, str(tmp_path / "empty"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(
        ConfigError,
        match=r"\(OSError: It looks like the config file at .*badjson/config.json' is "
        r"not a valid JSON file\.; cause: JSONDecodeError: ",
    ):
        load_diffusers_unet(model, str(tmp_path / "badjson"))
    # weights that do not fit their own config.json: torch's state-dict error (diffusers < 0.42), or diffusers' own
    # shape check naming the tensor (0.42: ValueError)
    model.save_pretrained(tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps({**config, "in_channels": 3}))
    with pytest.raises(
        ConfigError,
        match=r"\((RuntimeError: Error\(s\) in loading state_dict for UNet2DModel:|"
        r"ValueError: Cannot load .*conv_in\.weight expected shape "
        r"torch\.Size\(\[32, 3, 3, 3\]\), but got torch\.Size\(\[32, 1, 3, 3\]\))",
    ):
        load_diffusers_unet(model, str(tmp_path / "mismatch"))


def test_a_bug_while_loading_is_not_reported_as_a_bad_checkpoint(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    from fl_ietagc.training.models import load_diffusers_unet

    def broken(*args, **kwargs):
        raise KeyError("a bug, not an unloadable checkpoint")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", broken)
    with pytest.raises(KeyError, match="a bug"):
        load_diffusers_unet(build_unet("tiny", 16, 1), str(tmp_path))

    def other_runtime_error(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", other_runtime_error)
    with pytest.raises(RuntimeError, match="^CUDA error"):
        load_diffusers_unet(build_unet("tiny", 16, 1), str(tmp_path))


def test_centralized_training_starts_from_init_checkpoint(tmp_path, monkeypatch):
    """Centralized training honours init-checkpoint (it used to train from scratch): its round-0 commit
    point holds the checkpoint's raw and EMA weights, not the seed's."""
    from fl_ietagc.loops.centralized import run_centralized
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.training.trainer import LocalTrainer

    net, ema = initial_weights(parse_config({"seed": 7}))
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in ema.items()}
    save_checkpoint(tmp_path / "start.pt", net, ema, server_round=3, config={})

    def stop(self, *a, **k):
        raise RuntimeError("stop after the start")

    monkeypatch.setattr(LocalTrainer, "run", stop)
    cfg = parse_config(
        {
            "agc": False,
            "init-checkpoint": str(tmp_path / "start.pt"),
            "output-dir": str(tmp_path),
            "run-name": "b",
            "sample-count": 0,
        }
    )
    with pytest.raises(RuntimeError, match="stop after the start"):
        run_centralized(cfg, progress=False)
    blob = RunDir(tmp_path / "b").read_resume()
    assert blob["round"] == 0
    assert all(torch.equal(blob["net"][k], net[k]) for k in net)
    assert all(torch.equal(blob["ema"][k], ema[k]) for k in ema)
    fresh, _ = initial_weights(parse_config({"seed": 0}))
    assert not all(torch.equal(blob["net"][k], fresh[k]) for k in net)
