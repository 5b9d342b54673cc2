#!/usr/bin/env python3
"""GPU codec throughput: the CUDA backend (and Triton, when importable) next to a torch device memcpy.

Throughput is UNCOMPRESSED bytes per second: median over ``--iters`` timed runs (CUDA events around each run,
after ``--warmup`` runs) of one encode / decode of the whole input. Encode goes into a preallocated buffer of
``encode_capacity`` bytes; decode runs on the exact-length payload, ``decode_into_async`` (no host sync; the
status is checked after the timing). ``paged`` rows use a device pointer table over equal pages (the
connector's layout: one layer of one request in a paged KV cache) instead of one contiguous tensor.

Data (bfloat16): KV-like Gaussian values with log-normal per-channel scales and a small share of outliers
(``--outliers``, default tuned to ~0.2 % escapes), codebook calibrated on an independent draw; or ``--input``
(a ``.pt`` tensor / dict of tensors, or a ``.safetensors`` file), tiled up to the size.

    python benchmarks/gpu_codec_bench.py                    # 256 MiB and 16 MiB, cuda (+triton), < 2 min
    python benchmarks/gpu_codec_bench.py --sizes-mib 1024 --json out.json --verify-reference
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from splitzip_vllm.codec import reference  # noqa: E402
from splitzip_vllm.codec.codebook import calibrate  # noqa: E402
from splitzip_vllm.codec.format import HEADER_BYTES, encode_capacity, parse_header  # noqa: E402

BF16 = 1


def kv_like(n: int, seed: int, outliers: float, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    ch = 128
    rows = (n + ch - 1) // ch
    scale = torch.exp(torch.randn(1, ch, generator=g, device=device) * 0.7) * 0.05
    out = torch.empty(rows * ch, dtype=torch.bfloat16, device=device)
    step = 1 << 16  # rows per piece, bounds the float32 temporaries
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = torch.randn(r1 - r0, ch, generator=g, device=device) * scale
        if outliers:
            m = torch.rand(r1 - r0, ch, generator=g, device=device) < outliers
            x = torch.where(m, x * 3000.0, x)
        out[r0 * ch:r1 * ch] = x.reshape(-1).to(torch.bfloat16)
    return out[:n]


def load_input(path: str, n: int, device: torch.device) -> torch.Tensor:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(p))
    else:
        obj = torch.load(str(p), map_location="cpu")
    tensors = list(obj.values()) if isinstance(obj, dict) else [obj]
    flat = torch.cat([t.reshape(-1).to(torch.bfloat16) for t in tensors if t.is_floating_point()])
    reps = (n + flat.numel() - 1) // flat.numel()
    return flat.repeat(reps)[:n].to(device)


def time_op(fn, warmup: int, iters: int) -> float:
    """Median seconds of fn() over iters runs (CUDA events), after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def bench_size(size_mib: int, args, codebook, backends, dev) -> list[dict]:
    n = size_mib * (1 << 20) // 2
    raw_bytes = 2 * n
    x = load_input(args.input, n, dev) if args.input else kv_like(n, seed=1234 + size_mib, outliers=args.outliers,
                                                                  device=dev)
    rows = []

    def row(method, op, secs, **extra):
        r = {"size_mib": size_mib, "method": method, "op": op, "ms": secs * 1e3,
             "GBps": raw_bytes / secs / 1e9, **extra}
        rows.append(r)
        print(f"{size_mib:>8} MiB  {method:<16} {op:<8} {r['ms']:9.3f} ms  {r['GBps']:9.1f} GB/s"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    y = torch.empty_like(x)
    row("torch-memcpy", "copy", time_op(lambda: y.copy_(x), args.warmup, args.iters))

    cap = encode_capacity(n, 2)
    for name, be in backends.items():
        out = torch.empty(cap, dtype=torch.uint8, device=dev)
        enc_s = time_op(lambda: be.encode_into([x], BF16, codebook, args.chunk_log2, out), args.warmup, args.iters)
        hdr = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes())
        payload = out[:hdr.payload_bytes]
        stats = {"ratio": round(raw_bytes / hdr.payload_bytes, 4),
                 "escape_pct": round(100.0 * hdr.n_escapes / max(n, 1), 4), "mode": hdr.mode}
        row(name, "encode", enc_s, **stats)
        y.zero_()
        if hasattr(be, "decode_into_async"):
            holder = {}

            def dec():
                holder["st"] = be.decode_into_async(payload, [y], BF16)
            dec_s = time_op(dec, args.warmup, args.iters)
            be.raise_for_status(holder["st"], payload, BF16, n)
        else:  # e.g. triton: its decode_into includes its own host synchronisation
            dec_s = time_op(lambda: be.decode_into(payload, [y], BF16), args.warmup, args.iters)
        ok = bool(torch.equal(y.view(torch.int16), x.view(torch.int16)))
        row(name, "decode", dec_s, roundtrip_ok=ok)
        if not ok:
            raise SystemExit(f"{name}: decoded data differs from the input")
        if args.verify_reference:
            ref = reference.encode([x], BF16, codebook, args.chunk_log2)
            same = bool(torch.equal(ref, payload))
            print(f"{'':>8}      {name:<16} payload == reference: {same}", flush=True)
            if not same:
                raise SystemExit(f"{name}: payload differs from the reference")
        if name == "cuda" and args.page_elems and n % args.page_elems == 0:
            pages = x.view(-1, args.page_elems)
            ptrs = torch.tensor([pages[i].data_ptr() for i in range(pages.shape[0])], dtype=torch.int64,
                                device=dev)
            out2 = torch.empty(cap, dtype=torch.uint8, device=dev)
            enc_s = time_op(lambda: be.encode_table_into(ptrs, None, args.page_elems, n, BF16, codebook,
                                                         args.chunk_log2, out2), args.warmup, args.iters)
            same = bool(torch.equal(out2[:hdr.payload_bytes], payload))
            row("cuda-paged", "encode", enc_s, pages=pages.shape[0], same_payload=same)
            y.zero_()
            ypages = y.view(-1, args.page_elems)
            yptrs = torch.tensor([ypages[i].data_ptr() for i in range(ypages.shape[0])], dtype=torch.int64,
                                 device=dev)
            holder = {}

            def dec_paged():
                holder["st"] = be.decode_table_into_async(payload, yptrs, None, args.page_elems, n, BF16)
            dec_s = time_op(dec_paged, args.warmup, args.iters)
            be.raise_for_status(holder["st"], payload, BF16, n)
            ok = bool(torch.equal(y.view(torch.int16), x.view(torch.int16)))
            row("cuda-paged", "decode", dec_s, roundtrip_ok=ok)
        del out
    del x, y
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 16])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--chunk-log2", type=int, default=12)
    ap.add_argument("--outliers", type=float, default=0.0015, help="share of values scaled x3000 (escapes)")
    ap.add_argument("--page-elems", type=int, default=16 * 8 * 128,
                    help="elements per page for the paged rows (0: skip); default 16 tokens x 8 heads x 128")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--input", help=".pt or .safetensors file with bf16-convertible tensors (tiled to size)")
    ap.add_argument("--verify-reference", action="store_true", help="also compare payloads with the reference")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--modes", default="exp2l,exp4",
                    help="codebook views to time: exp2l (the full two-level codebook: each payload EXP2L where "
                         "smaller, FORMAT.md §5) and/or exp4 (its EXP4 view)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_codec_bench needs a CUDA device")
    dev = torch.device("cuda")
    from splitzip_vllm.codec.backends import backend_classes
    classes = backend_classes()
    backends = {}
    for name in args.backends.split(","):
        cls = classes.get(name)
        if cls is not None and cls.is_available() and cls.supports_device(dev):
            backends[name] = cls()
        else:
            print(f"[skip] backend {name!r} not available here", flush=True)
    # calibrate on an independent draw (or on the start of the input file)
    sample_n = 1 << 22
    sample = load_input(args.input, sample_n, dev) if args.input else kv_like(sample_n, 7, args.outliers, dev)
    codebook, hist = calibrate([sample.cpu()])
    print(f"device: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  codebook {list(codebook.exponents)}"
          f"  coverage {hist.coverage(codebook):.5f}", flush=True)
    t0 = time.time()
    rows = []
    views = {"exp2l": codebook, "exp4": codebook.exp4()}
    for mode in args.modes.split(","):
        print(f"--- codebook view {mode}", flush=True)
        for s in args.sizes_mib:
            rows += [dict(r, view=mode) for r in bench_size(s, args, views[mode], backends, dev)]
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                "chunk_log2": args.chunk_log2, "iters": args.iters, "warmup": args.warmup,
                "codebook": list(codebook.exponents)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
