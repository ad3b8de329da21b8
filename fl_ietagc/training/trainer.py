"""Local training with Anti-Gradient Control: one client's (or centralized training's) loop.

`TrainState` is everything that persists for one client across rounds: Adam's state, the step
counter (which is also the LR-warmup position), the AGC memory bank and the per-image skip counts.
Weights are not part of it: each round they are replaced by the global ones.

`LocalTrainer.run` trains for a number of epochs over the shard, kept on the training device as
uint8 (no DataLoader: a batch is an index into that tensor). Per step: random horizontal flip,
uniform t, epsilon loss per sample, AGC keep mask, mean over kept samples, backward, grad-norm
clip, Adam with linear warmup, EMA update.

Speed keys (fl_ietagc/training/precision.py, compiled.py): `precision` = bf16 autocasts the UNet forward only (losses,
bank and skip rule stay fp32/float64); `channels-last` stores the weights and inputs channels-last; `compile`
runs the forward through the process's cached compiled UNet, bound to this trainer's model for the call.
None of them adds a host synchronisation: the loop reads the device only every NONFINITE_CHECK_EVERY steps and
when the round ends (the loop's invariant: `LocalTrainer._run`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fl_ietagc.data.pixels import to_model_range
from fl_ietagc.runs.checkpoints import load_torch, save_torch
from fl_ietagc.runs.progress import StepProgress
from fl_ietagc.settings.config import RunConfig
from fl_ietagc.training.agc import MemoryBank, masked_mean
from fl_ietagc.training.compiled import compiled_unet
from fl_ietagc.training.diffusion import Diffusion
from fl_ietagc.training.precision import check_supported, unet_forward
from fl_ietagc.training.ret import taa_strength, translate


@dataclass
class TrainState:
    image_ids: torch.Tensor  # (n,) int64: global training-set ids of this shard, in shard order
    skip_counts: torch.Tensor  # (n,) int64: how often each image was skipped, over the whole run
    aug_strength: torch.Tensor | None = None  # (n,) float: TAA strength for each image's next draw
    step: int = 0
    rounds: int = 0
    optimizer: dict | None = None
    bank: dict | None = None
    token: str = ""  # identifies the run this state belongs to
    # the file it was loaded from, or will be saved as, for errors (set by `check`; not saved)
    source: str = field(default="", compare=False)

    @classmethod
    def fresh(cls, image_ids, token: str = "") -> TrainState:
        ids = torch.as_tensor(image_ids, dtype=torch.long).cpu()
        return cls(image_ids=ids, skip_counts=torch.zeros_like(ids), aug_strength=torch.zeros(len(ids)), token=token)

    def remap(self, image_ids) -> None:
        """The shard changed (RET): keep per-image records of images that stay, zeros for newcomers."""
        new = torch.as_tensor(image_ids, dtype=torch.long).cpu()
        pos = {int(i): j for j, i in enumerate(self.image_ids.tolist())}
        old = torch.tensor([pos.get(int(i), -1) for i in new.tolist()], dtype=torch.long)
        found = old >= 0
        counts, strength = torch.zeros_like(new), torch.zeros(len(new))
        counts[found] = self.skip_counts[old[found]]
        strength[found] = self.aug_strength[old[found]]
        self.image_ids, self.skip_counts, self.aug_strength = new, counts, strength

    def to_dict(self) -> dict:
        return {
            "image_ids": self.image_ids,
            "skip_counts": self.skip_counts,
            "aug_strength": self.aug_strength,
            "step": self.step,
            "rounds": self.rounds,
            "optimizer": self.optimizer,
            "bank": self.bank,
            "token": self.token,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**d)

    def save(self, path: Path) -> None:
        save_torch(path, self.to_dict())

    @classmethod
    def load(
        cls, path: Path, token: str, image_ids, device: torch.device | str = "cpu", allow_remap: bool = False
    ) -> TrainState:
        """A client's saved state, checked to belong to run `token` and to the shard `image_ids`.
        With `allow_remap` (RET moved images between shards) per-image records follow the images."""
        blob = load_torch(path, "client state", map_location=device)
        if not isinstance(blob, dict) or set(blob) != set(cls.fresh([]).to_dict()):
            raise ValueError(f"{path}: not a client state of this version")
        state = cls.from_dict(blob)
        state.image_ids, state.skip_counts = state.image_ids.cpu(), state.skip_counts.cpu()
        state.aug_strength = state.aug_strength.cpu()
        return state.check(path, token, image_ids, allow_remap)

    def check(self, path, token: str, image_ids, allow_remap: bool = False) -> TrainState:
        """This state, checked to belong to run `token` and to the shard `image_ids` (remapped when allowed);
        `path` names it in errors (the file it was, or will be, saved as)."""
        if self.token != token:
            raise RuntimeError(f"client state {path} belongs to another run (token {self.token!r} != {token!r})")
        if not torch.equal(self.image_ids, torch.as_tensor(image_ids, dtype=torch.long)):
            if not allow_remap:
                raise RuntimeError(f"client state {path} was made for a different shard")
            self.remap(image_ids)
        self.source = str(path)
        return self


@dataclass
class RoundStats:
    steps: int
    samples: int
    kept: int
    skipped: int
    mean_loss: float  # mean per-sample diffusion loss over all samples seen (kept and skipped)
    skip_counts: torch.Tensor  # (n,) int64: skips of each shard image in this call
    seconds: float
    lr: float = 0.0

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.samples if self.samples else 0.0


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; `step` is the client's 1-based optimizer step."""

    def __init__(self, step: int, what: str, lr: float):
        super().__init__(f"step {step}: {what} (lr {lr:g})")
        self.step, self.what, self.lr = step, what, lr


