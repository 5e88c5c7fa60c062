#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run lint, type check and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
KVLENS_EXTRAS=dev,bench,compat bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -n 2 -q "$@"
