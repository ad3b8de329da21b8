"""Typed, validated run configuration.

Every run-config key of the app is declared once here, with its type, default, allowed
values and a one-line description. `parse_config` turns a flat mapping (Flower's
`context.run_config`, a TOML table, CLI overrides) into a frozen `RunConfig`, and rejects
unknown keys, wrong types and out-of-range values with a `ConfigError` that names the key.

The defaults are the embedded default job (digits, tiny UNet); the paper's CIFAR-10
settings live in `experiments/configs/paper-cifar10.toml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_ietagc.settings.errors import ConfigError  # (re-exported: every wing raises it)

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "afhq-dog", "folder", "captions")
MODEL_TYPES = ("pixel", "latent-t2i")
OPTIMIZERS = ("adam", "adam8bit")
PRESETS = ("tiny", "ddpm-cifar10", "ddpm-afhq64")
SHARDINGS = ("balanced", "random", "dirichlet")
HFLIP_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
CLIENT_FAILURES = ("fail", "tolerate")
PRECISIONS = ("fp32", "bf16")
TRANSPORT_DTYPES = ("fp32", "bf16")  # how weights travel in messages (fl_ietagc/federation/wire.py)
SECURE_AGGREGATION = ("off", "secaggplus")
# strategies whose rule needs only the (size-weighted) mean of the replies, which is all SecAgg+ gives the server;
# the others are refused with secure-aggregation (their reason in SECURE_REFUSED, else "needs each reply")
SECURE_STRATEGIES = ("iet", "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
SECURE_REFUSED = {
    "fedmedian": "its coordinate-wise median needs each client's weights",
    "fedtrimmedavg": "its trimmed mean needs each client's weights to sort them",
    "krum": "it picks the reply closest to the others, which needs each client's weights",
    "multikrum": "it picks the replies closest to the others, which needs each client's weights",
    "bulyan": "it picks and trims replies, which needs each client's weights",
    "qfedavg": "its q-fair weights need each client's own update and loss",
}
# torch.compile modes: reduce-overhead captures CUDA graphs; the max-autotune ones tune GPU kernels (CUDA only)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# server strategies by name (each built in strategies/registry.py; tests/test_strategies.py checks the two agree)
STRATEGIES = (
    "iet",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
)
DP_CLIPPINGS = ("fixed", "adaptive")
# run-config keys that only some strategies read: set away from their default with another strategy, they would be
# silently ignored, so that is an error
STRATEGY_KEYS = {
    "fedavgm-lr": ("fedavgm",),
    "fedavgm-momentum": ("fedavgm",),
    "fedprox-mu": ("fedprox",),
    "fedopt-eta": ("fedadam", "fedyogi", "fedadagrad"),
    "fedopt-tau": ("fedadam", "fedyogi", "fedadagrad"),
    "trim-beta": ("fedtrimmedavg",),
    "malicious-clients": ("krum", "multikrum", "bulyan"),
    "multikrum-select": ("multikrum",),
    "qfedavg-q": ("qfedavg",),
}


def _key(
    name: str, default: Any, help: str, check: Callable[[Any], str | None] | None = None, choices: tuple | None = None
):
    return field(default=default, metadata={"key": name, "help": help, "check": check, "choices": choices})


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


_non_negative.low = 0  # (integer keys: the lower end of the range named when a value is out of it)


def _in_unit_open(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _lora_targets(v):
    names = [t.strip() for t in v.split(",")]
    bad = [t for t in names if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", t)]
    return f"must be comma-separated module names such as to_q,to_out.0 ({bad[0]!r} is not one)" if bad else None


def _at_least(n):
    def check(v):
        return None if v >= n else f"must be >= {n}"

    check.low = n
    return check


# An integer key's largest value (seed: its own range). Beyond it a value is a typo or an overflow (1e30 rounds,
# a batch of 2^40), never a run: refused with the range, before anything sizes a buffer or a loop from it.
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class RunConfig:
    # --- data and shards ---
    dataset: str = _key("dataset", "digits", "training images", choices=DATASETS)
    data_root: str = _key(
        "data-root",
        "",
        "dataset location: torchvision root (cifar10/cifar100/fashion-mnist), image folder (afhq-dog/folder), "
        "or a folder with the raw Fashion-MNIST idx files; captions: a captioned image folder (metadata.jsonl / "
        ".csv) or a .csv / .parquet of paths and captions; must be empty for digits",
    )
    data_download: bool = _key("data-download", False, "let torchvision download cifar10/cifar100/fashion-mnist")
    image_size: int = _key(
        "image-size",
        0,
        "model resolution in pixels; 0 = the dataset's default "
        "(digits 16, fashion-mnist 32, cifar 32, afhq-dog/folder 64, captions 512)",
        _non_negative,
    )
    max_images: int = _key("max-images", 0, "use only the first N training images (0 = all)", _non_negative)
    holdout_fraction: float = _key(
        "holdout-fraction",
        0.1,
        "for datasets without a test split (digits, folder, afhq-dog): fraction held out of training "
        "(for evaluation's null rate)",
        lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)",
    )
    sharding: str = _key("sharding", "balanced", "how the training set is split into K shards", choices=SHARDINGS)
    dirichlet_alpha: float = _key("dirichlet-alpha", 0.5, "concentration of the dirichlet sharding", _positive)
    hflip: str = _key(
        "hflip", "auto", "random horizontal flip; auto = on except for digits and captions", choices=HFLIP_MODES
    )
    # --- model and diffusion ---
    model_type: str = _key(
        "model-type",
        "pixel",
        "pixel = an unconditional pixel-space UNet (preset); latent-t2i = "
        "fine-tune the text-conditional UNet of a local Stable Diffusion checkpoint (pretrained-dir) "
        "on image-caption pairs (dataset = captions), VAE and text encoder frozen",
        choices=MODEL_TYPES,
    )
    pretrained_dir: str = _key(
        "pretrained-dir",
        "",
        "latent-t2i: local folder in diffusers' Stable Diffusion layout "
        "(unet/, vae/, text_encoder/, tokenizer/; safetensors only)",
    )
    frozen_dtype: str = _key(
        "frozen-dtype",
        "fp32",
        "latent-t2i: dtype of the frozen VAE and text encoder (bf16 halves their memory)",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = _key(
        "gradient-checkpointing",
        False,
        "recompute the UNet's activations in the "
        "backward pass (less activation memory; one more forward pass per step)",
    )
    lora_rank: int = _key(
        "lora-rank",
        0,
        "LoRA adapters (peft) of this rank in the UNet, base frozen: only the "
        "adapters are trained, averaged, sent and checkpointed (latent-t2i, or pixel with "
        "init-checkpoint as the base); 0 = train the full UNet",
        _non_negative,
    )
    lora_alpha: float = _key(
        "lora-alpha", 0.0, "LoRA scale numerator (the update is alpha/rank * B A); 0 = lora-rank", _non_negative
    )
    lora_targets: str = _key(
        "lora-targets",
        "to_q,to_k,to_v,to_out.0",
        "comma-separated module names (suffixes) that get adapters; default: the attention projections",
        _lora_targets,
    )
    optimizer: str = _key(
        "optimizer",
        "adam",
        "adam, or adam8bit (bitsandbytes' 8-bit Adam: optimizer state in a quarter of the memory; the `memory` extra)",
        choices=OPTIMIZERS,
    )
    preset: str = _key("preset", "tiny", "UNet preset (model-type = pixel)", choices=PRESETS)
    diffusion_steps: int = _key(
        "diffusion-steps", 1000, "T, number of diffusion timesteps (= memory-bank slots)", _at_least(2)
    )
    beta_start: float = _key(
        "beta-start", 1e-4, "first beta of the linear schedule", lambda v: None if 0 < v < 1 else "must be in (0, 1)"
    )
    beta_end: float = _key(
        "beta-end", 0.02, "last beta of the linear schedule", lambda v: None if 0 < v < 1 else "must be in (0, 1)"
    )
    # --- local training (per client) ---
    num_server_rounds: int = _key("num-server-rounds", 5, "R, federated rounds", _at_least(1))
    local_epochs: int = _key("local-epochs", 8, "E, local epochs per round", _at_least(1))
    batch_size: int = _key("batch-size", 32, "per-client batch size (drop_last, as the paper)", _at_least(1))
    lr: float = _key("lr", 2e-3, "Adam learning rate (paper: 2e-4 for the 35.7M net)", _positive)
    warmup_steps: int = _key(
        "warmup-steps", 20, "linear LR warmup steps, counted over the whole run (paper: 585 = 15 epochs)", _non_negative
    )
    grad_clip: float = _key("grad-clip", 1.0, "global grad-norm clip (0 = off)", _non_negative)
    ema_decay: float = _key("ema-decay", 0.9999, "EMA decay of the weights", _in_unit_open)
    agc: bool = _key("agc", True, "Anti-Gradient Control on/off")
    agc_lambda: float = _key("agc-lambda", 2.0, "lambda: skip sample j iff l_j < M[t_j] / lambda", _positive)
    agc_bank_decay: float = _key("agc-bank-decay", 0.8, "memory-bank decay d: M[t] <- d*M[t] + (1-d)*l", _in_unit_open)
    ret_every: int = _key(
        "ret-every",
        0,
        "RET redistribution: move each shard's most-skipped images to another shard after every N-th round (0 = off)",
        _non_negative,
    )
    ret_fraction: float = _key(
        "ret-fraction",
        0.1,
        "RET redistribution: fraction of each shard moved per event",
        lambda v: None if 0 < v <= 0.5 else "must be in (0, 0.5]",
    )
    taa: bool = _key("taa", False, "RET threshold-aware augmentation (needs agc)")
    taa_gamma: float = _key(
        "taa-gamma",
        1.5,
        "TAA band: losses in [M[t]/lambda, gamma*M[t]/lambda) are augmented",
        lambda v: None if v > 1 else "must be > 1",
    )
    taa_max_shift: int = _key("taa-max-shift", 4, "TAA: translation in pixels at full strength", _at_least(1))
    seed: int = _key(
        "seed",
        0,
        "seed of the model init, shards and every client's RNG",
        lambda v: None if 0 <= v < 2**32 else "must be in [0, 2^32)",
    )
    device: str = _key("device", "auto", "where clients train: auto = cuda if visible, else cpu", choices=DEVICES)
    precision: str = _key(
        "precision",
        "fp32",
        "precision of the UNet forward in training: bf16 = autocast around "
        "the forward only (per-sample losses, AGC bank and skip rule stay fp32/float64)",
        choices=PRECISIONS,
    )
    channels_last: bool = _key(
        "channels-last",
        False,
        "UNet weights and inputs in torch.channels_last memory format (faster convolutions on tensor-core GPUs)",
    )
    compile: bool = _key(
        "compile",
        False,
        "torch.compile the UNet of the training step (compiled once per process, "
        "reused across rounds; static batch shape)",
    )
    compile_mode: str = _key(
        "compile-mode",
        "default",
        "torch.compile mode of the training step and the sampler "
        "(with compile = true; not default = CUDA only): reduce-overhead replays CUDA graphs "
        "(fewer kernel launches), max-autotune(-no-cudagraphs) tunes kernels at compile time",
        choices=COMPILE_MODES,
    )
    # --- federation ---
    num_clients: int = _key(
        "num-clients", 0, "K, number of shards/clients; 0 = every connected SuperNode", _non_negative
    )
    strategy: str = _key(
        "strategy", "iet", "server aggregation strategy (see strategies/registry.py)", choices=STRATEGIES
    )
    fedavgm_lr: float = _key("fedavgm-lr", 1.0, "fedavgm: server learning rate on the pseudo-gradient", _positive)
    fedavgm_momentum: float = _key("fedavgm-momentum", 0.9, "fedavgm: server momentum", _in_unit_open)
    fedprox_mu: float = _key(
        "fedprox-mu", 0.01, "fedprox: proximal term mu/2 * ||w - w_global||^2 in the client loss", _non_negative
    )
    fedopt_eta: float = _key(
        "fedopt-eta",
        1e-3,
        "fedadam/fedyogi/fedadagrad: server learning rate (Flower's 0.1 is far too large for a UNet)",
        _positive,
    )
    fedopt_tau: float = _key("fedopt-tau", 1e-3, "fedadam/fedyogi/fedadagrad: adaptivity tau", _positive)
    trim_beta: float = _key(
        "trim-beta",
        0.2,
        "fedtrimmedavg: fraction cut at each end",
        lambda v: None if 0 < v < 0.5 else "must be in (0, 0.5)",
    )
    malicious_clients: int = _key(
        "malicious-clients",
        0,
        "krum/multikrum/bulyan: f, the Byzantine clients the rule "
        "tolerates (each update is scored by its K-f-2 nearest; krum/multikrum need "
        "K >= 2f+3, bulyan K >= 4f+3)",
        _non_negative,
    )
    multikrum_select: int = _key(
        "multikrum-select",
        2,
        "multikrum: m, the updates with the best Krum scores that are averaged (size-weighted); at most K",
        _at_least(1),
    )
    qfedavg_q: float = _key(
        "qfedavg-q",
        0.1,
        "qfedavg: fairness exponent q (0 = a FedAvg step); the Lipschitz estimate is 1/lr",
        _non_negative,
    )
    dp_clipping: str = _key(
        "dp-clipping",
        "fixed",
        "DP wrapper: fixed = clip every update to dp-clip-norm; adaptive "
        "= start at dp-clip-norm and move the norm each round towards dp-target-quantile of the "
        "update norms (Andrew et al. 2021)",
        choices=DP_CLIPPINGS,
    )
    dp_target_quantile: float = _key(
        "dp-target-quantile",
        0.5,
        "adaptive DP clipping: the fraction of updates meant to be clipped",
        lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
    )
    dp_clip_norm_lr: float = _key(
        "dp-clip-norm-lr", 0.2, "adaptive DP clipping: learning rate of the geometric clip-norm update", _positive
    )
    dp_clip_norm: float = _key(
        "dp-clip-norm",
        0.0,
        "server-side fixed-clipping DP wrapper around the strategy: update clip norm (0 = off)",
        _non_negative,
    )
    dp_noise_multiplier: float = _key(
        "dp-noise-multiplier",
        0.0,
        "DP wrapper (dp-clip-norm or "
        "dp-client-clip-norm): Gaussian noise multiplier z, noise std z * clip norm / K "
        "on the aggregate; > 0: epsilon reported in metrics.json",
        _non_negative,
    )
    dp_client_clip_norm: float = _key(
        "dp-client-clip-norm",
        0.0,
        "client-side fixed clipping (Flower's fixedclipping_mod + "
        "DifferentialPrivacyClientSideFixedClipping): each client clips its update (raw + EMA, one vector) to this "
        "norm, the server adds noise to the aggregate; works with secure-aggregation (0 = off)",
        _non_negative,
    )
    dp_delta: float = _key(
        "dp-delta",
        1e-5,
        "delta of the (epsilon, delta) client-level DP reported with dp-noise-multiplier > 0 (Opacus' RDP accountant)",
        lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    )
    secure_aggregation: str = _key(
        "secure-aggregation",
        "off",
        "secaggplus = Flower's SecAgg+ protocol: the server only ever holds the masked "
        "sum of the clients' (raw + EMA) weights, never one client's",
        choices=SECURE_AGGREGATION,
    )
    secagg_num_shares: int = _key(
        "secagg-num-shares",
        0,
        "SecAgg+: clients holding a share of each client's secrets (0 = every client of the round)",
        lambda v: None if v == 0 or v >= 3 else "must be 0 (every client) or >= 3",
    )
    secagg_reconstruction_threshold: int = _key(
        "secagg-reconstruction-threshold",
        0,
        "SecAgg+: shares needed to rebuild a secret: a round survives lost "
        "clients while every client keeps this many connected share holders (0 = a majority of the shares, at "
        "least 2)",
        lambda v: None if v == 0 or v >= 2 else "must be 0 (a majority) or >= 2",
    )
    secagg_clipping_range: float = _key(
        "secagg-clipping-range",
        8.0,
        "SecAgg+: weights are quantized on [-C, C]; a client with a weight outside fails (nothing is clipped)",
        _positive,
    )
    secagg_quantization_range: int = _key(
        "secagg-quantization-range",
        2**22,
        "SecAgg+: quantization levels Q on [-C, C], a power of two with "
        "num-clients * Q < 2^32; aggregate error < K * 2C/Q / (sum of shard sizes / M), M = the largest shard "
        "rounded up to a power of two",
        lambda v: None if 16 <= v < 2**32 and v & (v - 1) == 0 else "must be a power of two in [16, 2^32)",
    )
    round_timeout_s: float = _key(
        "round-timeout-s", 7 * 24 * 3600.0, "how long the server waits for a round's replies", _positive
    )
    node_wait_s: float = _key(
        "node-wait-s",
        600.0,
        "deployment: how long a round waits for the K SuperNodes to be "
        "connected; then the missing ones fall under client-failures",
        _positive,
    )
    transport_dtype: str = _key(
        "transport-dtype",
        "fp32",
        "dtype of the weights in messages: bf16 halves the bytes "
        "and rounds every weight a client or the server receives to bfloat16 (the average "
        "is then of rounded weights); optimizer state and checkpoints stay fp32",
        choices=TRANSPORT_DTYPES,
    )
    client_failures: str = _key(
        "client-failures",
        "fail",
        "a client that fails (error, NaN, no reply): fail = the "
        "run fails; tolerate = the round aggregates the clients that replied",
        choices=CLIENT_FAILURES,
    )
    min_clients_fraction: float = _key(
        "min-clients-fraction",
        1.0,
        "with client-failures = tolerate: the fraction of K that must reply for a round to count",
        lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    )
    init_checkpoint: str = _key(
        "init-checkpoint",
        "",
        "start from weights (fine-tuning): a checkpoint of this project, "
        "a diffusers UNet2DModel directory, or a hub id when online; empty = fresh",
    )
    # --- outputs ---
    output_dir: str = _key("output-dir", "runs", "where run directories go (relative = to the server's cwd)")
    run_name: str = _key("run-name", "", "run directory name; empty = <dataset>-<preset>-<timestamp>")
    client_state_dir: str = _key(
        "client-state-dir",
        "",
        "where clients keep optimizer/bank state between rounds; "
        "empty = <run dir>/client-state (a SuperNode's node-config state-dir wins)",
    )
    client_memory_mb: int = _key(
        "client-memory-mb",
        4096,
        "what a client process keeps in memory between rounds "
        "(its UNet pair, the client states it saved; on the training device) instead of "
        "rebuilding and re-reading them; 0 = nothing (state files are written either way)",
        _non_negative,
    )
    checkpoint_every: int = _key(
        "checkpoint-every", 1, "save the global weights every N rounds (the last round is always saved)", _at_least(1)
    )
    sample_count: int = _key("sample-count", 64, "images in the final sample grid (0 = none)", _non_negative)
    sample_steps: int = _key("sample-steps", 50, "DDIM steps for the final sample grid", _at_least(1))
    resume_from: str = _key(
        "resume-from",
        "",
        "continue this run directory from its last completed round (set by "
        "`fl-ietagc resume` / `--resume`); every other key must equal the run's config.json",
    )

    @property
    def resolved_hflip(self) -> bool:
        if self.hflip == "auto":  # not digits (a flipped digit is another glyph), not captions ("left"/"right")
            return self.dataset not in ("digits", "captions")
        return self.hflip == "on"

    def to_dict(self) -> dict[str, Any]:
        """Flat {run-config key: value}, the inverse of `parse_config`."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check_resumed(self, option: str, stored: Mapping[str, Any]) -> None:
        """This config continues a run whose config.json holds `stored`: every key must be equal."""
        check_resumed_config(option, stored, self.to_dict())

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with some keys changed (run-config names, e.g. {"agc-lambda": 3.0}), validated."""
        return parse_config({**self.to_dict(), **overrides})


def check_resumed_config(option: str, stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """A resumed run keeps the config it was started with: each run-config key in `given` must equal the run's
    (`stored`, its config.json; a key it lacks counts as its default: a run written before the key existed).
    The one check of every resume path (flower-simulation --resume, fl-ietagc resume, the ServerApp's
    resume-from, centralized training); raises ConfigError naming each key with both values."""
    defaults = RunConfig().to_dict()
    try:  # the stored config itself (an edited config.json: a removed preset, a value out of range)
        parse_config({k: v for k, v in stored.items() if k in defaults and k != "resume-from"})
    except ConfigError as e:
        raise ConfigError(f"{option}: the run's config.json is not a valid run config: {e}") from None
    differ = sorted(
        k for k, v in given.items() if k in defaults and k != "resume-from" and stored.get(k, defaults[k]) != v
    )
    if differ:
        raise ConfigError(
            f"{option}: a resumed run keeps its config; these differ: "
            + ", ".join(f"{k} = {given[k]!r} (run has {stored.get(k, defaults[k])!r})" for k in differ)
        )


def config_keys() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunConfig))


def _coerce(name: str, value: Any, default: Any, check: Callable | None = None) -> Any:
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r}: must be true or false")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(f"{name} = {value!r}: must be an integer")
            number = int(value)
        else:
            number = value
        if abs(number) > INT_MAX and name != "seed":
            low = getattr(check, "low", -INT_MAX)
            raise ConfigError(f"{name} = {value!r}: out of range; must be an integer in [{low}, {INT_MAX}]")
        return number
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r}: must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name} = {value!r}: must be finite")
        return float(value)
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r}: must be a string")
        return value
    raise TypeError(f"unsupported config type {want}")


def parse_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run-config mapping; raise ConfigError naming the first bad key."""
    fields = config_keys()
    known = {f.metadata["key"] for f in fields}
    unknown = sorted(set(raw) - known)
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), sorted(known), n=1)
            hints.append(f"{k} (did you mean {near[0]}?)" if near else str(k))
        raise ConfigError(f"unknown run-config key(s): {', '.join(hints)}; `fl-ietagc config` lists every key")
    values = {}
    for f in fields:
        name = f.metadata["key"]
        value = _coerce(name, raw[name], f.default, f.metadata["check"]) if name in raw else f.default
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} = {value!r}: must be one of {', '.join(choices)}")
        check = f.metadata["check"]
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(f"{name} = {value!r}: {problem}")
        values[f.name] = value
    cfg = RunConfig(**values)
    _check_cross_keys(cfg)
    return cfg


