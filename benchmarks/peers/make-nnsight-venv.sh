#!/usr/bin/env bash
# Create (or reuse) the virtual environment of nnsight 0.8.1 over transformers 4.57.6 (pins in
# requirements-nnsight.txt beside this file), a peer of benchmarks/bench_interp.py. It never goes
# into kvlens's own .venv. torch is installed first, pinned (the CPU build), so no other torch is
# pulled in by nnsight's dependencies. Prints the environment's python last.
# Usage: benchmarks/peers/make-nnsight-venv.sh [DIR]   (default: .nnsight-venv at the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/../../.nnsight-venv}"
py="$dir/bin/python"
check="import nnsight, transformers; assert nnsight.__version__ == '0.8.1', nnsight.__version__; assert transformers.__version__ == '4.57.6', transformers.__version__"
if [ -x "$py" ] && "$py" -c "$check" >/dev/null 2>&1; then
  echo "$py"; exit 0
fi
python3 -m venv "$dir"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -m pip install -q torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
"$py" -m pip install -q -r "$here/requirements-nnsight.txt" 2> >(grep -v "^WARNING: Location" >&2)
"$py" -c "$check"
echo "$py"
