"""Starting a run from a checkpoint (fine-tuning): exact load, clear errors."""

import copy

import pytest
import torch

from fl_ietagc.checkpoints import save_checkpoint
from fl_ietagc.config import ConfigError, parse_config
from fl_ietagc.models import build_unet
from strategies.server_app import initial_weights


def test_initial_weights_come_from_the_checkpoint(tmp_path):
    net = build_unet("tiny", 16, 1)
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, net.state_dict(), ema.state_dict(), round=3, config={})
    got_net, got_ema, _ = initial_weights(parse_config({"init-checkpoint": str(path)}))
    for k, v in net.state_dict().items():
        assert torch.equal(got_net[k], v) and torch.equal(got_ema[k], ema.state_dict()[k])


def test_fresh_weights_depend_on_the_seed_only():
    a, _, _ = initial_weights(parse_config({"seed": 1}))
    b, _, _ = initial_weights(parse_config({"seed": 1}))
    c, _, _ = initial_weights(parse_config({"seed": 2}))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    other = build_unet("tiny", 32, 3)  # 3 channels: does not fit digits
    path = tmp_path / "rgb.pt"
    save_checkpoint(path, other.state_dict(), other.state_dict(), round=1, config={})
    with pytest.raises(ValueError, match="init-checkpoint .* do not match this model"):
        initial_weights(parse_config({"init-checkpoint": str(path)}))


def test_missing_or_foreign_checkpoint_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="^init-checkpoint = .*not found"):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "nope.pt")}))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="^init-checkpoint = .*not an fl-ietagc checkpoint"):
        initial_weights(parse_config({"init-checkpoint": str(tmp_path / "foreign.pt")}))