def _check_cross_keys(cfg: RunConfig) -> None:
    defaults = RunConfig()
    if not cfg.output_dir.strip():
        raise ConfigError(
            "output-dir = '': must name a directory (e.g. \"runs\"); an empty one would scatter the "
            "run into the current directory"
        )
    if cfg.beta_end <= cfg.beta_start:
        raise ConfigError(f"beta-end = {cfg.beta_end}: must be > beta-start ({cfg.beta_start})")
    if cfg.dataset == "digits" and cfg.data_root:
        raise ConfigError(f"data-root = {cfg.data_root!r}: digits is embedded (sklearn); leave data-root empty")
    if cfg.dataset in ("afhq-dog", "folder") and not cfg.data_root:
        raise ConfigError(f"data-root = '': dataset {cfg.dataset} needs the path of an image folder")
    if cfg.dataset in ("afhq-dog", "folder") and cfg.data_download:
        raise ConfigError(f"data-download = true: dataset {cfg.dataset} cannot be downloaded; give data-root")
    if cfg.dp_noise_multiplier and not (cfg.dp_clip_norm or cfg.dp_client_clip_norm):
        raise ConfigError(
            f"dp-noise-multiplier = {cfg.dp_noise_multiplier}: needs dp-clip-norm > 0 (the DP wrapper)"
            f" or dp-client-clip-norm > 0"
        )
    if cfg.dp_clip_norm and cfg.dp_client_clip_norm:
        raise ConfigError(
            f"dp-client-clip-norm = {cfg.dp_client_clip_norm}: clip on the server (dp-clip-norm) or on "
            f"the clients, not both"
        )
    if cfg.dp_client_clip_norm and cfg.transport_dtype != "fp32":
        raise ConfigError(
            f"dp-client-clip-norm = {cfg.dp_client_clip_norm}: Flower's clipping mod works on the "
            f'arrays as they travel; needs transport-dtype = "fp32"'
        )
    if not cfg.dp_noise_multiplier and cfg.dp_delta != RunConfig.dp_delta:
        raise ConfigError(f"dp-delta = {cfg.dp_delta}: only used with dp-noise-multiplier > 0")
    if cfg.dp_clipping != defaults.dp_clipping and not cfg.dp_clip_norm:
        raise ConfigError(
            f"dp-clipping = {cfg.dp_clipping!r}: needs dp-clip-norm > 0 (the DP wrapper; with adaptive "
            f"clipping it is the initial norm)"
        )
    for key in ("dp-target-quantile", "dp-clip-norm-lr"):
        if cfg.to_dict()[key] != defaults.to_dict()[key] and cfg.dp_clipping != "adaptive":
            raise ConfigError(f'{key} = {cfg.to_dict()[key]}: only used with dp-clipping = "adaptive"')
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ConfigError(f"compile-mode = {cfg.compile_mode!r}: only used with compile = true")
    if cfg.taa and not cfg.agc:
        raise ConfigError("taa = true: threshold-aware augmentation needs agc = true (it uses the memory bank)")
    if not cfg.ret_every and cfg.ret_fraction != defaults.ret_fraction:
        raise ConfigError(f"ret-fraction = {cfg.ret_fraction}: only used with ret-every > 0")
    if not cfg.taa and (cfg.taa_gamma, cfg.taa_max_shift) != (defaults.taa_gamma, defaults.taa_max_shift):
        raise ConfigError("taa-gamma / taa-max-shift: only used with taa = true")
    if cfg.client_failures == "fail" and cfg.min_clients_fraction != defaults.min_clients_fraction:
        raise ConfigError(
            f'min-clients-fraction = {cfg.min_clients_fraction}: only used with client-failures = "tolerate"'
        )
    given = cfg.to_dict()
    for key, users in STRATEGY_KEYS.items():
        if given[key] != defaults.to_dict()[key] and cfg.strategy not in users:
            raise ConfigError(
                f"{key} = {given[key]}: only used by strategy {' / '.join(sorted(users))}, not {cfg.strategy}"
            )
    _check_secure_aggregation(cfg, defaults)
    t2i = cfg.model_type == "latent-t2i"
    if t2i != (cfg.dataset == "captions"):
        raise ConfigError(
            f"model-type = {cfg.model_type!r}: "
            + (
                'needs dataset = "captions" (image-caption pairs)'
                if t2i
                else 'dataset = "captions" needs model-type = "latent-t2i"'
            )
        )
    if t2i and not cfg.pretrained_dir:
        raise ConfigError(
            "pretrained-dir = '': model-type = \"latent-t2i\" fine-tunes a local Stable Diffusion "
            "checkpoint; give its folder"
        )
    for key, value in (("pretrained-dir", cfg.pretrained_dir), ("frozen-dtype", cfg.frozen_dtype)):
        if not t2i and value != defaults.to_dict()[key]:
            raise ConfigError(f'{key} = {value!r}: only used with model-type = "latent-t2i"')
    if t2i and cfg.preset != defaults.preset:
        raise ConfigError(
            f'preset = {cfg.preset!r}: model-type = "latent-t2i" trains pretrained-dir\'s UNet; '
            f"leave preset at its default"
        )
    if not cfg.lora_rank:
        for key in ("lora-alpha", "lora-targets"):
            if given[key] != defaults.to_dict()[key]:
                raise ConfigError(f"{key} = {given[key]!r}: only used with lora-rank > 0")
    elif not t2i and not cfg.init_checkpoint:
        raise ConfigError(
            f"lora-rank = {cfg.lora_rank}: LoRA adapts a pretrained UNet; a pixel run needs "
            f'init-checkpoint (the frozen base), or use model-type = "latent-t2i"'
        )
    if cfg.image_size and cfg.image_size % 8 and not t2i:  # (latent-t2i: validate.py checks its VAE and UNet)
        raise ConfigError(f"image-size = {cfg.image_size}: must be a multiple of 8 (the UNet downsamples 3 times)")


