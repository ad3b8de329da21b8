"""One validation pass over everything a run needs, before Ray starts or a model is trained.

`validate_run` checks, in order: the config's own rules (types, ranges, cross-key rules: done by
`parse_config`), the model against the image size, the device, the paths (output directory writable,
run name a plain name, a run directory that is free, or a run to resume that can be resumed), the
simulation resources (GPUs and CPUs asked for against those present: Ray would wait for ever), the
data (readable, enough images for K shards of a full batch) and `init-checkpoint` (read with
weights_only, architecture checked). Every error is a `ConfigError` (exit code 2) that names the key
and its allowed range, or the file and what is wrong with it, in one line.

The checks import torch, diffusers, Ray and the data, model and run wings (seconds), and settings/paths (tempfile,
shutil), where they use them: the launchers import this module before they know that a run will start, and input
refused by the first checks answers before any of it has loaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys

from fl_ietagc.federation.secure_sum import max_weight
from fl_ietagc.settings.config import (
    ConfigError,
    RunConfig,
    check_secure_clients,
    check_strategy_clients,
    ineffective_keys,
)
from fl_ietagc.training.privacy import rdp_accountant


def check_model(cfg: RunConfig) -> None:
    from fl_ietagc.data.datasets import image_size
    from fl_ietagc.training.models import downsample_factor

    check_optimizer(cfg)
    if cfg.model_type == "latent-t2i":
        check_latent_model(cfg)
        return check_lora(cfg)
    from fl_ietagc.training.models import PRESETS

    check_memory(cfg, PRESETS[cfg.preset]["block_out_channels"][0], "the UNet's first layer")
    size, factor = image_size(cfg), downsample_factor(cfg.preset)
    if size % factor:
        raise ConfigError(
            f"image-size = {size}: preset {cfg.preset} downsamples by {factor}, so the image size "
            f"must be a multiple of {factor}"
        )
    check_lora(cfg)


def check_lora(cfg: RunConfig) -> None:
    """lora-targets name modules of this UNet and peft is installed: checked on the UNet's architecture built on
    the meta device (no weights, no memory)."""
    if not cfg.lora_rank:
        return
    import torch

    from fl_ietagc.training.lora import add_lora

    with torch.device("meta"):
        if cfg.model_type == "latent-t2i":
            from diffusers import UNet2DConditionModel

            from fl_ietagc.data.latent import check_components_dir

            unet_dir = check_components_dir(cfg.pretrained_dir) / "unet"
            model = UNet2DConditionModel.from_config(json.loads((unet_dir / "config.json").read_text()))
        else:
            from fl_ietagc.data.datasets import image_size, load_splits
            from fl_ietagc.training.models import build_unet

            model = build_unet(cfg.preset, image_size(cfg), load_splits(cfg).train.channels)
        add_lora(model, cfg)


def memory_here(device: str = "auto") -> tuple[int, str]:
    """(bytes, what) the largest memory a training step could use here: the RAM, or the largest visible GPU's."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    best, what = ram, f"{_size(ram)} of RAM"
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            gpu = max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            if device == "cuda" or gpu > best:
                best, what = gpu, f"{_size(gpu)} of GPU memory"
    return best, what


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} ZiB"


def check_memory(cfg: RunConfig, first_channels: int, where: str) -> None:
    """A lower bound of a training step's memory (one float32 activation of the first layer for a batch) against
    the memory here: an image size that could never fit is refused with the estimate, before any image is
    resized to it (the data cache alone would try to allocate it)."""
    from fl_ietagc.data.datasets import image_size

    size = image_size(cfg)
    need = cfg.batch_size * first_channels * size * size * 4
    have, what = memory_here(cfg.device)
    if need > have:
        raise ConfigError(
            f"image-size = {size}: a batch of {cfg.batch_size} at {size}x{size} needs at least "
            f"{_size(need)} for {where} alone (float32), more than the {what} here"
        )


