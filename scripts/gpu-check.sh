#!/usr/bin/env bash
# One command for a GPU owner: measure this project on the GPU and append the tables to benchmarks/RESULTS.md.
#
#   bash scripts/gpu-check.sh          # ~15-30 min on an H100; PYTHON=... to use another interpreter
#
# Runs, in order (each prints a markdown table):
#   benchmarks/train_step.py   paper preset (ddpm-cifar10, 35.7M), batch 128: reference-style loop vs ours
#                              fp32 / bf16 / bf16+channels-last+compile (img/s, TFLOP/s, % of peak)
#   benchmarks/sampling.py     DDIM-50 fp32 / bf16 / bf16+channels-last+compile, and the memorization pass
#                              65,536 x 50,000 at 3x32x32 (random uint8 images)
#   benchmarks/gpu_packing.py  4 clients sharing the GPU (num_gpus 0.25) vs 1 client alone, real simulation
# Nothing is written unless every step succeeds. Without a CUDA GPU it says so and exits 1, writing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False); nothing was measured" \
         "and benchmarks/RESULTS.md is unchanged" >&2
    exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
machine=$("$PY" -c "import os, torch, flwr; print(f'{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores; torch {torch.__version__} (CUDA {torch.version.cuda}), flwr {flwr.__version__}')")

step() {  # step NAME SCRIPT ARGS...: run a benchmark, keep its stdout (the table) in $out/NAME.md
    local name=$1
    shift
    echo "gpu-check: $name: $*" >&2
    "$PY" "$@" > "$out/$name.md"
    cat "$out/$name.md" >&2
}

step train benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 50 --warmup 5
step sampling benchmarks/sampling.py --preset ddpm-cifar10 --image-size 32 --channels 3 --num-images 1024 \
    --batch-size 256 --steps 50 --compile --queries 65536 --train 50000 --mem-size 32 --mem-channels 3
step packing benchmarks/gpu_packing.py --clients 4 --preset ddpm-cifar10 --batch-size 128 --precision bf16

{
    echo
    echo "## GPU check (\`scripts/gpu-check.sh\`), $(date -u +%Y-%m-%d)"
    echo
    echo "Machine: $machine."
    echo
    echo "### Training step (\`benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 50\`)"
    echo
    cat "$out/train.md"
    echo
    echo "### Sampling and memorization pass (\`benchmarks/sampling.py\`, DDIM-50; 65,536 x 50,000 x 3,072)"
    echo
    cat "$out/sampling.md"
    echo
    echo "### Clients packed on one GPU (\`benchmarks/gpu_packing.py --clients 4\`)"
    echo
    cat "$out/packing.md"
} >> benchmarks/RESULTS.md
echo "gpu-check: tables appended to benchmarks/RESULTS.md" >&2