def _check_secure_aggregation(cfg: RunConfig, defaults: RunConfig) -> None:
    """SecAgg+ gives the server only the masked sum: refuse what needs more, and settings Flower's protocol cannot
    run with (num-clients = 0 is checked again once the server knows K: `check_secure_clients`)."""
    keys = (
        "secagg-num-shares",
        "secagg-reconstruction-threshold",
        "secagg-clipping-range",
        "secagg-quantization-range",
    )
    given, default = cfg.to_dict(), defaults.to_dict()
    if cfg.secure_aggregation == "off":
        for key in keys:
            if given[key] != default[key]:
                raise ConfigError(f'{key} = {given[key]}: only used with secure-aggregation = "secaggplus"')
        return
    if cfg.strategy not in SECURE_STRATEGIES:
        why = SECURE_REFUSED.get(cfg.strategy, "its rule needs each client's reply, not their sum")
        raise ConfigError(
            f'strategy = {cfg.strategy!r}: cannot run with secure-aggregation = "secaggplus" '
            f"({why}; the server only gets the masked sum); use one of {', '.join(SECURE_STRATEGIES)}"
        )
    if cfg.dp_clip_norm:
        raise ConfigError(
            f"dp-clip-norm = {cfg.dp_clip_norm}: server-side clipping needs each client's update, which "
            f'secure-aggregation = "secaggplus" hides; clip on the clients instead'
        )
    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    if shares and threshold and threshold >= shares:
        raise ConfigError(f"secagg-reconstruction-threshold = {threshold}: must be < secagg-num-shares ({shares})")
    if cfg.num_clients:
        check_secure_clients(cfg, cfg.num_clients)