def check_latent_model(cfg: RunConfig) -> None:
    """pretrained-dir has every part in safetensors, and image-size fits the VAE's and the UNet's downsampling
    (read from their config.json files; no weights are loaded here)."""
    from fl_ietagc.data.datasets import image_size
    from fl_ietagc.data.latent import check_components_dir, vae_factor

    d = check_components_dir(cfg.pretrained_dir)
    try:
        unet = json.loads((d / "unet" / "config.json").read_text())
        factor = vae_factor(d) * 2 ** (len(unet["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"pretrained-dir = {cfg.pretrained_dir!r}: vae/ or unet/ config.json unreadable ({type(e).__name__}: {e})"
        ) from None
    try:
        vae_channels = int(json.loads((d / "vae" / "config.json").read_text())["block_out_channels"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        vae_channels = 3  # (vae_factor read the same file above; only a lower bound is needed here)
    check_memory(cfg, vae_channels, "the VAE's first layer")
    if image_size(cfg) % factor:
        raise ConfigError(
            f"image-size = {image_size(cfg)}: pretrained-dir's VAE and UNet downsample by {factor}, "
            f"so the image size must be a multiple of {factor}"
        )
    check_latent_schedule(cfg)


def check_latent_schedule(cfg: RunConfig) -> None:
    """With a scheduler/ folder, the schedule is the checkpoint's: epsilon-prediction (the loss this project trains
    with), diffusion-steps = its timesteps (the memory bank's slots), beta-start/beta-end left alone."""
    from fl_ietagc.data.latent import scheduler_config

    sched = scheduler_config(cfg.pretrained_dir)
    if sched is None:
        return
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ConfigError(
            f"pretrained-dir = {cfg.pretrained_dir!r}: its scheduler predicts {prediction!r}; this "
            f"project trains epsilon-prediction only (e.g. SD 2.1 base, not the 768 v-model)"
        )
    if cfg.diffusion_steps != int(sched["num_train_timesteps"]):
        raise ConfigError(
            f"diffusion-steps = {cfg.diffusion_steps}: pretrained-dir's scheduler has "
            f"{sched['num_train_timesteps']} timesteps; set diffusion-steps = {sched['num_train_timesteps']}"
        )
    defaults = RunConfig()
    for key, value, default in (
        ("beta-start", cfg.beta_start, defaults.beta_start),
        ("beta-end", cfg.beta_end, defaults.beta_end),
    ):
        if value != default:
            raise ConfigError(
                f"{key} = {value}: the noise schedule comes from pretrained-dir's scheduler/ "
                f"(leave {key} at its default)"
            )


def check_optimizer(cfg: RunConfig) -> None:
    if cfg.optimizer != "adam8bit":
        return

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optimizer = 'adam8bit': needs bitsandbytes (pip install 'fl-ietagc[memory]'), which is not installed here"
        )


def check_device(cfg: RunConfig) -> None:
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda': no CUDA GPU is visible here; use device = 'auto' or 'cpu'")
    if cfg.device == "cpu" and cfg.compile_mode != "default":  # (device = auto: each client checks its own)
        raise ConfigError(
            f"compile-mode = {cfg.compile_mode!r}: CUDA only (CUDA graphs / GPU kernel tuning), but "
            f"device = 'cpu'; use compile-mode = \"default\""
        )


def check_run_name(name: str) -> None:
    if not name:
        return
    if (
        name != name.strip()
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or name.startswith(".")
        or any(ord(c) < 32 for c in name)
    ):
        raise ConfigError(
            f"run-name = {name!r}: must be a plain directory name (no '/', no leading '.', no surrounding spaces)"
        )


def check_output_dir(output_dir: str) -> None:
    """The output directory exists and is writable, or can be created (nothing is created here); every existing
    part of it a folder (a file, a pipe, a dangling link or a link loop there is named)."""
    from fl_ietagc.settings.paths import check_dir_to_create

    check_dir_to_create("output-dir", output_dir)


def check_run_dir(cfg: RunConfig) -> None:
    from fl_ietagc.runs.rundir import RunDir
    from fl_ietagc.settings.paths import check_dir_to_create, check_existing, check_name_lengths, kind

    check_run_name(cfg.run_name)
    check_output_dir(cfg.output_dir)
    if cfg.client_state_dir:
        check_dir_to_create("client-state-dir", cfg.client_state_dir)
    if cfg.resume_from:
        if os.path.lexists(os.path.expanduser(cfg.resume_from)):  # (a missing one: check_resumable says so)
            check_existing("resume-from", cfg.resume_from, ("directory",))
        RunDir.check_resumable(cfg.resume_from)
    elif cfg.run_name:
        path = RunDir.new_path(cfg.output_dir, cfg.run_name, "")
        check_name_lengths("run-name", cfg.run_name, path)
        what = kind(path)
        if os.path.islink(path) or what not in ("missing", "directory"):
            # a link would put the run outside output-dir (or nowhere): the run directory is a real folder
            target = f" to {os.readlink(path)}" if os.path.islink(path) else ""
            raise ConfigError(
                f"run-name = {cfg.run_name!r}: {path} is {'a symbolic link' + target if target else what}"
                f"; a run directory must be a folder of its own inside output-dir"
            )
        RunDir.check_new(path)


def check_resources(backend: dict, num_clients: int, ray_address: str | None = None) -> None:
    """Client resources Ray can grant: asking for more than exists makes Ray wait for ever. Attached to a Ray
    cluster (`ray_address`, or $RAY_ADDRESS), the cluster's resources are not this machine's: only the form is
    checked."""
    res = backend.get("client_resources", {}) or {}
    if not isinstance(res, dict):
        raise ConfigError("--backend-config client_resources: must be a JSON object")
    unknown = sorted(set(res) - {"num_cpus", "num_gpus"})
    if unknown:
        raise ConfigError(f"--backend-config client_resources: unknown key(s) {unknown}; allowed: num_cpus, num_gpus")
    for key in ("num_cpus", "num_gpus"):
        value = res.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
            raise ConfigError(f"--backend-config client_resources.{key} = {value!r}: must be a number >= 0")
    if "num_cpus" in res and res["num_cpus"] < 1:  # Ray's actor pool divides by it, and Flower asks for an int >= 1
        raise ConfigError(
            f"--backend-config client_resources.num_cpus = {res['num_cpus']!r}: must be >= 1 "
            f"(the CPUs each client's Ray actor holds)"
        )
    init = backend.get("init_args", {}) or {}
    if not isinstance(init, dict):
        raise ConfigError("--backend-config init_args: must be a JSON object")
    check_ray_init_args(init)
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return  # attached to a cluster: its resources are not this machine's
    cpus, gpus = float(res.get("num_cpus", 1)), float(res.get("num_gpus", 0))
    if cpus > (os.cpu_count() or 1):
        raise ConfigError(
            f"--backend-config client_resources.num_cpus = {res['num_cpus']}: this machine has "
            f"{os.cpu_count()} CPUs; a client could never be scheduled"
        )
    if gpus:
        import torch

        have = torch.cuda.device_count()
        if have == 0:
            raise ConfigError(
                f"--backend-config client_resources.num_gpus = {res['num_gpus']}: no CUDA GPU is visible here; use 0"
            )
        if gpus > have:
            raise ConfigError(
                f"--backend-config client_resources.num_gpus = {res['num_gpus']}: must be <= {have} (the GPUs here)"
            )


# ray.init keywords a backend config must not give: Flower passes runtime_env itself, and the address is
# --ray-address's job (`ray.init(address=...)` would bypass its check)
RAY_INIT_RESERVED = {"runtime_env": "Flower sets it", "address": "use --ray-address HOST:PORT"}


def ray_init_keywords() -> set[str]:
    """The keyword arguments the installed Ray's `ray.init` accepts (its named ones, and the hidden ones
    it takes from **kwargs; any other makes it raise "Unknown keyword argument(s)" once Ray is starting)."""
    try:
        from ray._private.worker import init
    except Exception as e:  # noqa: BLE001 - a broken Ray install: named in one line, not a traceback
        raise ConfigError(
            f"--backend-config init_args: cannot be checked: Ray does not import here "
            f"({type(e).__name__}: {e}); reinstall it (pip install 'flwr[simulation]>=1.41,<1.42')"
        ) from None

    named = {k for k, v in inspect.signature(init).parameters.items() if v.kind is v.KEYWORD_ONLY}
    return named | set(re.findall(r"kwargs\.pop\(\s*\"(\w+)\"", inspect.getsource(init)))


def check_ray_init_args(init: dict) -> None:
    """init_args are given to ray.init as keywords: each one must be a keyword it takes."""
    for key in init:
        if key in RAY_INIT_RESERVED:
            raise ConfigError(f"--backend-config init_args.{key}: not allowed here ({RAY_INIT_RESERVED[key]})")
    if not init:
        return
    allowed = ray_init_keywords() - set(RAY_INIT_RESERVED)
    unknown = sorted(set(init) - allowed)
    if unknown:
        raise ConfigError(
            f"--backend-config init_args: {', '.join(unknown)} not a keyword of ray.init; allowed: "
            f"{', '.join(sorted(k for k in allowed if not k.startswith('_')))} (and Ray's private "
            f"_temp_dir, _system_config, ...)"
        )


def check_init_checkpoint(cfg: RunConfig) -> None:
    if cfg.init_checkpoint and not cfg.resume_from:
        from fl_ietagc.training.run_model import initial_weights

        initial_weights(cfg)  # reads (weights_only) and checks the architecture


def check_input_paths(cfg: RunConfig) -> None:
    """Paths the run reads, for what they are, before anything opens them (a pipe would block a reader, a link
    loop fail deep in a loader): data-root, pretrained-dir, init-checkpoint. A missing one is left to the check
    that knows what it should hold (data/datasets.py, data/latent.py, training/run_model.py)."""
    from fl_ietagc.settings.paths import check_existing

    wants = {
        "data-root": ("file", "directory") if cfg.dataset == "captions" else ("directory",),
        "pretrained-dir": ("directory",),
        "init-checkpoint": ("file", "directory"),
    }
    for key, want in wants.items():
        value = getattr(cfg, key.replace("-", "_"))
        if value and os.path.lexists(os.path.expanduser(value)):
            check_existing(key, value, want)


def warn_ineffective(cfg: RunConfig) -> list[str]:
    """Print one warning line per key that has no effect in this configuration (config.ineffective_keys)."""
    lines = ineffective_keys(cfg)
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)
    return lines


def validate_run(
    cfg: RunConfig, num_clients: int, backend: dict | None = None, ray_address: str | None = None, warn: bool = True
) -> None:
    """Everything checkable before any work starts. `num_clients` = K (0 = not known yet); `ray_address`: the Ray
    cluster the clients will run on (None: a private Ray instance on this machine). With `warn`, keys that have no
    effect are named on stderr once every check has passed."""
    from fl_ietagc.data.shards import shards_for_config

    check_input_paths(cfg)
    check_model(cfg)
    check_device(cfg)
    check_run_dir(cfg)
    if backend is not None:
        check_resources(backend, num_clients, ray_address)
    if num_clients:
        check_strategy_clients(cfg, num_clients)  # Krum/Bulyan's K >= 2f+3 / 4f+3, multikrum-select <= K
        shards = shards_for_config(cfg, num_clients)  # the data: readable, enough images for K full batches
        check_secure_aggregation(cfg, shards)
    if cfg.resume_from:
        from fl_ietagc.resume_check import check_resume_contents

        check_resume_contents(cfg, client_states=not ray_address)  # (a cluster's nodes may keep their own)
    check_init_checkpoint(cfg)
    if cfg.dp_noise_multiplier:
        rdp_accountant()  # (opacus installed, for the epsilon in metrics.json)
    if warn:
        warn_ineffective(cfg)


def check_secure_aggregation(cfg: RunConfig, shards) -> None:
    """SecAgg+ settings against K and the shard sizes (exact shard-size weights need a shard <= Q images)."""
    if cfg.secure_aggregation == "off":
        return
    check_secure_clients(cfg, len(shards))
    try:
        max_weight([len(s) for s in shards], cfg.secagg_quantization_range)
    except ValueError as e:
        raise ConfigError(str(e)) from None
