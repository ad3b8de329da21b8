#!/usr/bin/env bash
# One command for a GPU owner: measure this project on the GPU and append the tables to benchmarks/RESULTS.md.
#
#   bash scripts/gpu-check.sh [--quick] [--graphs] [--profile] [--out FILE]   # PYTHON=... another interpreter
#   bash scripts/gpu-check.sh --cpu [--profile] --out FILE     # the same steps on a CPU, tiny preset (the CI test)
#
# Bounded: every step runs under `timeout` (its limit is printed with it), so the whole check ends within
# 8 min (470 s at most; --quick: 219 s at most); --graphs adds at most 160 s, --profile 90 s. It never waits
# for anything without a bound. On one H100 the three default steps took about 5 min together (issue 21).
#
#   0. check_deps   every package the steps import (torch, flwr, ray, jsonschema, diffusers ...), and the GPU:
#                   a missing one is named in one line within seconds (exit 3 / 4), before anything is measured
#   1. train        benchmarks/train_step.py   paper preset (ddpm-cifar10, 35.7M), batch 128: reference-style
#                   loop vs ours fp32 / bf16 / bf16+channels-last+compile (img/s, TFLOP/s, % of peak)
#   2. sampling     benchmarks/sampling.py     DDIM-50 fp32 / bf16 / bf16+channels-last+compile, and the
#                   memorization pass 65,536 x 50,000 at 3x32x32 (random uint8 images)
#   3. packing      benchmarks/gpu_packing.py  4 clients sharing the GPU (num_gpus 0.25) vs 1 client alone, real
#                   simulation, 40-step rounds (the paper's 3,900-step round: run it alone with --paper-round)
#   4. graphs       (with --graphs) the compiled training step and DDIM-50 in compile-mode reduce-overhead
#                   (CUDA graphs)
#   5. profile      benchmarks/profile_step.py (with --profile) one compiled training step under torch.profiler:
#                   shares by kernel category (conv, matmul, norm, attention, elementwise, optimizer)
#
# FILE (default benchmarks/RESULTS.md) is relative to the repository root. Each step's table is appended to it
# as soon as the step ends (a later failure keeps it); a step that fails or runs out of time is written there as
# one line naming it, and the check goes on with the next step. Exit 0 when every step gave its table, 1 when
# some did not (named on stderr), 3/4 as check_deps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi

quick=0 cpu=0 profile=0 graphs=0 out=benchmarks/RESULTS.md
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --cpu) cpu=1 ;;
        --profile) profile=1 ;;
        --graphs) graphs=1 ;;
        --out) out=${2:?--out needs a file}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu-check: unknown option $1 (allowed: --quick --graphs --profile --cpu --out FILE)" >&2; exit 2 ;;
    esac
    shift
done

# 0. dependencies (and the GPU) first, bounded: importing torch on a cold disk takes seconds, not minutes
deps_args=(--cuda) startup=30
[ $cpu = 1 ] && deps_args=() startup=120  # (a busy CI machine imports torch slowly)
timeout -k 3 $startup "$PY" benchmarks/check_deps.py "${deps_args[@]}"
rc=$?
if [ $rc -ne 0 ]; then
    [ $rc = 124 ] && echo "gpu-check: the dependency check did not finish within $startup s" >&2
    echo "gpu-check: nothing was measured and $out is unchanged" >&2
    exit $rc
fi

if [ $cpu = 1 ]; then
    device=cpu
    machine=$(timeout -k 3 60 "$PY" -c "import os, platform, torch, flwr; print(f'CPU ({os.cpu_count()} cores, {platform.machine()}); torch {torch.__version__}, flwr {flwr.__version__}')") || machine="CPU (not described: the query failed)"
else
    device=cuda
    machine=$(timeout -k 3 10 "$PY" -c "import os, torch, flwr; print(f'{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores; torch {torch.__version__} (CUDA {torch.version.cuda}), flwr {flwr.__version__}')") \
        || machine="not described (the query did not finish within 10 s)"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

# the steps and their limits in seconds (each + 3 s to stop). Full: 130 + 130 + 160 = 420 s, with the dependency
# check (<= 30 s) and the machine line (<= 10 s) at most 470 s; --quick: 60 + 45 + 65 = 170 s (219 s at most);
# --graphs adds 80 + 80 s, --profile 90 s. --cpu (tiny preset) has no time target: its limits suit a busy
# 2-core machine.
if [ $cpu = 1 ]; then
    mode="--cpu (tiny preset: checks the script, measures nothing of a GPU)"
    train=(benchmarks/train_step.py --device cpu --preset tiny --image-size 16 --channels 1 --batch-size 8
           --steps 2 --warmup 1)
    sampling=(benchmarks/sampling.py --device cpu --preset tiny --image-size 16 --channels 1 --num-images 8
              --batch-size 8 --steps 5 --queries 64 --train 256 --mem-size 16 --mem-channels 1)
    packing=(benchmarks/gpu_packing.py --device cpu --clients 2 --preset tiny --image-size 16 --batch-size 16
             --rounds 2 --steps-per-client 2 --precision fp32 --max-images 96 --timeout-s 170)
    graphs_train=() graphs_sampling=()  # (CUDA graphs: nothing to check on a CPU; compile-mode is refused there)
    profile_cmd=(benchmarks/profile_step.py --device cpu --preset tiny --image-size 16 --channels 1 --batch-size 8
                 --steps 2 --warmup 1)
    limits=(180 120 360 0 0 180)