def check_secure_clients(cfg: RunConfig, num_clients: int) -> None:
    """The SecAgg+ settings against K (the number of clients of the run)."""
    if cfg.secure_aggregation == "off":
        return
    if num_clients < 2:
        raise ConfigError(f"num-clients = {num_clients}: secure-aggregation needs at least 2 clients")
    if num_clients * cfg.secagg_quantization_range >= 2**32:
        raise ConfigError(
            f"secagg-quantization-range = {cfg.secagg_quantization_range}: with {num_clients} "
            f"clients the masked sums would overflow the protocol's modulus 2^32; needs "
            f"num-clients * secagg-quantization-range < 2^32"
        )
    if cfg.secagg_num_shares > num_clients:
        raise ConfigError(f"secagg-num-shares = {cfg.secagg_num_shares}: more than the {num_clients} clients")
    shares = cfg.secagg_num_shares or num_clients
    if cfg.secagg_reconstruction_threshold > shares:
        raise ConfigError(
            f"secagg-reconstruction-threshold = {cfg.secagg_reconstruction_threshold}: more than the {shares} shares"
        )


def ineffective_keys(cfg: RunConfig) -> list[str]:
    """One line per key set away from its default that nothing reads in this configuration (the keys whose
    silent neglect would be harmless are warned about; those that would change a result are errors above).
    A default run names none: the app's pyproject repeats every default, so "set" means "differs from it"."""
    defaults = RunConfig()
    unused = []

    def note(key: str, why: str) -> None:
        value = getattr(cfg, key.replace("-", "_"))
        if value != getattr(defaults, key.replace("-", "_")):
            unused.append(f"{key} = {toml_value(value)} has no effect: {why}")

    if cfg.sharding != "dirichlet":
        note("dirichlet-alpha", f'only used with sharding = "dirichlet" (sharding is "{cfg.sharding}")')
    if not cfg.agc:
        for key in ("agc-lambda", "agc-bank-decay"):
            note(key, "only used with agc = true")
    if cfg.dataset in ("cifar10", "cifar100", "fashion-mnist"):
        note("holdout-fraction", f"{cfg.dataset} has its own test split")
    if cfg.dataset not in ("cifar10", "cifar100", "fashion-mnist"):
        note("data-download", f"dataset {cfg.dataset} is not downloaded")
    if not cfg.sample_count:
        note("sample-steps", "sample-count = 0 (no final samples)")
    return unused


