"""The device options every benchmark script shares: --device, --threads, --compile-backend."""

from __future__ import annotations

import argparse

import torch

from fl_ietagc.training import compiled


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend; default: $FL_IETAGC_COMPILE_BACKEND, else inductor on a GPU and "
        "aot_eager on a CPU (inductor's C++ build of the step takes minutes on a small CPU)",
    )


def apply_device_args(a: argparse.Namespace) -> torch.device:
    """Set the compile backend and thread count; the device to run on."""
    compiled.set_default_backend(a.compile_backend, a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    return torch.device(a.device)
