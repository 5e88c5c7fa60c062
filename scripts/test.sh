#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run lint, type check and the whole test suite, then the
# native kernels' tests again with clang (zig's, from the dev extra's `ziglang`) as the compiler.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
KVLENS_EXTRAS=dev,bench,compat bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -n 2 -q "$@"

# The kernels built by clang (no OpenMP there: the single-threaded build), in a cache of their
# own. A build that fails stops here, loudly, rather than letting the tests skip.
clang_cc="$root/.venv/bin/python -m ziglang cc"
clang_cache="$(mktemp -d)"
trap 'rm -rf "$clang_cache"' EXIT
echo "kernels with clang ($clang_cc):"
KVLENS_CC="$clang_cc" KVLENS_CACHE_DIR="$clang_cache" .venv/bin/python -c '
import logging, sys
logging.basicConfig(level=logging.INFO, format="  %(message)s")
from kvlens import kernels
print("  native decode kernels:", kernels.describe())
sys.exit(0 if kernels.available() else 1)
'
KVLENS_CC="$clang_cc" KVLENS_CACHE_DIR="$clang_cache" \
  .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider tests/unit/kernels
