#!/usr/bin/env python3
"""Where the time of a small payload goes (CPU backend, one core): per-call cost split into layers.

For each payload size, the median time per call (µs) of:

* ``torch copy_``: ``dst.copy_(src)`` of the same bytes (the memcpy baseline of codec_bench, incl. its dispatch);
* ``backend.encode_into`` / ``backend.decode_into``: what the connector and codec_bench call;
* ``_C_cpu.encode_into`` / ``_C_cpu.decode_into``: the pybind11 entry point directly (no Python wrapper);
* the same binding on a 64-element region: the fixed per-call cost (argument conversion, header, CRC, section
  set-up), with almost no data;

and, from those, the per-byte part (binding at S minus binding at 64 elements) and the Python wrapper's share.

    python benchmarks/small_payload_profile.py [--sizes 12K 48K 192K] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from splitzip_vllm import _C_cpu  # noqa: E402
from splitzip_vllm.codec import calibrate, encode_capacity, get_backend  # noqa: E402
from splitzip_vllm.codec.format import HEADER_BYTES, dtype_code, parse_header  # noqa: E402

KiB = 1024


def per_call_us(fn, calls: int, repeat: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def parse_size(s: str) -> int:
    s = s.upper().removesuffix("B").removesuffix("I")
    return int(float(s[:-1]) * {"K": KiB, "M": KiB * KiB}[s[-1]]) if s[-1] in "KM" else int(s)


def gaussian(nbytes: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(nbytes // 2, generator=g) * 0.5).to(torch.bfloat16)
    return x, calibrate([x])[0]


def minilm(nbytes: int, data_dir: Path, tensor: str):
    """The first ``nbytes`` of one MiniLM eval tensor, codebook from the calib split (as codec_bench does)."""
    from splitzip_vllm.benchutil import load_bf16_tensors
    calib = [t for _, t in load_bf16_tensors([data_dir / "calib.safetensors"])]
    ev = dict(load_bf16_tensors([data_dir / "eval.safetensors"]))
    name = next(k for k in ev if tensor in k)
    return ev[name].reshape(-1)[: nbytes // 2].contiguous(), calibrate(calib)[0]


def synthetic(nbytes: int):
    """The first ``nbytes`` of codec_bench's synthetic set (outlier channels; codebook from an independent draw)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from codec_bench import synthetic_dataset
    _, data, cb, _, _ = synthetic_dataset()
    return data[: nbytes // 2].contiguous(), cb


def profile(x: torch.Tensor, cb, calls: int) -> dict:
    be = get_backend("cpu")
    nbytes = x.numel() * 2
    code = dtype_code(torch.bfloat16)
    out = torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8)
    n = be.encode_len([x], code, cb, 12, out)
    payload = out[:n].clone()
    escapes = parse_header(payload[:HEADER_BYTES].numpy().tobytes()).n_escapes
    dst = torch.empty_like(x)
    cbb, ncodes = bytes(cb.exponents), cb.n_codes
    tiny = x[:64].clone()
    tiny_out = torch.empty(encode_capacity(64, 2), dtype=torch.uint8)
    tn = _C_cpu.encode_into([tiny], code, cbb, ncodes, 12, tiny_out)
    tiny_payload, tiny_dst = tiny_out[:tn].clone(), torch.empty_like(tiny)
    flat_out = out.reshape(-1)
    r = {
        "bytes": nbytes, "escapes": escapes,
        "copy_us": per_call_us(lambda: dst.copy_(x), calls),
        "encode_wrapper_us": per_call_us(lambda: be.encode_into([x], code, cb, 12, out), calls),
        "encode_binding_us": per_call_us(lambda: _C_cpu.encode_into([x], code, cbb, ncodes, 12, flat_out), calls),
        "encode_fixed_us": per_call_us(lambda: _C_cpu.encode_into([tiny], code, cbb, ncodes, 12, tiny_out), calls),
        "decode_wrapper_us": per_call_us(lambda: be.decode_into(payload, [dst], code), calls),
        "decode_binding_us": per_call_us(lambda: _C_cpu.decode_into(payload, n, [dst], code), calls),
        "decode_fixed_us": per_call_us(lambda: _C_cpu.decode_into(tiny_payload, tn, [tiny_dst], code), calls),
    }
    assert torch.equal(dst.view(torch.int16), x.view(torch.int16))
    for k in ("encode", "decode"):
        r[f"{k}_per_byte_us"] = r[f"{k}_binding_us"] - r[f"{k}_fixed_us"]
        r[f"{k}_python_us"] = r[f"{k}_wrapper_us"] - r[f"{k}_binding_us"]
        r[f"{k}_vs_copy"] = r["copy_us"] / r[f"{k}_wrapper_us"]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["12K", "48K", "192K"])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--data", choices=("gaussian", "minilm", "synthetic"), default="gaussian")
    ap.add_argument("--tensor", default="layer0.k", help="with --data minilm: which eval tensor (name part)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "minilm_kv")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path, help="also write the table as Markdown to this file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rows = []
    for size in map(parse_size, a.sizes):
        if a.data == "gaussian":
            x, cb = gaussian(size)
        elif a.data == "synthetic":
            x, cb = synthetic(size)
        else:
            x, cb = minilm(size, a.data_dir, a.tensor)
        rows.append(profile(x, cb, a.calls))
    lines = ["| size | escapes | copy_ µs | encode µs (wrapper / binding / fixed at 64 elems / per-byte part) | "
             "decode µs (wrapper / binding / fixed / per-byte) | encode / decode vs copy_ |",
             "|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bytes'] // KiB} KiB | {r['escapes']} | {r['copy_us']:.2f} | {r['encode_wrapper_us']:.2f} / "
                     f"{r['encode_binding_us']:.2f} / {r['encode_fixed_us']:.2f} / {r['encode_per_byte_us']:.2f} | "
                     f"{r['decode_wrapper_us']:.2f} / {r['decode_binding_us']:.2f} / {r['decode_fixed_us']:.2f} / "
                     f"{r['decode_per_byte_us']:.2f} | {r['encode_vs_copy']:.2f}x / {r['decode_vs_copy']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.md:
        what = {"gaussian": "seeded Gaussian BF16 data",
                "synthetic": "codec_bench's synthetic set (codebook from an independent draw)",
                "minilm": f"MiniLM eval tensor {a.tensor} (codebook from the calib split)"}[a.data]
        a.md.write_text(f"One core (pinned), median µs per call of {a.calls} calls, {what}. "
                        "wrapper = `CpuBackend.encode_into`/`decode_into` (what the connector and codec_bench "
                        "call); binding = the `_C_cpu` entry point; fixed = the binding on 64 elements; per-byte = "
                        "binding - fixed.\n\n" + text)
    if a.json:
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
