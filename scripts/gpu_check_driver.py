#!/usr/bin/env python3
"""Small GPU drivers for scripts/gpu_check.sh (one sub-command per step; exit status 0 = pass).

    sanitize   small encodes / decodes (EXP4, RAW, multi-region tables, batch, corrupted payloads) for
               compute-sanitizer memcheck / racecheck
    stress     repeated 256 MiB encodes: identical bytes every time, decodes back (look-back under load)
    graph      multi-region (device table) encode + decode captured in a CUDA graph, replayed
    batch      one-launch batched encode of per-layer payloads vs one encode per layer (timings as JSON)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitzip_vllm.codec import reference  # noqa: E402
from splitzip_vllm.codec.backends.cuda_backend import CudaBackend  # noqa: E402
from splitzip_vllm.codec.codebook import Codebook  # noqa: E402
from splitzip_vllm.codec.format import HEADER_BYTES, PayloadError, encode_capacity, parse_header  # noqa: E402

BF16 = 1
BOOK = Codebook((122, 121, 123, 120, 124, 119, 125, 118, 117, 126, 116, 115, 127, 114, 113, 112))
DEV = torch.device("cuda")
BE = CudaBackend()


def kv(n: int, seed: int, outliers: float = 0.002) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, device=DEV, generator=g) * 0.05
    mask = torch.rand(n, device=DEV, generator=g) < outliers
    return torch.where(mask, x * 3000, x).to(torch.bfloat16)


def encode(regions, codebook=BOOK, cl=12, tag=0) -> torch.Tensor:
    n = sum(r.numel() for r in regions)
    out = torch.empty(encode_capacity(n, 2), dtype=torch.uint8, device=DEV)
    BE.encode_into(regions, BF16, codebook, cl, out, tag)
    return out[:parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes]


def roundtrip(regions, codebook=BOOK, cl=12) -> None:
    p = encode(regions, codebook, cl)
    assert torch.equal(p.cpu(), reference.encode([r.cpu() for r in regions], BF16, codebook, cl))
    ys = [torch.empty_like(r) for r in regions]
    BE.decode_into(p, ys, BF16)
    assert all(torch.equal(a, b) for a, b in zip(ys, regions))


def cmd_sanitize(_args) -> None:
    for n, cl in ((1, 12), (4097, 8), (70001, 12), (200003, 15)):
        roundtrip([kv(n, n)], BOOK, cl)
    roundtrip([kv(5000, 1, 0.7)])  # RAW fallback
    roundtrip([kv(9999, 2)], None)  # RAW
    pages = [kv(5120, 10 + i) for i in range(5)]
    roundtrip(pages)
    ptrs = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEV)
    out = torch.empty(encode_capacity(5 * 5120, 2), dtype=torch.uint8, device=DEV)
    BE.encode_table_into(ptrs, None, 5120, 5 * 5120, BF16, BOOK, 12, out)
    outs = [torch.empty(encode_capacity(20000, 2), dtype=torch.uint8, device=DEV) for _ in range(3)]
    lens = BE.encode_batch_into([[kv(20000, 20 + i)] for i in range(3)], BF16, BOOK, 12, outs, [1, 2, 3])
    torch.cuda.synchronize()
    assert all(v > 0 for v in lens.tolist())
    p = encode([kv(30000, 3)]).clone()
    p[HEADER_BYTES + 40] ^= 0x11  # corrupted sm byte: checksum error, no out-of-bounds access
    try:
        BE.decode_into(p, [torch.empty(30000, dtype=torch.bfloat16, device=DEV)], BF16)
        raise AssertionError("corruption not detected")
    except PayloadError:
        pass
    torch.cuda.synchronize()


def cmd_stress(args) -> None:
    x = kv(args.mib << 19, 5)
    out = torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8, device=DEV)
    BE.encode_into([x], BF16, BOOK, 12, out)
    torch.cuda.synchronize()
    first = out.clone()
    length = parse_header(first[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    t0 = time.time()
    for i in range(args.reps):
        out.fill_(0xA5)
        BE.encode_into([x], BF16, BOOK, 12, out)
        torch.cuda.synchronize()
        assert torch.equal(out[:length], first[:length]), f"encode {i} differs"
    y = torch.empty_like(x)
    BE.decode_into(first[:length], [y], BF16)
    assert torch.equal(y, x)
    print(json.dumps({"stress_reps": args.reps, "mib": args.mib, "seconds": round(time.time() - t0, 2)}))


def cmd_graph(_args) -> None:
    pages = [kv(16 * 8 * 128, 30 + i) for i in range(16)]
    n = sum(p.numel() for p in pages)
    ptrs = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEV)
    ys = [torch.empty_like(p) for p in pages]
    yptrs = torch.tensor([y.data_ptr() for y in ys], dtype=torch.int64, device=DEV)
    out = torch.empty(encode_capacity(n, 2), dtype=torch.uint8, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        BE.encode_table_into(ptrs, None, pages[0].numel(), n, BF16, BOOK, 12, out, tag=7)
        BE.decode_table_into_async(out, yptrs, None, pages[0].numel(), n, BF16, tag=7)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        BE.encode_table_into(ptrs, None, pages[0].numel(), n, BF16, BOOK, 12, out, tag=7)
        st = BE.decode_table_into_async(out, yptrs, None, pages[0].numel(), n, BF16, tag=7)
    ref = reference.encode([p.cpu() for p in pages], BF16, BOOK, 12, 7)
    for _ in range(5):
        out.zero_()
        for y in ys:
            y.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert int(st[0].item()) == 0 and torch.equal(out[:ref.numel()].cpu(), ref)
        assert all(torch.equal(a, b) for a, b in zip(ys, pages))
    print(json.dumps({"graph_replays": 5, "pages": len(pages)}))


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def cmd_batch(args) -> None:
    layers = [[kv(args.layer_mib << 19, 40 + i)] for i in range(args.layers)]
    outs = [torch.empty(encode_capacity(args.layer_mib << 19, 2), dtype=torch.uint8, device=DEV) for _ in layers]
    tags = list(range(1, args.layers + 1))
    per_layer = _time(lambda: [BE.encode_into(r, BF16, BOOK, 12, o, t) for r, o, t in zip(layers, outs, tags)], 10)
    batched = _time(lambda: BE.encode_batch_into(layers, BF16, BOOK, 12, outs, tags), 10)
    total = args.layers * (args.layer_mib << 20)
    row = {"layers": args.layers, "layer_mib": args.layer_mib, "per_layer_ms": per_layer * 1e3,
           "batched_ms": batched * 1e3, "per_layer_gbps": total / per_layer / 1e9, "batched_gbps": total / batched / 1e9}
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sanitize")
    st = sub.add_parser("stress")
    st.add_argument("--mib", type=int, default=256)
    st.add_argument("--reps", type=int, default=20)
    sub.add_parser("graph")
    b = sub.add_parser("batch")
    b.add_argument("--layers", type=int, default=32)
    b.add_argument("--layer-mib", type=int, default=2)
    b.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not CudaBackend.is_available():
        sys.exit("gpu_check_driver: needs a CUDA device and the built splitzip_vllm._C_cuda")
    {"sanitize": cmd_sanitize, "stress": cmd_stress, "graph": cmd_graph, "batch": cmd_batch}[args.cmd](args)


if __name__ == "__main__":
    main()
