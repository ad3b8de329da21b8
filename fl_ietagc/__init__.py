"""fl-ietagc's core: federated IET-AGC / RET training of diffusion models, usable without Flower."""

import logging

# bitsandbytes (optimizer = "adam8bit") is imported by diffusers whenever it is installed, and on CPUs with AVX-512
# BF16 it warns at import that an optional 4-bit matmul kernel is missing; nothing here uses 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
