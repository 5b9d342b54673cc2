#!/usr/bin/env bash
# CI check of the CUDA codec on a machine without a GPU:
#   1. nvcc compiles csrc/cuda/splitzip_cuda.cu stand-alone (no torch) for sm_80 and sm_90, warnings = errors;
#   2. (when a host C++ compiler is present) csrc/cuda/host_format_test.cpp checks the header / CRC /
#      validation / per-group bit logic shared by the kernels against format.h and validate.h.
# The kernels themselves are exercised on the CPU by tests/test_codec_cuda_emu.py and on a GPU by
# tests/test_codec_cuda.py. Exits non-zero on any failure.
#
#   scripts/check_cuda_compile.sh            # NVCC / CXX / CUDA_HOME may be set in the environment
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=/usr/local/cuda/bin/nvcc
  else
    echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 2
  fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "[check_cuda_compile] $("$NVCC" --version | tail -n 1)"
"$NVCC" -c -O3 -std=c++17 \
  -I "$ROOT/csrc/include" \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -Werror all-warnings \
  "$ROOT/csrc/cuda/splitzip_cuda.cu" -o "$TMP/splitzip_cuda.o"
echo "[check_cuda_compile] nvcc: csrc/cuda/splitzip_cuda.cu -> sm_80 + sm_90 object OK"

# the kernels refuse targets below sm_70 at compile time (nvcc 13 no longer knows such targets, so the guard is
# checked through the preprocessor: device pass of an sm_60 build)
if "$NVCC" -E -x cu -D__CUDA_ARCH__=600 -I "$ROOT/csrc/include" "$ROOT/csrc/cuda/splitzip_cuda.cu" \
    -o /dev/null 2>"$TMP/sm60.err"; then
  echo "[check_cuda_compile] FAIL: an sm_60 device pass compiled" >&2
  exit 1
fi
grep -q "needs sm_70 or newer" "$TMP/sm60.err" || { cat "$TMP/sm60.err" >&2; exit 1; }
echo "[check_cuda_compile] sm_60 device pass refused by #error, as intended"

CXX="${CXX:-$(command -v g++ || command -v c++ || true)}"
if [ -n "$CXX" ]; then
  "$CXX" -O2 -std=c++17 -Wall -Wextra -Werror \
    -I "$ROOT/csrc/include" -I "$ROOT/csrc/cuda" \
    "$ROOT/csrc/cuda/host_format_test.cpp" -o "$TMP/host_format_test"
  "$TMP/host_format_test"
else
  echo "[check_cuda_compile] no host C++ compiler: host_format_test skipped"
fi
echo "[check_cuda_compile] all OK"
