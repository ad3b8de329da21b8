#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test extras. Sourced by the other scripts.
# PyTorch: an existing install is kept; otherwise TORCH_SPEC (default: torch==2.14.1 torchvision==0.29.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.fl-ietagc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch, torchvision" 2>/dev/null; then
    echo "setup: installing ${TORCH_SPEC:=torch==2.14.1 torchvision==0.29.1}"
    # shellcheck disable=SC2086
    python -m pip install -q $TORCH_SPEC
  fi
  echo "setup: installing fl-ietagc and its dependencies"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# No run-time downloads, telemetry or update checks from Flower.
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# What fl_ietagc sets on import (fl_ietagc/__init__.py), also for the processes `flwr run` starts without importing
# it (the local SuperLink and its simulation): Ray's future accelerator behaviour (no FutureWarning) and every
# client's progress line (no folding of lines that differ only in numbers).
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=${RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO:-0} RAY_DEDUP_LOGS=${RAY_DEDUP_LOGS:-0}
