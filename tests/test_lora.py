"""LoRA adapters (lora-rank > 0): a text-to-image fine-tune through the real ServerApp and ClientApp trains, averages,
sends and checkpoints the adapters only, bit-identical to the Flower-free loop; the export loads into diffusers."""

import pytest
import torch

from fl_ietagc.data import latent
from fl_ietagc.runs.checkpoints import load_checkpoint, load_torch
from fl_ietagc.runs.rundir import RunDir
from fl_ietagc.settings.config import ConfigError, parse_config
from tests.local_grid import LocalGrid, run_server
from tests.test_t2i_federated import t2i_setup  # noqa: F401  (the tiny SD parts and captioned squares)

LORA = {"lora-rank": 4, "lora-alpha": 8.0, "lr": 1e-2}


class RecordingGrid(LocalGrid):
    """Keeps the bytes of every ArrayRecord the ServerApp sends and receives."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent_bytes = getattr(self, "sent_bytes", []) + [array_bytes(m.content["arrays"]) for m in messages]
        replies = super().send_and_receive(messages, timeout)
        self.reply_bytes = getattr(self, "reply_bytes", []) + [array_bytes(r.content["arrays"]) for r in replies]
        return replies


def array_bytes(record) -> int:
    return sum(a.numpy().nbytes for a in record.values())


@pytest.fixture(scope="module")
def lora_runs(t2i_setup, tmp_path_factory):  # noqa: F811
    """One LoRA fine-tune through the app (2 clients, 2 rounds) and the same in the Flower-free loop."""
    import os

    from fl_ietagc.loops.iet import run_iet_loop

    out = tmp_path_factory.mktemp("lora-runs")
    os.environ["FL_IETAGC_CACHE"] = str(out / "cache")
    conf = {**t2i_setup, **LORA, "output-dir": str(out)}
    torch.set_num_threads(1)
    try:
        grid = run_server({**conf, "run-name": "app"}, 2, RecordingGrid(2, {**conf, "run-name": "app"}))
        run_iet_loop(
            parse_config({**conf, "run-name": "loop"}), 2, torch.device("cpu"), RunDir.create(str(out), "loop", "")
        )
    finally:
        torch.set_num_threads(2)
        os.environ.pop("FL_IETAGC_CACHE", None)
    return conf, grid, RunDir(out / "app"), RunDir(out / "loop")


def lora_unet(conf):
    from fl_ietagc.training.run_model import build_for_config

    return build_for_config(parse_config(conf))


def test_lora_fine_tune_moves_only_adapters_and_equals_the_flower_free_loop(lora_runs):
    conf, grid, app, loop = lora_runs
    assert app.read_status()["status"] == "completed"
    assert sum(m["skipped"] for m in app.read_metrics()) > 0  # AGC's skip rule acts on the LoRA UNet's losses
    model = lora_unet(conf)
    adapters = {k for k, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert len(adapters) == 2 * 4 * sum(1 for n, _ in model.named_modules() if n.endswith(".to_q"))  # q,k,v,out x A,B
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    final = load_checkpoint(app.final_checkpoint)
    assert set(final["net"]) == set(final["ema"]) == adapters  # checkpoints hold the adapters only
    pretrained = latent.unet_for(conf["pretrained-dir"]).state_dict()
    assert not set(final["net"]) & set(pretrained)
    assert any(k.endswith("lora_B.default.weight") and final["net"][k].abs().sum() > 0 for k in final["net"])
    assert any(not torch.equal(final["net"][k], final["ema"][k]) for k in final["net"])
    # messages: raw + EMA adapters, fp32, both directions
    want = 2 * n_adapter * 4
    print(
        f"\nLoRA rank 4 on the tiny UNet: {n_adapter:,} adapter parameters, {n_base:,} frozen; message "
        f"{want:,} bytes (raw + EMA) vs {2 * n_base * 4:,} for the full UNet"
    )
    assert grid.sent_bytes == [want] * 4 and grid.reply_bytes == [want] * 4
    # client state: Adam's moments for the adapters only, nothing of the base
    state_file = app.client_state(0, 2)
    state = load_torch(state_file, "client state")
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert sum(t.numel() for t in moments) == 2 * n_adapter
    size = state_file.stat().st_size
    print(f"client state file {size:,} bytes (Adam moments {2 * n_adapter * 4:,} bytes + bank, ids, counts)")
    assert size < 2 * n_adapter * 4 + 64_000
    # the Flower-free loop ends bit-identical
    ref = load_checkpoint(loop.final_checkpoint)
    for part in ("net", "ema"):
        assert set(ref[part]) == set(final[part])
        assert all(torch.equal(final[part][k], ref[part][k]) for k in final[part]), part


def test_exported_adapters_load_into_diffusers_and_match_our_merged_unet(lora_runs, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fl_ietagc.export import export_pipeline
    from fl_ietagc.training.lora import merged_copy
    from fl_ietagc.training.models import load_weights

    conf, _, app, _ = lora_runs
    out = export_pipeline(app.path, tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["base.json", "pytorch_lora_weights.safetensors"]
    parts = latent.load_components(conf["pretrained-dir"], torch.float32)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),  # (a current SD config: no FutureWarning)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(out)
    ours = lora_unet(conf)
    load_weights(ours, load_checkpoint(app.final_checkpoint)["net"], "final raw adapters")
    merged = merged_copy(ours, latent.unet_for(conf["pretrained-dir"])).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 2, 3])
    cond = torch.randn(
        3, *parts.text_encoder(torch.zeros(1, 4, dtype=torch.long)).last_hidden_state.shape[1:], generator=gen
    )
    with torch.no_grad():
        theirs = pipe.unet.eval()(x, t, encoder_hidden_states=cond).sample
        mine = merged(x, t, encoder_hidden_states=cond).sample
        unmerged = ours.eval()(x, t, encoder_hidden_states=cond).sample
        base = latent.unet_for(conf["pretrained-dir"]).eval()(x, t, encoder_hidden_states=cond).sample
    assert (mine - base).abs().max() > 1e-3  # the adapters change the UNet...
    # ...and diffusers' loaded adapters give our merged UNet's outputs: fp32, merged vs unmerged arithmetic (1e-5)
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, mine, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora-targets": "to_q,nosuch"}, r"^lora-targets = 'to_q,nosuch': 'nosuch' names no Linear/Conv2d module"),
    ],
)
def test_lora_targets_are_checked_before_work(t2i_setup, change, message):  # noqa: F811
    from fl_ietagc.validate import check_model

    with pytest.raises(ConfigError, match=message):
        check_model(parse_config({**t2i_setup, **LORA, **change}))


def test_lora_keys_are_refused_where_they_cannot_apply():
    with pytest.raises(
        ConfigError,
        match=r"^lora-rank = 4: LoRA adapts a pretrained UNet; a pixel run needs "
        r"init-checkpoint",
    ):
        parse_config({"lora-rank": 4})
    with pytest.raises(ConfigError, match=r"^lora-targets = 'to_q': only used with lora-rank > 0$"):
        parse_config({"lora-targets": "to_q"})
    with pytest.raises(ConfigError, match=r"^lora-targets = 'to_q,,to_k': must be comma-separated module names"):
        parse_config({"lora-rank": 4, "init-checkpoint": "x.pt", "lora-targets": "to_q,,to_k"})


def test_pixel_lora_from_init_checkpoint_trains_adapters_and_exports_a_merged_pipeline(tmp_path):
    """A pixel run with init-checkpoint: the checkpoint's raw weights are the frozen base on every side; the
    Flower-free loop trains the adapters; export merges them into a plain DDIM pipeline."""
    from diffusers import DDIMPipeline

    from fl_ietagc.export import export_pipeline
    from fl_ietagc.loops.iet import run_iet_loop
    from fl_ietagc.runs.checkpoints import save_checkpoint
    from fl_ietagc.training.models import load_weights
    from fl_ietagc.training.run_model import build_for_config, initial_weights

    small = {
        "max-images": 64,
        "batch-size": 16,
        "local-epochs": 1,
        "num-server-rounds": 1,
        "diffusion-steps": 20,
        "sample-count": 0,
        "lr": 1e-2,
        "warmup-steps": 1,
    }
    net, ema = initial_weights(parse_config({**small, "seed": 3}))
    save_checkpoint(tmp_path / "base.pt", net, ema, server_round=0, config={})
    conf = {
        **small,
        "init-checkpoint": str(tmp_path / "base.pt"),
        "lora-rank": 2,
        "output-dir": str(tmp_path),
        "run-name": "r",
    }
    cfg = parse_config(conf)
    model = build_for_config(cfg)
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert base.keys() == net.keys() and all(torch.equal(base[k], net[k]) for k in net)  # the checkpoint's raw
    torch.set_num_threads(1)
    try:
        run_iet_loop(cfg, 2, torch.device("cpu"), RunDir.create(str(tmp_path), "r", ""))
    finally:
        torch.set_num_threads(2)
    final = load_checkpoint(RunDir(tmp_path / "r").final_checkpoint)
    assert set(final["net"]) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in k and final["net"][k].abs().sum() > 0 for k in final["net"])  # trained: B A != 0
    pipe = DDIMPipeline.from_pretrained(export_pipeline(tmp_path / "r", tmp_path / "export"))
    load_weights(model, final["net"], "final raw adapters")
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 15])
    with torch.no_grad():
        ours, theirs = model.eval()(x, t).sample, pipe.unet.eval()(x, t).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # merged weights vs base + B A: fp32 rounding
