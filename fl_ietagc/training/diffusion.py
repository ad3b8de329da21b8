"""Forward process, per-sample epsilon loss, and seeded samplers.

The noise schedule is diffusers' DDPMScheduler (linear betas, T steps); training and both samplers
read the same `alphas_cumprod`, so they can never disagree. Sampling uses diffusers' DDIMScheduler
(eta = 0, predicted x0 clipped to [-1, 1], final step to alpha_bar = 1) and DDPMScheduler
(ancestral, fixed-large variance as Ho et al. used for CIFAR-10).

The samplers take `precision` ("fp32" | "bf16": autocast around the UNet forward only) and `channels_last`
(the training loss gets them through precision.unet_forward); the defaults change nothing. The scheduler
arithmetic and the losses stay float32.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from fl_ietagc.data.latent import scheduler_config
from fl_ietagc.training.compiled import compiled_unet
from fl_ietagc.training.precision import unet_forward


class Diffusion:
    def __init__(
        self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, beta_schedule: str = "linear"
    ):
        self.num_timesteps = num_timesteps
        self.scheduler_config = dict(
            num_train_timesteps=num_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            clip_sample=True,
            prediction_type="epsilon",
        )
        abar = DDPMScheduler(**self.scheduler_config).alphas_cumprod.double()
        self._sqrt_abar = abar.sqrt().float()
        self._sqrt_one_minus_abar = (1 - abar).sqrt().float()

    @classmethod
    def for_config(cls, cfg) -> Diffusion:
        """The run's forward process and schedule: diffusion-steps, beta-start, beta-end; for a latent-t2i run whose
        pretrained-dir has scheduler/scheduler_config.json, that schedule (the one the checkpoint was trained with;
        validate.py checks it is epsilon-prediction with diffusion-steps timesteps)."""
        if cfg.model_type == "latent-t2i":
            sched = scheduler_config(cfg.pretrained_dir)
            if sched is not None:
                return cls(
                    int(sched["num_train_timesteps"]),
                    float(sched["beta_start"]),
                    float(sched["beta_end"]),
                    str(sched.get("beta_schedule", "linear")),
                )
        return cls(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        if self._sqrt_abar.device != x0.device:
            self._sqrt_abar = self._sqrt_abar.to(x0.device)
            self._sqrt_one_minus_abar = self._sqrt_one_minus_abar.to(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self._sqrt_abar[t].view(shape) * x0 + self._sqrt_one_minus_abar[t].view(shape) * noise

    def per_sample_loss(
        self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) float32: mean over (C, H, W) of (eps_theta(x_t, t[, cond]) - eps)^2. `model` may be a
        precision.unet_forward (bf16 autocast, channels-last): its output is cast to float32 here. `cond`: text
        embeddings (B, L, D) for a UNet2DConditionModel (`encoder_hidden_states`); x0 is then a latent."""
        x_t = self.add_noise(x0, t, noise)
        pred = (model(x_t, t) if cond is None else model(x_t, t, encoder_hidden_states=cond)).sample
        return (pred.float() - noise).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample(
    model,
    diffusion: Diffusion,
    num_images: int,
    shape: tuple[int, int, int],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
) -> torch.Tensor:
    """Generate `num_images` images in [-1, 1] as a float32 CPU tensor (N, C, H, W).

    Seeded: the same (seed, num_images, batch_size) gives the same images. `sampler` is "ddim"
    (eta = 0, `steps` steps) or "ddpm" (ancestral over all T steps; `steps` is ignored).
    `precision` / `channels_last` apply to the UNet forward; `compile` runs it through the process's
    compiled UNet (fl_ietagc/training/compiled.py), with the last partial batch padded so the shape never changes
    (the padding rows draw no random numbers: the real images are those of the uncompiled sampler).
    `compile_mode` is torch.compile's mode (reduce-overhead: the forward replayed as CUDA graphs; CUDA only).
    """
    if sampler == "ddim":
        sched = DDIMScheduler(**diffusion.scheduler_config, set_alpha_to_one=True)
        sched.set_timesteps(steps)
    elif sampler == "ddpm":
        sched = DDPMScheduler(**diffusion.scheduler_config, variance_type="fixed_large")
        sched.set_timesteps(diffusion.num_timesteps)
    else:
        raise ValueError(f"sampler must be ddim or ddpm, got {sampler!r}")
    was_training = model.training
    model.eval()
    restore_format = _memory_format_of(model) if channels_last else None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    compiled = None
    if compile:
        compiled = compiled_unet(
            model, device, purpose="sample", precision=precision, channels_last=channels_last, mode=compile_mode
        )
    fixed = min(batch_size, num_images)  # the one batch shape the compiled forward sees
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    batches = range(0, num_images, batch_size)
    bar = None
    if progress:  # one tick per denoising step of a batch: rate and ETA even when all images fit one batch
        bar = tqdm(total=len(batches) * len(sched.timesteps), desc=f"sampling {num_images} ({sampler})", unit="step")
    try:
        with compiled.bound(model) if compiled is not None else contextlib.nullcontext(model) as net:
            net = unet_forward(net, device, precision, channels_last)
            for start in batches:
                n = min(batch_size, num_images - start)
                x = torch.randn((n, *shape), generator=gen, device=device)
                for t in sched.timesteps:
                    if compiled is not None and compiled.uses_cuda_graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    inp = x if compiled is None or n == fixed else torch.cat([x, x.new_zeros((fixed - n, *shape))])
                    eps = net(inp, t.to(device)).sample[:n].float()
                    x = (
                        sched.step(eps, t, x, generator=gen).prev_sample
                        if sampler == "ddpm"
                        else sched.step(eps, t, x, eta=0.0).prev_sample
                    )
                    if bar is not None:
                        bar.update(1)
                out.append(x.float().clamp(-1, 1).cpu())
    finally:
        if bar is not None:
            bar.close()
        if restore_format is not None:
            model.to(memory_format=restore_format)
        model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *shape))


def _memory_format_of(model) -> torch.memory_format:
    """channels_last if the model's first 4-D weight is stored so, else contiguous (what sample restores)."""
    for p in model.parameters():
        if p.dim() == 4:
            return (
                torch.channels_last
                if not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format
            )
    return torch.contiguous_format
