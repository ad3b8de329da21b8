"""Speed keys: bf16 autocast, channels-last and torch.compile change speed, not what is trained or skipped."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fl_ietagc.data.datasets import load_splits
from fl_ietagc.data.pixels import to_model_range
from fl_ietagc.settings.config import ConfigError, RunConfig, parse_config, parse_overrides
from fl_ietagc.training import compiled
from fl_ietagc.training.agc import MemoryBank
from fl_ietagc.training.diffusion import Diffusion, sample
from fl_ietagc.training.models import build_unet
from fl_ietagc.training.precision import unet_forward
from fl_ietagc.training.run_model import build_for_config
from fl_ietagc.training.trainer import LocalTrainer, TrainState

CFG = parse_config({"batch-size": 8, "diffusion-steps": 1000})
N = 32


def fixed_batch(n=16, seed=0):
    """A digits batch, distinct timesteps spread over the schedule, seeded noise; an eval-mode tiny UNet."""
    torch.manual_seed(seed)
    model = build_for_config(CFG).eval()
    x0 = to_model_range(load_splits(CFG).train.images[:n])
    t = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))[:n]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x0, t, noise


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def trainer_for(cfg, model=None, state=None):
    torch.manual_seed(0)
    model = model if model is not None else build_for_config(cfg)
    images = load_splits(cfg).train.images[:N]
    state = state or TrainState.fresh(torch.arange(N))
    return LocalTrainer(cfg, model, copy.deepcopy(model), images, state, torch.device("cpu"))


# --- configuration -----------------------------------------------------------------------------------------


def test_defaults_are_fp32_contiguous_eager():
    cfg = RunConfig()
    assert (cfg.precision, cfg.channels_last, cfg.compile) == ("fp32", False, False)
    cfg = parse_config(parse_overrides("precision=bf16 channels-last=true compile=true"))
    assert (cfg.precision, cfg.channels_last, cfg.compile) == ("bf16", True, True)


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"precision": "fp16"}, "precision", "must be one of fp32, bf16"),
        ({"precision": "BF16"}, "precision", "must be one of fp32, bf16"),
        ({"precision": 16}, "precision", "must be a string"),
        ({"channels-last": "yes"}, "channels-last", "must be true or false"),
        ({"compile": 1}, "compile", "must be true or false"),
    ],
)
def test_bad_speed_keys_are_refused_in_one_line_naming_the_key(raw, key, allowed):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert msg.startswith(f"{key} = ") and allowed in msg and "\n" not in msg


def test_a_run_directory_from_before_the_speed_keys_still_matches_its_config():
    old = {k: v for k, v in RunConfig().to_dict().items() if k not in ("precision", "channels-last", "compile")}
    RunConfig().check_resumed("resume", old)  # a key the old run lacks counts as its default: no difference
    with pytest.raises(
        ConfigError,
        match=r"^resume: a resumed run keeps its config; these differ: "
        r"precision = 'bf16' \(run has 'fp32'\)$",
    ):
        RunConfig().replace(precision="bf16").check_resumed("resume", old)


# --- bf16 autocast -----------------------------------------------------------------------------------------


def test_default_forward_is_the_model_itself():
    model, x0, t, noise = fixed_batch()
    assert unet_forward(model, "cpu") is model and unet_forward(model, "cpu", "fp32", False) is model
    with pytest.raises(ConfigError, match="^precision = 'fp16': must be one of fp32, bf16$"):
        unet_forward(model, "cpu", "fp16")
    d = Diffusion(1000)
    with torch.no_grad():
        pred = model(d.add_noise(x0, t, noise), t).sample
        expect = (pred.float() - noise).pow(2).flatten(1).mean(1)
        assert torch.equal(d.per_sample_loss(model, x0, t, noise), expect)


def fp32_and_bf16_losses() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample losses of the fixed batch, fp32 and under bf16 autocast, and the batch's timesteps."""
    model, x0, t, noise = fixed_batch()
    d = Diffusion(1000)
    with torch.no_grad():
        return (
            d.per_sample_loss(model, x0, t, noise),
            d.per_sample_loss(unet_forward(model, "cpu", "bf16"), x0, t, noise),
            t,
        )


def test_bf16_losses_are_float32_and_close_to_fp32():
    l32, l16, t = fp32_and_bf16_losses()
    assert l16.dtype == torch.float32 and l32.dtype == torch.float32
    assert not torch.equal(l16, l32)  # autocast did run in bfloat16
    torch.testing.assert_close(l16, l32, rtol=5e-2, atol=0)


