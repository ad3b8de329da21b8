"""fl-ietagc's core: federated IET-AGC / RET training of diffusion models, usable without Flower."""

import logging
import os

# bitsandbytes (optimizer = "adam8bit") is imported by diffusers whenever it is installed, and on CPUs with AVX-512
# BF16 it warns at import that an optional 4-bit matmul kernel is missing; nothing here uses 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Ray warns at every ray.init (a FutureWarning) that it will stop setting CUDA_VISIBLE_DEVICES="" for actors given
# num_gpus = 0, and asks to opt in now with this variable. We opt in: a simulated client without a GPU share then
# still trains on the CPU because the ClientApp asks Ray which GPUs it was given (trainer.pick_device), which holds
# under both Ray behaviours. Set here so every process of ours (and the Ray processes it starts) inherits it; an
# explicit value in the environment wins.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray folds log lines of different actors that differ only in numbers into one ("[repeated 2x across cluster]"),
# which hides every client's progress line but one ("client p1 round 3: step ..."). Read when Ray is imported.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
