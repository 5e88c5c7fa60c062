#!/usr/bin/env bash
# Create (or reuse) the virtual environment of the systems kvlens is measured against:
# TransformerLens 2.18 and Hugging Face transformers 4.57.6 (pinned in requirements.txt beside this
# file). They never go into kvlens's own .venv. Prints the environment's python last.
# Usage: benchmarks/peers/make-peer-venv.sh [DIR]   (default: .peer-venv at the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/../../.peer-venv}"
py="$dir/bin/python"
if [ -x "$py" ] && "$py" -c "import transformer_lens, transformers" >/dev/null 2>&1; then
  echo "$py"; exit 0
fi
python3 -m venv "$dir"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -m pip install -q torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
"$py" -m pip install -q -r "$here/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
"$py" -c "import transformer_lens, transformers; assert transformers.__version__ == '4.57.6'"
echo "$py"
