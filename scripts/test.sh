#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest, e.g. -m "not slow".
# Three pytest-xdist workers (PYTEST_WORKERS=N for another number, 0 for one process): a test's processes use about
# one core on average (they wait on process starts, Ray, sockets and polls), so three keep 2 cores busier than two. A worker takes a whole file (its module fixtures start once,
# its tests never run beside each other), longest first (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m pytest -q -n "${PYTEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