# the device-side non-finite flag is read every this many steps (and at the end of a round): a run with a NaN
# stops within this many steps, without a host synchronisation per step
NONFINITE_CHECK_EVERY = 25


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """LR for optimizer step number `step` (0-based): linear from base/W up to base over W steps."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


class LocalTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        model: torch.nn.Module,
        ema: torch.nn.Module,
        images: torch.Tensor,
        state: TrainState,
        device: torch.device,
        cond: torch.Tensor | None = None,
    ):
        """`images`: the shard as uint8 pixels (pixel-space UNets), or as float latents already in the model's
        range (a latent text-to-image UNet, fl_ietagc/data/latent.py); `cond`: per-image text embeddings (N, L, D)
        given to the UNet as `encoder_hidden_states`."""
        if images.shape[0] != state.image_ids.numel():
            raise ValueError(f"shard has {images.shape[0]} images but the state tracks {state.image_ids.numel()}")
        if cond is not None and cond.shape[0] != images.shape[0]:
            raise ValueError(f"shard has {images.shape[0]} images but {cond.shape[0]} text embeddings")
        check_supported(device, cfg.precision)
        self.cfg = cfg
        self.device = device
        self.model = model.to(device).train()
        self.ema = ema.to(device).eval().requires_grad_(False)
        if cfg.channels_last:  # in place, before the optimizer: Adam's moments follow the parameters' layout
            self.model.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        self.compiled = (
            compiled_unet(
                self.model,
                device,
                purpose="train",
                precision=cfg.precision,
                channels_last=cfg.channels_last,
                mode=cfg.compile_mode,
            )
            if cfg.compile
            else None
        )
        # CUDA graphs: each step's forward replays into the same output buffers; marking the step's start tells
        # torch that the previous step's outputs are no longer read
        self._mark_step = self.compiled is not None and self.compiled.uses_cuda_graphs
        self.images = images.to(device)
        self.cond = cond.to(device) if cond is not None else None
        self.state = state
        self.diffusion = Diffusion.for_config(cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, device)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        self.bank = MemoryBank(cfg.diffusion_steps, cfg.agc_lambda, cfg.agc_bank_decay, device=device)
        if state.bank is not None:  # the bank's values; its lambda and decay are the config's, checked
            self.bank.load_state_dict(state.bank, f"client state {state.source}" if state.source else "client state")

    def steps_per_epoch(self) -> int:
        return self.images.shape[0] // self.cfg.batch_size  # drop_last, as the paper

    def run(
        self,
        epochs: int,
        seed: int,
        max_steps: int | None = None,
        prox_mu: float = 0.0,
        progress: Callable[[int], StepProgress] | None = None,
    ) -> RoundStats:
        """Train `epochs` passes over the shard (or stop after `max_steps` steps); update the state.

        prox_mu > 0 adds FedProx's proximal term mu/2 * ||w - w_start||^2, w_start being the weights the
        round started from (the global model). `progress(total_steps)` makes the StepProgress that reports the
        loop's steps (a line every PROGRESS_EVERY_S; it does not touch the device)."""
        with self.compiled.bound(self.model) if self.compiled else contextlib.nullcontext(self.model) as net:
            return self._run(
                unet_forward(net, self.device, self.cfg.precision, self.cfg.channels_last),
                epochs,
                seed,
                max_steps,
                prox_mu,
                progress,
            )

    def _run(
        self,
        net,
        epochs: int,
        seed: int,
        max_steps: int | None,
        prox_mu: float,
        progress: Callable[[int], StepProgress] | None = None,
    ) -> RoundStats:
        """The loop. `net` is the UNet forward on self.model's parameters: the model itself by default, else
        its compiled form and/or a bf16 / channels-last wrapper (precision.unet_forward).

        Each step: draw the batch (`_draw`), per-sample loss, AGC keep (`_keep`), update (`_update`), EMA, account
        (`_Tally.count`). INVARIANT: no host synchronisation inside the step loop, so the device never waits for
        Python: no `.item()`, `.cpu()`, `.tolist()`, `int()`/`float()`/`bool()` of a tensor, and no Python branch
        on a tensor's value. Statistics are accumulated on the device (`_Tally`) and read once, when the round
        ends (`_round_stats`); the non-finite flag is read every NONFINITE_CHECK_EVERY steps
        (`_raise_if_nonfinite`). tests/test_trainer.py pins this. (One known exception: with `taa` on,
        ret.translate reads whether any image of the batch has a strength, once a step.)"""
        cfg, dev = self.cfg, self.device
        n, bs = self.images.shape[0], cfg.batch_size
        per_epoch = self.steps_per_epoch()
        total = per_epoch * epochs if max_steps is None else max_steps
        if per_epoch == 0 and (epochs > 0 or max_steps):
            raise ValueError(f"batch-size = {bs}: larger than this shard's {n} images (no full batch)")

        # Seed the round: one generator draws every permutation, flip, shift, t and noise, in that order.
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(device=dev).manual_seed(seed)

        # Set up what the round carries from step to step, all of it on the device.
        tally = _Tally.start(n, self.state.step, dev)
        # the EMA follows the trained parameters only (with LoRA: the adapters; the frozen base is the same in both)
        ema_by_name = dict(self.ema.named_parameters())
        ema_params = [ema_by_name[name] for name, p in self.model.named_parameters() if p.requires_grad]
        aug = self.state.aug_strength.to(dev) if cfg.taa else None  # TAA strength per shard image, for its next draw
        anchor = [p.detach().clone() for p in self.params] if prox_mu > 0 else None
        report = progress(total) if progress is not None else None
        steps, t0 = 0, time.perf_counter()

        while steps < total:
            perm = torch.randperm(n, generator=gen, device=dev)
            for b in range(min(per_epoch, total - steps)):
                # No host synchronisation from here to the end of the step (see the docstring): an augmentation
                # goes into `_draw`, as device ops drawing from `gen`.
                if self._mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                idx = perm[b * bs : (b + 1) * bs]

                # Draw the batch.
                x0, t, noise = self._draw(idx, gen, aug)

                # Per-sample loss.
                losses = (
                    self.diffusion.per_sample_loss(net, x0, t, noise)
                    if self.cond is None
                    else self.diffusion.per_sample_loss(net, x0, t, noise, cond=self.cond[idx])  # text-to-image
                )

                # AGC keep.
                keep = self._keep(losses, t, idx, aug)

                # Update.
                loss = masked_mean(losses, keep)
                if anchor is not None:
                    loss = loss + 0.5 * prox_mu * proximal_term(self.params, anchor)
                self._update(loss, losses, tally)

                # EMA.
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, self.params, 1.0 - cfg.ema_decay)

                # Account.
                tally.count(losses, keep, idx)
                self.state.step += 1
                steps += 1
                if steps % NONFINITE_CHECK_EVERY == 0:
                    self._raise_if_nonfinite(tally)
                if report is not None:
                    report.update(steps)  # a host clock read; a line every PROGRESS_EVERY_S

        # Read the round's results (the device is read here, once).
        self._raise_if_nonfinite(tally)
        return self._round_stats(tally, steps, aug, time.perf_counter() - t0)

    def _draw(
        self, idx: torch.Tensor, gen: torch.Generator, aug: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of shard images `idx` in the model's range, augmented, with its timesteps t and noise.

        Augmentations go here, after the flip and TAA's translation and before t and noise: device ops only,
        drawing from `gen`. Every draw shifts the ones after it, so an augmentation that is off must draw nothing
        (a run without it then keeps its exact draws)."""
        cfg, dev, bs = self.cfg, self.device, self.cfg.batch_size
        x0 = to_model_range(self.images[idx]) if self.images.dtype == torch.uint8 else self.images[idx]
        if cfg.resolved_hflip:
            mask = torch.rand(bs, generator=gen, device=dev) < 0.5
            x0 = torch.where(mask.view(-1, 1, 1, 1), x0.flip(3), x0)
        if aug is not None:
            x0 = translate(x0, aug[idx], cfg.taa_max_shift, gen)
        t = torch.randint(0, cfg.diffusion_steps, (bs,), generator=gen, device=dev)
        noise = torch.randn((bs, *self.images.shape[1:]), generator=gen, device=dev)
        return x0, t, noise

    def _keep(self, losses: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, aug: torch.Tensor | None) -> torch.Tensor:
        """AGC's keep mask (the bank read before this step's update, then updated); every sample without AGC.
        With TAA, each image's strength for its next draw, from the same bank read."""
        if not self.cfg.agc:
            return torch.ones(losses.shape[0], dtype=torch.bool, device=self.device)
        if aug is not None:
            aug[idx] = taa_strength(losses, self.bank.threshold(t), self.cfg.taa_gamma)
        return self.bank.step(losses, t)

    def _update(self, loss: torch.Tensor, losses: torch.Tensor, tally: _Tally) -> None:
        """One optimizer step on `loss` (warmup LR, gradient-norm clip); a non-finite loss or gradient norm is
        flagged in `tally`, not raised here (reading it would synchronise)."""
        cfg = self.cfg
        lr = warmup_lr(cfg.lr, self.state.step, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        tally.flag_nonfinite(losses, grad_norm)
        self.optimizer.step()

    def _round_stats(self, tally: _Tally, steps: int, aug: torch.Tensor | None, seconds: float) -> RoundStats:
        """The round's statistics, read from the device once; the per-image records and the optimizer and bank
        states go into self.state."""
        cfg = self.cfg
        samples = steps * cfg.batch_size
        kept = int(tally.kept_sum)
        round_skips = tally.skips.cpu()
        self.state.skip_counts += round_skips
        if aug is not None:
            self.state.aug_strength = aug.cpu()
        self.state.rounds += 1
        self.state.optimizer = self.optimizer.state_dict()
        self.state.bank = self.bank.state_dict()
        return RoundStats(
            steps=steps,
            samples=samples,
            kept=kept,
            skipped=samples - kept,
            mean_loss=float(tally.loss_sum) / max(samples, 1),
            skip_counts=round_skips,
            seconds=seconds,
            lr=warmup_lr(cfg.lr, max(self.state.step - 1, 0), cfg.warmup_steps),
        )

    def _raise_if_nonfinite(self, tally: _Tally) -> None:
        step = int(tally.first_bad)  # the one host synchronisation, every NONFINITE_CHECK_EVERY steps
        if step < 0:
            return
        value = float(tally.bad_loss)
        what = (
            "loss is NaN"
            if value != value
            else "loss is Inf"
            if abs(value) == float("inf")
            else "gradient norm is not finite"
        )
        raise NonFiniteError(step, what, warmup_lr(self.cfg.lr, step - 1, self.cfg.warmup_steps))


@dataclass
class _Tally:
    """What a round accumulates, on the training device: nothing here is read during the round's steps but the
    non-finite flag, every NONFINITE_CHECK_EVERY steps."""

    loss_sum: torch.Tensor  # () float64: per-sample losses, kept and skipped
    kept_sum: torch.Tensor  # () int64: kept samples
    skips: torch.Tensor  # (n,) int64: skips of each shard image
    step_no: torch.Tensor  # () int64: the client's step counter (TrainState.step), mirrored on the device
    first_bad: torch.Tensor  # () int64: first 1-based step with a non-finite loss or gradient norm, -1 if none
    bad_loss: torch.Tensor  # () float32: that step's summed losses (NaN, Inf, or finite: the gradient was bad)

    @classmethod
    def start(cls, n: int, step: int, device: torch.device) -> _Tally:
        return cls(
            loss_sum=torch.zeros((), dtype=torch.float64, device=device),
            kept_sum=torch.zeros((), dtype=torch.long, device=device),
            skips=torch.zeros(n, dtype=torch.long, device=device),
            step_no=torch.tensor(step, device=device),
            first_bad=torch.full((), -1, dtype=torch.long, device=device),
            bad_loss=torch.zeros((), device=device),
        )

    def flag_nonfinite(self, losses: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Count a step; remember it if its losses or gradient norm are not finite and none was before."""
        self.step_no += 1
        bad = ~torch.isfinite(losses.detach()).all()
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm)
        first = bad & (self.first_bad < 0)
        self.first_bad = torch.where(first, self.step_no, self.first_bad)
        self.bad_loss = torch.where(first, losses.detach().float().sum(), self.bad_loss)

    def count(self, losses: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor) -> None:
        self.loss_sum += losses.detach().double().sum()
        self.kept_sum += keep.sum()
        self.skips.index_add_(0, idx, (~keep).long())


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_anchor||^2 over all parameters."""
    return torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchor)]).sum()