def check_strategy_clients(cfg: RunConfig, num_clients: int) -> None:
    """The strategy's rule against K (known once the SuperNodes are counted): raise ConfigError naming the key."""
    k, f = num_clients, cfg.malicious_clients
    if cfg.strategy in ("krum", "multikrum") and k < 2 * f + 3:
        raise ConfigError(
            f"malicious-clients = {f}: {cfg.strategy} needs K >= 2f+3 = {2 * f + 3} clients (Krum scores "
            f"each update by its K-f-2 nearest), K is {k}"
        )
    if cfg.strategy == "bulyan" and k < 4 * f + 3:
        raise ConfigError(f"malicious-clients = {f}: bulyan needs K >= 4f+3 = {4 * f + 3} clients, K is {k}")
    if cfg.strategy == "multikrum" and cfg.multikrum_select > k:
        raise ConfigError(f"multikrum-select = {cfg.multikrum_select}: must be <= K = {k}")
    if cfg.dp_clipping == "adaptive" and cfg.dp_noise_multiplier and cfg.dp_noise_multiplier >= k / 10:
        # Flower noises the clipped count with stddev K/20 and needs noise < 2 * that (Andrew et al.'s split)
        raise ConfigError(
            f"dp-noise-multiplier = {cfg.dp_noise_multiplier}: adaptive clipping with K = {k} needs "
            f"it < K/10 = {k / 10:g} (Flower noises the clipped count with stddev K/20)"
        )