elif [ $quick = 1 ]; then
    mode="--quick"
    train=(benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 15 --warmup 3 --no-compile)
    sampling=(benchmarks/sampling.py --preset ddpm-cifar10 --image-size 32 --channels 3 --num-images 256
              --batch-size 256 --steps 50 --queries 16384 --train 50000 --mem-size 32 --mem-channels 3)
    packing=(benchmarks/gpu_packing.py --clients 4 --preset ddpm-cifar10 --batch-size 128 --precision bf16
             --rounds 2 --steps-per-client 20 --timeout-s 30)
    graphs_train=(benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 20 --warmup 5
                  --compile-mode reduce-overhead --only-compile-modes)
    graphs_sampling=(benchmarks/sampling.py --preset ddpm-cifar10 --image-size 32 --channels 3 --num-images 512
                     --batch-size 256 --steps 50 --compile --compile-mode reduce-overhead --queries 0)
    profile_cmd=(benchmarks/profile_step.py --preset ddpm-cifar10 --batch-size 128 --steps 5)
    limits=(60 45 65 80 80 90)
else
    mode="full"
    train=(benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 50 --warmup 5)
    sampling=(benchmarks/sampling.py --preset ddpm-cifar10 --image-size 32 --channels 3 --num-images 1024
              --batch-size 256 --steps 50 --compile --queries 65536 --train 50000 --mem-size 32 --mem-channels 3)
    packing=(benchmarks/gpu_packing.py --clients 4 --preset ddpm-cifar10 --batch-size 128 --precision bf16
             --timeout-s 75)
    graphs_train=(benchmarks/train_step.py --preset ddpm-cifar10 --batch-size 128 --steps 50 --warmup 5
                  --compile-mode reduce-overhead --only-compile-modes)
    graphs_sampling=(benchmarks/sampling.py --preset ddpm-cifar10 --image-size 32 --channels 3 --num-images 1024
                     --batch-size 512 --steps 50 --compile --compile-mode reduce-overhead --queries 0)
    profile_cmd=(benchmarks/profile_step.py --preset ddpm-cifar10 --batch-size 128 --steps 5)
    limits=(130 130 160 80 80 90)
fi
if [ -n "${GPU_CHECK_LIMIT_S:-}" ]; then  # (tests: every step's limit)
    limits=("$GPU_CHECK_LIMIT_S" "$GPU_CHECK_LIMIT_S" "$GPU_CHECK_LIMIT_S" "$GPU_CHECK_LIMIT_S" "$GPU_CHECK_LIMIT_S"
            "$GPU_CHECK_LIMIT_S")
fi

mkdir -p "$(dirname "$out")"
{
    echo
    echo "## GPU check (\`scripts/gpu-check.sh\` $mode), $(date -u +%Y-%m-%d)"
    echo
    echo "Machine: $machine. Commit $commit."
} >> "$out"

failed=()
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
step() {  # step NAME LIMIT TITLE SCRIPT ARGS...: run a benchmark under a time limit, append its table at once
    local name=$1 limit=$2 title=$3
    shift 3
    echo "gpu-check: $name (limit ${limit} s): $*" >&2
    local t0=$SECONDS rc=0
    timeout -k 3 "$limit" "$PY" "$@" > "$tmp/$name.md" 2> "$tmp/$name.err" || rc=$?
    local took=$((SECONDS - t0))
    {
        echo
        echo "### $title (\`${*}\`)"
        echo
        if [ $rc = 0 ]; then
            cat "$tmp/$name.md"
            echo
            echo "(step took ${took} s)"
        elif [ $rc = 124 ] || [ $rc = 137 ]; then
            echo "**$name: not measured: stopped at its limit of ${limit} s** (last output: $(tail -n 1 "$tmp/$name.err" | cut -c1-300))"
        else
            echo "**$name: not measured: failed (exit $rc) after ${took} s**: $(tail -n 1 "$tmp/$name.err" | cut -c1-300)"
        fi
    } >> "$out"
    if [ $rc = 0 ]; then
        cat "$tmp/$name.md" >&2
    else
        failed+=("$name (exit $rc)")
        echo "gpu-check: $name failed (exit $rc, ${took} s): $(tail -n 1 "$tmp/$name.err")" >&2
    fi
}

step train "${limits[0]}" "Training step" "${train[@]}"
step sampling "${limits[1]}" "Sampling and memorization pass" "${sampling[@]}"
step packing "${limits[2]}" "Clients packed on one device" "${packing[@]}"
if [ $graphs = 1 ] && [ ${#graphs_train[@]} -gt 0 ]; then
    step graphs-train "${limits[3]}" "Training step with CUDA graphs (compile-mode reduce-overhead)" \
        "${graphs_train[@]}"
    step graphs-sampling "${limits[4]}" "DDIM-50 with CUDA graphs (compile-mode reduce-overhead)" \
        "${graphs_sampling[@]}"
fi
if [ $profile = 1 ]; then
    step profile "${limits[5]}" "Profile of one compiled training step" "${profile_cmd[@]}"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-check: not measured: ${failed[*]}; the other tables are in $out" >&2
    exit 1
fi
echo "gpu-check: tables appended to $out" >&2
