#!/usr/bin/env bash
# The code's habits (pyproject.toml [tool.ruff]): formatted by `ruff format`, and `ruff check` clean.
# Fix with: ruff format . && ruff check --fix .
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ruff format --check --quiet . || { echo "lint: run 'ruff format .'" >&2; exit 1; }
ruff check --quiet .