def pick_device(choice: str, ray_gpus: list | None = None) -> torch.device:
    """`ray_gpus`: the GPU ids Ray gave this process (ray_gpu_ids()), None outside a Ray worker. A Ray worker
    without a GPU share counts as seeing no CUDA device, whatever CUDA_VISIBLE_DEVICES says (Ray no longer hides
    GPUs from such workers when RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, see fl_ietagc/__init__.py)."""
    cuda = torch.cuda.is_available() and ray_gpus != []
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not cuda:
            raise RuntimeError(
                "device = 'cuda' but no CUDA device is visible to this process "
                "(in simulation, give clients a GPU share: client-resources-num-gpus > 0)"
            )
        return torch.device("cuda")
    return torch.device("cuda" if cuda else "cpu")


def ray_gpu_ids() -> list | None:
    """The GPU ids Ray assigned to this process if it is a Ray worker (a simulated client's actor), else None."""
    import sys

    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return list(context.get_accelerator_ids().get("GPU", []))


def client_seed(seed: int, partition_id: int, server_round: int) -> int:
    """A client's RNG seed: from the run seed, its partition id and the round, never Flower's node id."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**63)


def make_optimizer(cfg: RunConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """Adam (fused on CUDA), or bitsandbytes' 8-bit Adam (optimizer = adam8bit; validate.py checks it is there)."""
    if cfg.optimizer == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr, fused=device.type == "cuda")
