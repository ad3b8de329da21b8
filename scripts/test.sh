#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. -m "not slow".
# Two pytest-xdist workers (PYTEST_WORKERS=N for another number, 0 for one process): most slow tests wait on
# process starts and Ray, so two share 2 cores well. A worker takes a whole file (its module fixtures start once,
# its tests never run beside each other), longest first (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