def split_items(text: str) -> list[str]:
    """Split 'k=v k2="a b"' at whitespace outside quotes, keeping the quotes (TOML reads the values)."""
    items, current, quote, escaped = [], "", "", False
    for ch in text:
        if quote:
            current += ch
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote, current = ch, current + ch
        elif ch.isspace():
            if current:
                items.append(current)
            current = ""
        else:
            current += ch
    if quote:
        raise ConfigError(f"run-config {text!r}: unbalanced quotes")
    return items + ([current] if current else [])


def parse_overrides(text: str | None) -> dict:
    """'k=v k2="s"' -> {k: v, k2: "s"}: every item is key=value, values read as TOML (a bare word is a
    string). Anything that does not parse completely is refused, naming the item."""
    items = split_items(text or "")
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"run-config item {item!r}: expected key=value with no spaces around '=' "
                f'(quote values with spaces: key="a b")'
            )
        if not value:
            raise ConfigError(f"run-config item {item!r}: {key} has no value")
        if key in out:  # 'lr=1 lr=2': which one was meant? (TOML files refuse a repeated key too)
            raise ConfigError(f"run-config item {item!r}: {key} is given twice; give each key once")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            if value[:1] in "\"'" or value[-1:] in "\"'":
                raise ConfigError(f"run-config item {item!r}: {key} is not a valid quoted string") from None
            out[key] = value  # a bare word is a string
        if key in out and isinstance(out[key], (dict, list)):
            raise ConfigError(f"run-config item {item!r}: {key} takes a single value")
    return out


