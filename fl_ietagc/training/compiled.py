"""torch.compile'd UNets that live as long as the process (run-config key `compile`).

Flower's ClientApp builds a new UNet for every message. Compiling each one would pay the compile time every
round, and dynamo would recompile for every new module until its cache limit, then silently fall back to
eager. So compiled UNets are kept in a module-level cache, one per
(architecture = preset, image size, channels ...; device; train or sample; precision; memory format; backend).

A cached entry owns no weights. `CompiledUNet.bound(model)` points the cached module's parameters and buffers
at `model`'s own tensors (no copy) for the duration of a `with` block, so gradients land on the caller's
parameters and the optimizer, EMA, state_dict and checkpoints keep working on the caller's model unchanged.
Dynamo guards on tensor shapes, dtypes and strides, not on which tensor object it is given, so the next
round's fresh model reuses the compiled graphs. Shapes are static (dynamic=False): the trainer only runs full
batches (drop_last) and the sampler pads its last partial batch; timesteps are tensor values, not shapes.

`compile-mode` (run config) is torch.compile's mode: "reduce-overhead" records the step as CUDA graphs and
replays them (one launch instead of hundreds; the cached module's bound tensors are the graphs' static inputs,
so the trainer keeps one UNet per process across rounds), "max-autotune(-no-cudagraphs)" tunes kernels while
compiling. They are CUDA features: on any other device `compiled_unet` refuses them in one line.

Private setting for tests and benchmarks: the environment variable FL_IETAGC_COMPILE_BACKEND
(default "inductor"; "eager" / "aot_eager" compile in seconds on a CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BACKEND_ENV = "FL_IETAGC_COMPILE_BACKEND"
DEFAULT_BACKEND = "inductor"


@dataclass
class CacheStats:
    builds: int = 0  # compiled modules created (one per key per process)
    hits: int = 0  # requests answered from the cache


STATS = CacheStats()
_CACHE: dict[tuple, CompiledUNet] = {}


def backend() -> str:
    return os.environ.get(BACKEND_ENV, "") or DEFAULT_BACKEND


def set_default_backend(name: str | None, device: str) -> None:
    """For benchmarks: use `name`, else keep $FL_IETAGC_COMPILE_BACKEND, else inductor on CUDA and aot_eager
    elsewhere (inductor's C++ build of a training step takes minutes on a small CPU)."""
    if name:
        os.environ[BACKEND_ENV] = name
    elif not os.environ.get(BACKEND_ENV):
        os.environ[BACKEND_ENV] = DEFAULT_BACKEND if str(device).startswith("cuda") else "aot_eager"


def architecture(model: torch.nn.Module) -> str:
    """What decides the compiled code of a module: a diffusers model's config (preset, sample size, channels,
    dropout ...), else its class and parameter shapes; plus the parameters' dtype."""
    config = getattr(model, "config", None)
    if config is not None:
        arch = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    else:
        arch = repr([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    dtype = next((p.dtype for p in model.parameters()), None)
    return f"{type(model).__qualname__}:{dtype}:{arch}"


class CompiledUNet:
    """A weightless copy of a UNet and its torch.compile'd forward; bind a model's tensors to call it."""

    def __init__(self, template: torch.nn.Module, backend_name: str, mode: str = "default"):
        self.module = copy.deepcopy(template)
        _unbind(self.module)  # the cached copy keeps no weights of its own
        self.mode = mode
        # (torch.compile passes mode to inductor; "default" is inductor's default, so it is not passed at all)
        self.forward = torch.compile(
            self.module, backend=backend_name, dynamic=False, **({} if mode == "default" else {"mode": mode})
        )

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune")

    @contextlib.contextmanager
    def bound(self, model: torch.nn.Module) -> Iterator:
        """Within the block, the compiled forward computes with `model`'s parameters, buffers and mode."""
        _bind(self.module, model)
        self.module.train(model.training)
        try:
            yield self.forward
        finally:
            _unbind(self.module)  # drop the references: the caller's model (and its grads) can be freed


def check_mode(mode: str, device: torch.device | str) -> None:
    """Refuse, in one line, a compile mode that needs CUDA on another device."""
    if mode != "default" and torch.device(device).type != "cuda":
        raise ValueError(
            f"compile-mode = {mode!r}: CUDA only (CUDA graphs / GPU kernel tuning), but this process "
            f'trains on {torch.device(device).type}; use compile-mode = "default"'
        )


def compiled_unet(
    model: torch.nn.Module,
    device: torch.device | str,
    *,
    purpose: str,
    precision: str = "fp32",
    channels_last: bool = False,
    mode: str = "default",
) -> CompiledUNet:
    """The process's compiled UNet for `model`'s architecture and these settings (built on first use).

    purpose: "train" (forward + backward) or "sample" (no grad, eval mode); each gets its own graphs.
    mode: torch.compile's mode (run-config compile-mode); not "default" only on CUDA."""
    check_mode(mode, device)
    key = (architecture(model), str(torch.device(device)), purpose, precision, channels_last, backend(), mode)
    entry = _CACHE.get(key)
    if entry is None:
        entry = _CACHE[key] = CompiledUNet(model, key[-2], mode)
        STATS.builds += 1
    else:
        STATS.hits += 1
    return entry


def clear_cache() -> None:
    """Forget every compiled UNet of this process (tests)."""
    _CACHE.clear()
    STATS.builds = STATS.hits = 0


def _pairs(host: torch.nn.Module, model: torch.nn.Module):
    hosts, models = list(host.named_modules()), list(model.named_modules())
    if [n for n, _ in hosts] != [n for n, _ in models]:
        raise ValueError(f"compile: {type(model).__name__} does not have the cached module's structure")
    return zip((m for _, m in hosts), (m for _, m in models))


def _bind(host: torch.nn.Module, model: torch.nn.Module) -> None:
    for h, m in _pairs(host, model):
        if set(h._parameters) != set(m._parameters) or set(h._buffers) != set(m._buffers):
            raise ValueError(f"compile: {type(m).__name__} does not have the cached module's tensors")
        for name in h._parameters:
            h._parameters[name] = m._parameters[name]
        for name in h._buffers:
            h._buffers[name] = m._buffers[name]


def _unbind(host: torch.nn.Module) -> None:
    for h in host.modules():
        for name in h._parameters:
            h._parameters[name] = None
        for name in h._buffers:
            h._buffers[name] = None
