"""Capture real paged KV from a model served by vLLM (prefill side of SplitZipConnector) for calibration.

Runs an offline vLLM engine with ``SplitZipConnector`` as ``kv_producer`` and ``kv_dump_dir`` set, feeds it
prompts as prefill-only requests (``do_remote_decode``), and returns the ``.safetensors`` files the connector
wrote: one per request, one tensor per layer holding that request's KV blocks exactly as they sit in the cache.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path


def default_prompts(n: int, chars: int = 6000) -> list[str]:
    """Local text (Python standard library sources): no downloads."""
    # package sources (e.g. email/, json/): disjoint from the top-level modules the tiny tokenizer trained on
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*", "*.py")))
    files = [f for f in files if "site-packages" not in f and os.path.getsize(f) > chars]
    out = []
    for f in files[:: max(1, len(files) // max(n, 1))][:n]:
        out.append(Path(f).read_text(errors="replace")[:chars])
    return out


def dump_model_kv(model: str, out_dir: str, prompts: list[str] | None = None, n_prompts: int = 8,
                  max_model_len: int = 4096, extra_engine_args: dict | None = None) -> list[str]:
    """Prefill ``prompts`` with vLLM and save their KV under ``out_dir``; returns the file paths."""
    import socket

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(s.getsockname()[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    prompts = prompts or default_prompts(n_prompts)
    os.makedirs(out_dir, exist_ok=True)
    ktc = KVTransferConfig(kv_connector="SplitZipConnector", kv_connector_module_path="splitzip_vllm.connector",
                           kv_role="kv_producer",
                           kv_connector_extra_config={"kv_dump_dir": out_dir, "kv_dump_max_requests": len(prompts),
                                                      "compression": "never", "kv_lease_duration": 1.0})
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=max_model_len,
              kv_transfer_config=ktc, **(extra_engine_args or {}))
    tok = llm.get_tokenizer()
    ids = [tok.encode(p)[: max_model_len - 8] for p in prompts]
    sp = SamplingParams(max_tokens=1, temperature=0.0,
                        extra_args={"kv_transfer_params": {"do_remote_decode": True}})
    llm.generate([{"prompt_token_ids": x} for x in ids], sp, use_tqdm=True)
    del llm
    return sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))