def test_bf16_makes_the_same_skip_decisions_when_no_loss_is_near_its_threshold():
    l32, l16, t = fp32_and_bf16_losses()
    lam = 2.0
    # thresholds M[t]/lambda at half (kept) or twice (skipped) each sample's fp32 loss: 50% away from any tie,
    # far beyond bf16's error
    factor = torch.tensor([0.5, 2.0]).repeat(len(t) // 2).double()
    banks = [MemoryBank(1000, lam=lam, decay=0.8) for _ in range(2)]
    for bank in banks:
        bank.values[t] = lam * factor * l32.double()
    keep32, keep16 = banks[0].step(l32, t), banks[1].step(l16, t)
    assert keep32.tolist() == [True, False] * (len(t) // 2)
    assert torch.equal(keep16, keep32)
    assert banks[1].values.dtype == torch.float64
    torch.testing.assert_close(banks[1].values, banks[0].values, rtol=5e-2, atol=0)


def test_bf16_training_keeps_fp32_weights_and_float64_bank():
    trainer = trainer_for(CFG.replace(precision="bf16"))
    stats = trainer.run(epochs=0, seed=1, max_steps=3)
    ref = trainer_for(CFG).run(epochs=0, seed=1, max_steps=3)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())
    assert trainer.bank.values.dtype == torch.float64
    assert stats.mean_loss == pytest.approx(ref.mean_loss, rel=5e-2)


# --- channels-last -----------------------------------------------------------------------------------------


def test_channels_last_gives_the_fp32_losses():
    model, x0, t, noise = fixed_batch()
    d = Diffusion(1000)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = d.per_sample_loss(model, x0, t, noise)
        got = d.per_sample_loss(unet_forward(cl, "cpu", channels_last=True), x0, t, noise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_channels_last_training_follows_fp32_training():
    """Dropout draws its mask in memory order, so it is off here: then the two layouts train alike."""

    def no_dropout(model):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    torch.manual_seed(0)
    base = no_dropout(build_for_config(CFG))
    ref = trainer_for(CFG, copy.deepcopy(base))
    cl = trainer_for(CFG.replace(**{"channels-last": True}), copy.deepcopy(base))
    assert cl.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = ref.run(epochs=0, seed=1, max_steps=4), cl.run(epochs=0, seed=1, max_steps=4)
    assert a.mean_loss == pytest.approx(b.mean_loss, abs=1e-5)
    assert torch.equal(a.skip_counts, b.skip_counts)
    for (name, x), y in zip(ref.model.state_dict().items(), cl.model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-4, msg=name)


def test_channels_last_sampling_matches_and_restores_the_layout():
    torch.manual_seed(0)
    model = build_unet("tiny", 16, 1)
    d = Diffusion(1000)
    ref = sample(model, d, 3, (1, 16, 16), steps=3, seed=5, batch_size=4)
    got = sample(model, d, 3, (1, 16, 16), steps=3, seed=5, batch_size=4, channels_last=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.conv_in.weight.is_contiguous() and model.training
    bf16 = sample(model, d, 3, (1, 16, 16), steps=3, seed=5, batch_size=4, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)
    torch.testing.assert_close(bf16, ref, rtol=0, atol=0.1)


# --- torch.compile -----------------------------------------------------------------------------------------


@pytest.fixture
def cheap_compile(monkeypatch):
    """Compile with dynamo + AOTAutograd but no code generation: seconds on a CPU, same numerics as eager."""
    monkeypatch.setenv(compiled.BACKEND_ENV, "aot_eager")
    compiled.clear_cache()
    yield
    compiled.clear_cache()


def test_compiled_unet_is_built_once_and_reused_by_the_next_rounds_new_model(cheap_compile):
    cfg = CFG.replace(compile=True)
    state = TrainState.fresh(torch.arange(N))
    first = trainer_for(cfg, state=state)
    eager = trainer_for(CFG)  # the same start weights and seed, without compile
    first.run(epochs=0, seed=1, max_steps=2)
    eager.run(epochs=0, seed=1, max_steps=2)
    after_round_1 = graphs()
    assert compiled.STATS.builds == 1 and after_round_1 >= 1
    for name, x in eager.model.state_dict().items():  # gradients reached the caller's parameters
        torch.testing.assert_close(first.model.state_dict()[name], x, rtol=0, atol=1e-6, msg=name)
    assert list(first.compiled.module.parameters()) == []  # the cache keeps no weights between rounds

    # round 2, as the ClientApp does it: a new UNet object with the global weights, the client's state
    model = build_for_config(cfg)
    model.load_state_dict(first.model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    second = trainer_for(cfg, model=model, state=state)
    stats = second.run(epochs=0, seed=2, max_steps=2)
    assert second.compiled is first.compiled
    assert (compiled.STATS.builds, compiled.STATS.hits) == (1, 1)
    assert graphs() == after_round_1  # no recompile: new parameter tensors, other timesteps, same shapes
    assert stats.steps == 2 and state.step == 4
    assert any(not torch.equal(start[k], v) for k, v in second.model.state_dict().items())


def test_other_settings_get_their_own_compiled_unet(cheap_compile):
    model = build_unet("tiny", 16, 1)
    a = compiled.compiled_unet(model, "cpu", purpose="train")
    assert compiled.compiled_unet(build_unet("tiny", 16, 1), "cpu", purpose="train") is a
    assert compiled.compiled_unet(model, "cpu", purpose="train", precision="bf16") is not a
    assert compiled.compiled_unet(model, "cpu", purpose="sample") is not a
    assert compiled.compiled_unet(build_unet("tiny", 32, 1), "cpu", purpose="train") is not a
    assert compiled.compiled_unet(build_unet("tiny", 16, 3), "cpu", purpose="train") is not a
    assert (compiled.STATS.builds, compiled.STATS.hits) == (5, 1)


def test_compiled_sampling_pads_the_last_batch_without_recompiling(cheap_compile):
    torch.manual_seed(0)
    model = build_unet("tiny", 16, 1)
    d = Diffusion(1000)
    sample(model, d, 4, (1, 16, 16), steps=2, seed=3, batch_size=4, compile=True)  # compiles for batch 4
    before = graphs()
    got = sample(model, d, 6, (1, 16, 16), steps=2, seed=3, batch_size=4, compile=True)  # 4 + a partial 2
    assert graphs() == before and compiled.STATS.builds == 1
    ref = sample(model, d, 6, (1, 16, 16), steps=2, seed=3, batch_size=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert model.training
