#!/usr/bin/env bash
# Create (or reuse) the virtual environment of TransformerLens 4.3.0 (TransformerBridge) over
# transformers 5.24.0 (pins in requirements-tl4.txt beside this file), a peer of
# benchmarks/bench_interp.py. It never goes into kvlens's own .venv, nor into .peer-venv (which
# holds TransformerLens 2.18 over transformers 4.x). torch is installed first, pinned (the CPU
# build). Prints the environment's python last.
# Usage: benchmarks/peers/make-tl4-venv.sh [DIR]   (default: .tl4-venv at the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/../../.tl4-venv}"
py="$dir/bin/python"
check="from importlib.metadata import version as v; from transformer_lens.model_bridge import TransformerBridge; assert v('transformer-lens') == '4.3.0', v('transformer-lens'); assert v('transformers') == '5.24.0', v('transformers')"
if [ -x "$py" ] && "$py" -c "$check" >/dev/null 2>&1; then
  echo "$py"; exit 0
fi
python3 -m venv "$dir"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -m pip install -q torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
"$py" -m pip install -q -r "$here/requirements-tl4.txt" 2> >(grep -v "^WARNING: Location" >&2)
"$py" -c "$check"
echo "$py"
