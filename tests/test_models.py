"""UNet presets: parameter counts and shapes."""

import pytest
import torch

from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.models import build_unet, count_parameters


def test_paper_cifar10_unet_has_35_7m_parameters():
    assert count_parameters(build_unet("ddpm-cifar10", 32, 3)) == 35_746_307  # Ho et al.: 35.7M


def test_afhq64_preset_parameters():
    assert count_parameters(build_unet("ddpm-afhq64", 64, 3)) == 78_700_803


def test_tiny_is_well_under_a_million():
    assert count_parameters(build_unet("tiny", 16, 1)) < 500_000


@pytest.mark.parametrize("preset,size,ch", [("tiny", 16, 1), ("tiny", 32, 3)])
def test_forward_shape(preset, size, ch):
    m = build_unet(preset, size, ch)
    x = torch.randn(2, ch, size, size)
    assert m(x, torch.tensor([0, 999])).sample.shape == x.shape


def test_resolution_must_fit_the_downsampling():
    with pytest.raises(ConfigError, match="image-size = 40: preset ddpm-afhq64 needs a multiple of 16"):
        build_unet("ddpm-afhq64", 40, 3)