def load_config_file(path: str) -> dict:
    """A TOML file of run-config keys (flat, or under [tool.flwr.app.config])."""
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe would block the read; a folder is no file
        from fl_ietagc.settings.paths import described, kind  # (loads tempfile, shutil: not at every start)

        raise ConfigError(f"config file {path}: {described(kind(path))}, not a TOML file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from e
    table = raw.get("tool", {}).get("flwr", {}).get("app", {}).get("config", raw) if "tool" in raw else raw
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {path}: run-config keys are flat; tables are not keys ({', '.join(nested)})")
    return dict(table)


def load_overrides(text: str | None) -> dict:
    """A --run-config / -c argument: a TOML file (a path ending in .toml, or an existing file) or 'k=v ...'."""
    if not text or not text.strip():
        return {}
    stripped = text.strip()
    if stripped.endswith(".toml") or ("=" not in stripped and os.path.isfile(stripped)):
        return load_config_file(stripped)
    if "=" not in stripped:
        raise ConfigError(f"run-config {text!r}: neither key=value items nor an existing .toml file")
    return parse_overrides(stripped)


def toml_value(v: Any) -> str:
    """A run-config value as TOML (strings quoted and escaped)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def defaults_as_toml() -> str:
    """The [tool.flwr.app.config] table body: every key with its default."""
    return "".join(f"{f.metadata['key']} = {toml_value(f.default)}\n" for f in config_keys())


def keys_as_markdown() -> str:
    """The README's run-config table rows."""
    rows = []
    for f in config_keys():
        choices = f.metadata["choices"]
        allowed = ": " + " \\| ".join(choices) if choices else ""
        rows.append(f"| `{f.metadata['key']}` | `{toml_value(f.default)}` | {f.metadata['help']}{allowed} |")
    return "\n".join(rows) + "\n"
