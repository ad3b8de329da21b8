"""Are the packages the benchmarks need importable? One line naming every one that is not; exit 3 then.

    python benchmarks/check_deps.py [--cuda]

Run first by scripts/gpu-check.sh, so a missing package (e.g. Ray's `jsonschema`, without which a simulation
waits for actors that never start) is named in seconds instead of found by a step that hangs. With --cuda it
also requires a CUDA GPU visible to torch (exit 4 without one).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (import name, what to install): the project's dependencies and the ones Ray / Flower's simulation import late
MODULES = (
    ("numpy", "numpy"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("diffusers", "diffusers"),
    ("jsonschema", "jsonschema (ray)"),
    ("ray", "flwr[simulation] (ray)"),
    ("flwr", "flwr[simulation]"),
    ("grpc", "grpcio (flwr)"),
    ("sklearn", "scikit-learn"),
    ("matplotlib", "matplotlib"),
    ("tqdm", "tqdm"),
)


def missing(modules=MODULES) -> list[str]:
    """'pip name (error)' for each module that does not import; a module missing because a package it imports is
    missing is named by that package once ('jsonschema (needed by ray)')."""
    out, seen = [], set()
    for name, pip_name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a broken install that fails while importing
            absent = getattr(e, "name", None)
            if absent and absent != name and absent.split(".")[0] != name:
                if absent not in seen:
                    out.append(f"{absent} (needed by {name}: {type(e).__name__}: {one_line(e)})")
                seen.add(absent)
                continue
            if name not in seen:
                out.append(f"{pip_name} ({type(e).__name__}: {one_line(e)})")
            seen.add(name)
    return out


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="also require a CUDA GPU")
    a = p.parse_args(argv)
    gone = missing()
    if gone:
        print(
            f"check_deps: {len(gone)} package(s) missing or broken for {sys.executable}: {'; '.join(gone)}",
            file=sys.stderr,
        )
        return 3
    if a.cuda:
        import torch

        if not torch.cuda.is_available():
            print(
                f"check_deps: no CUDA GPU is visible to {sys.executable} (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False)",
                file=sys.stderr,
            )
            return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
