#!/usr/bin/env bash
# Create (or reuse) the virtual environment of llama-cpp-python 0.3.36 (pins in
# requirements-llamacpp.txt beside this file), the peer of benchmarks/bench_quantized.py. It never
# goes into kvlens's own .venv. llama.cpp is compiled here from the source distribution: several
# minutes on 2 cores; set CMAKE_BUILD_PARALLEL_LEVEL to use more, run it under `nice` to yield.
# Built for AVX-512 without AMX: a -march=native build crashed (SIGSEGV on the first eval) on an
# Intel Xeon of the project's machines whose CPU flags list AMX, so the instruction sets are named
# one by one and every AMX kernel is off. Prints the environment's python last.
# Usage: benchmarks/peers/make-llamacpp-venv.sh [DIR]   (default: .llamacpp-venv at the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/../../.llamacpp-venv}"
py="$dir/bin/python"
check="from importlib.metadata import version as v; import llama_cpp; assert v('llama-cpp-python') == '0.3.36', v('llama-cpp-python')"
if [ -x "$py" ] && "$py" -c "$check" >/dev/null 2>&1; then
  echo "$py"; exit 0
fi
python3 -m venv "$dir"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
"$py" -m pip install -q --no-cache-dir -r "$here/requirements-llamacpp.txt" \
  2> >(grep -v "^WARNING: Location" >&2)
"$py" -c "$check"
echo "$py"
