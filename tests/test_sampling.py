"""Samplers: with the exact epsilon of a point mass, DDIM and DDPM must return that point."""

from types import SimpleNamespace

import torch

from fl_ietagc.training.diffusion import Diffusion, sample
from fl_ietagc.training.models import build_unet


class PointMassEps(torch.nn.Module):
    """eps(x_t, t) for data = a single image x*: (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def __init__(self, diffusion: Diffusion, target: torch.Tensor):
        super().__init__()
        self.abar = diffusion._sqrt_abar.double() ** 2
        self.target = target

    def forward(self, x, t):
        a = self.abar[t.long()].to(x.dtype)
        return SimpleNamespace(sample=(x - a.sqrt() * self.target) / (1 - a).sqrt())


def test_ddim_and_ddpm_recover_a_point_mass():
    d = Diffusion(1000)
    target = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    model = PointMassEps(d, target)
    for sampler, steps in (("ddim", 50), ("ddim", 7), ("ddpm", 0)):
        out = sample(model, d, 3, (1, 4, 4), sampler=sampler, steps=steps, seed=0)
        torch.testing.assert_close(out, target.expand(3, -1, -1, -1), atol=2e-4, rtol=0, msg=sampler)


def test_add_noise_matches_the_schedule():
    d = Diffusion(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 999])
    expect = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(d.add_noise(x0, t, eps), expect.float(), atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = build_unet("tiny", 16, 1)
    d = Diffusion(1000)
    a = sample(model, d, 4, (1, 16, 16), steps=3, seed=11, batch_size=4)
    b = sample(model, d, 4, (1, 16, 16), steps=3, seed=11, batch_size=4)
    c = sample(model, d, 4, (1, 16, 16), steps=3, seed=12, batch_size=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
