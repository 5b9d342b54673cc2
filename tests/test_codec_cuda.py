"""CUDA codec backend (``splitzip_vllm._C_cuda``) on a real GPU, against the PyTorch reference.

Skipped without a CUDA device or without the built extension. Checks: byte equality with
``reference.encode`` on all 65,536 bf16 patterns, KV-like and outlier-heavy data, sizes 0/1/odd/multi-chunk,
the RAW fallback and RAW dtypes; lists of (unaligned, ragged) regions and device pointer tables; decoding into
views of a canary buffer; corrupted payloads give the reference decoder's PayloadError and never write outside
the destination; encode / decode_into_async run without host synchronisation (sync-debug mode and CUDA-graph
capture); a large multi-tile payload checked against the reference run on the GPU; the same for EXP2L payloads
(two-level codebooks, FORMAT.md §3a), whose corrupted payloads must fail before anything is written.
The same checks run without a GPU on the CPU emulation of the kernels in tests/test_codec_cuda_emu.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from _codec_util import all_bf16_patterns, channel_kv_bf16, top_codebook
from splitzip_vllm.codec import reference
from splitzip_vllm.codec.backends.cuda_backend import CudaBackend, _IMPORT_ERROR
from splitzip_vllm.codec.codebook import Codebook
from splitzip_vllm.codec.format import (HEADER_BYTES, Exp2lLayout, Exp4Layout, PayloadError, encode_capacity,
                                        parse_header)

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available (the CUDA codec needs a GPU)", allow_module_level=True)
if not CudaBackend.is_available():
    pytest.skip(f"splitzip_vllm._C_cuda is not built ({_IMPORT_ERROR}); build with a CUDA torch: "
                "pip install --no-build-isolation -e .", allow_module_level=True)

DEV = torch.device("cuda")
BF16 = 1
BOOK = Codebook((122, 121, 123, 120, 124, 119, 125, 118, 117, 126, 116, 115, 127, 114, 113, 112), two_level=False)
BE = CudaBackend()
kv_like = functools.partial(channel_kv_bf16, device=DEV)


def cuda_encode(regions, dtype, codebook, chunk_log2) -> torch.Tensor:
    n = sum(r.numel() for r in regions)
    esize = regions[0].element_size() if regions else 2
    cap = encode_capacity(n, esize)
    out = torch.full((cap + 256,), 0xA5, dtype=torch.uint8, device=DEV)
    BE.encode_into(regions, dtype, codebook, chunk_log2, out)
    assert bool((out[cap:] == 0xA5).all()), "encode wrote past encode_capacity"
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    return out[:length]


def check_roundtrip(regions, codebook=BOOK, chunk_log2=12, dtype=BF16):
    got = cuda_encode(regions, dtype, codebook, chunk_log2)
    ref = reference.encode([r.cpu() for r in regions], dtype, codebook, chunk_log2)
    assert got.numel() == ref.numel() and torch.equal(got.cpu(), ref), "payload differs from the reference"
    dst = [torch.empty_like(r) for r in regions]
    if dst:
        BE.decode_into(got, dst, dtype)
        for a, b in zip(dst, regions):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return got


@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_all_bf16_patterns(chunk_log2):
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    x = x[torch.randperm(65536, generator=torch.Generator().manual_seed(chunk_log2))].view(torch.bfloat16)
    check_roundtrip([x.to(DEV)], BOOK, chunk_log2)
    check_roundtrip([x.to(DEV)], Codebook((0, 255, 127, 126), two_level=False), chunk_log2)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 257, 2047, 2048, 2049, 4095, 4097, 8191,
                               8193, 12289, 30001, 262147])
def test_sizes(n):
    x = kv_like(n, seed=n, outliers=0.01)
    for cl in (8, 12, 15):
        check_roundtrip([x], BOOK, cl)


def test_empty():
    check_roundtrip([torch.empty(0, dtype=torch.bfloat16, device=DEV)], BOOK, 12)


@pytest.mark.parametrize("rate", [0.0, 0.002, 0.05, 0.15, 0.4, 1.0])
def test_escape_rates(rate):
    x = kv_like(200000, seed=7, outliers=rate)
    for cl in (8, 12, 13, 15):
        check_roundtrip([x], BOOK, cl)


def test_raw_boundary():
    n = 6000
    base = kv_like(n, seed=3, outliers=0.0).cpu()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    for m in range(1380, 1520, 7):
        x = base.clone()
        x[order[:m]] = torch.tensor(3.0e30, dtype=torch.bfloat16)
        check_roundtrip([x.to(DEV)], BOOK, 8)


@pytest.mark.parametrize("dtype,torch_dtype", [(0, torch.uint8), (2, torch.float16), (3, torch.float32)] + (
    [(4, torch.float8_e4m3fn), (5, torch.float8_e5m2)] if hasattr(torch, "float8_e4m3fn") else []))
def test_raw_dtypes(dtype, torch_dtype):
    for n in (1, 17, 5000, 300001):
        if torch_dtype == torch.uint8:
            x = torch.randint(0, 256, (n,), dtype=torch.uint8)
        else:
            x = (torch.randn(n) * 4).to(torch_dtype)
        check_roundtrip([x.to(DEV)], BOOK, 12, dtype=dtype)


def test_no_codebook():
    check_roundtrip([kv_like(99999, seed=1)], None, 12)


def test_multi_region_pages_and_ragged():
    pages = [kv_like(16 * 8 * 128, seed=i) for i in range(12)]
    check_roundtrip(pages, BOOK, 12)
    mla = [kv_like(16 * 576, seed=100 + i) for i in range(7)]  # 9216-element pages: tiles straddle pages
    check_roundtrip(mla, BOOK, 12)
    big = kv_like(300000, seed=11, outliers=0.02)
    cuts = [0, 1, 1, 9, 700, 701, 5000, 5003, 130000, 130000, 299999, 300000]
    check_roundtrip([big[a:b] for a, b in zip(cuts[:-1], cuts[1:])], BOOK, 12)
    check_roundtrip([big[a:b] for a, b in zip(cuts[:-1], cuts[1:])], BOOK, 9)


def test_device_pointer_tables():
    pages = [kv_like(4096, seed=i) for i in range(10)]
    ptrs = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEV)
    n = 40960
    cap = encode_capacity(n, 2)
    out = torch.empty(cap, dtype=torch.uint8, device=DEV)
    BE.encode_table_into(ptrs, None, 4096, n, BF16, BOOK, 12, out)
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    ref = reference.encode([p.cpu() for p in pages], BF16, BOOK, 12)
    assert torch.equal(out[:length].cpu(), ref)
    dst = [torch.empty_like(p) for p in pages]
    dptrs = torch.tensor([d.data_ptr() for d in dst], dtype=torch.int64, device=DEV)
    st = BE.decode_table_into_async(out[:length], dptrs, None, 4096, n, BF16)
    BE.raise_for_status(st, out[:length], BF16, n)
    assert all(torch.equal(a, b) for a, b in zip(dst, pages))
    # ragged, via a prefix table
    sizes = [1, 4095, 0, 9000, 333, 27531]
    parts = [kv_like(s, seed=50 + i) for i, s in enumerate(sizes)]
    ptrs = torch.tensor([p.data_ptr() if p.numel() else 0 for p in parts], dtype=torch.int64, device=DEV)
    prefix = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), dtype=torch.int64, device=DEV)
    n = sum(sizes)
    out = torch.empty(encode_capacity(n, 2), dtype=torch.uint8, device=DEV)
    BE.encode_table_into(ptrs, prefix, 0, n, BF16, BOOK, 12, out)
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    assert torch.equal(out[:length].cpu(), reference.encode([p.cpu() for p in parts], BF16, BOOK, 12))


def _reference_verdict(payload: torch.Tensor, dtype: int, n: int) -> str | None:
    try:
        reference.decode(payload.cpu(), dtype, n)
    except PayloadError as e:
        return str(e)
    return None


def _cuda_verdict(payload: torch.Tensor, dtype: int, n: int, torch_dtype=torch.bfloat16) -> str | None:
    buf = torch.full((n + 4096,), 0x3C3C, dtype=torch.int16, device=DEV).view(torch_dtype)
    canary = buf.clone()
    a, b = 1000, 1000 + n // 2 + 37
    regions = [buf[a:a + n // 2], buf[b:b + n - n // 2]]
    p = payload.to(DEV)
    status = BE.decode_into_async(p, regions, dtype)
    torch.cuda.synchronize()
    keep = torch.ones(buf.numel(), dtype=torch.bool, device=DEV)
    keep[a:a + n // 2] = False
    keep[b:b + n - n // 2] = False
    assert torch.equal(buf.view(torch.int16)[keep], canary.view(torch.int16)[keep]), "write outside destination"
    try:
        BE.raise_for_status(status, p, dtype, n)
    except PayloadError as e:
        return str(e)
    return None


def test_corrupted_payloads_match_reference_errors():
    n = 9001
    x = kv_like(n, seed=21, outliers=0.02).cpu()
    payload = reference.encode([x], BF16, BOOK, 8)
    hdr = parse_header(payload[:HEADER_BYTES].numpy().tobytes())
    lay = Exp4Layout.compute(n, 8, hdr.n_escapes)
    body = HEADER_BYTES
    spans = [(0, HEADER_BYTES), (body, body + n), (body + lay.off_codes, body + lay.off_counts),
             (body + lay.off_counts, body + lay.off_pos), (body + lay.off_pos, body + lay.off_exp),
             (body + lay.off_exp, body + lay.body_bytes)]
    g = torch.Generator().manual_seed(99)
    for lo, hi in spans:
        for _ in range(12):
            p = payload.clone()
            k = int(torch.randint(lo, hi, (1,), generator=g))
            p[k] ^= int(torch.randint(1, 256, (1,), generator=g))
            assert _cuda_verdict(p, BF16, n) == _reference_verdict(p, BF16, n), (lo, k)
    c0 = body + lay.off_counts
    for patch in ([0xFF, 0x7F], [0, 0], [int(payload[c0]) + 1, int(payload[c0 + 1])]):
        p = payload.clone()
        p[c0:c0 + 2] = torch.tensor(patch, dtype=torch.uint8)
        assert _cuda_verdict(p, BF16, n) == _reference_verdict(p, BF16, n)
    p = payload.clone()
    p[body + lay.off_pos:body + lay.off_pos + 2] = torch.tensor([0xFF, 0xFF], dtype=torch.uint8)
    assert _cuda_verdict(p, BF16, n) == _reference_verdict(p, BF16, n)
    for plen in (0, 10, 63, 64, 95, 96, payload.numel() - 1):
        assert _cuda_verdict(payload[:plen], BF16, n) == _reference_verdict(payload[:plen], BF16, n)
    assert _cuda_verdict(payload, BF16, n - 1) == _reference_verdict(payload, BF16, n - 1)
    assert _cuda_verdict(payload, 2, n, torch_dtype=torch.float16) == _reference_verdict(payload, 2, n)
    assert _cuda_verdict(payload, BF16, n) is None


def test_decode_into_raises_payload_error():
    x = kv_like(5000, seed=4)
    p = cuda_encode([x], BF16, BOOK, 12).clone()
    p[HEADER_BYTES + 17] ^= 0x40
    with pytest.raises(PayloadError, match="checksum"):
        BE.decode_into(p, [torch.empty_like(x)], BF16)


def test_misaligned_buffers_are_staged():
    x = kv_like(10000, seed=8)
    ref = reference.encode([x.cpu()], BF16, BOOK, 12)
    big = torch.zeros(encode_capacity(10000, 2) + 64, dtype=torch.uint8, device=DEV)
    out = big[3:3 + encode_capacity(10000, 2)]
    BE.encode_into([x], BF16, BOOK, 12, out)
    assert torch.equal(out[:ref.numel()].cpu(), ref)
    holder = torch.zeros(ref.numel() + 8, dtype=torch.uint8, device=DEV)
    holder[5:5 + ref.numel()].copy_(ref.to(DEV))
    y = torch.empty_like(x)
    BE.decode_into(holder[5:5 + ref.numel()], [y], BF16)
    assert torch.equal(y, x)


def _graph_roundtrip(x: torch.Tensor, codebook: Codebook, out: torch.Tensor, y: torch.Tensor) -> int:
    """Encode x into out and decode it into y (through a device pointer table) in a CUDA graph, which fails on any
    synchronising call: a warm-up run on a side stream, the capture, then out and y zeroed and the graph replayed.
    Returns the decode status code of the replay."""
    dptr = torch.tensor([y.data_ptr()], dtype=torch.int64, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        BE.encode_into([x], BF16, codebook, 12, out)
        BE.decode_table_into_async(out, dptr, None, x.numel(), x.numel(), BF16)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        BE.encode_into([x], BF16, codebook, 12, out)
        st = BE.decode_table_into_async(out, dptr, None, x.numel(), x.numel(), BF16)
    out.zero_()
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return int(st[0].item())


def test_no_host_sync_and_graph_capture():
    x = kv_like(1 << 20, seed=9)
    cap = encode_capacity(x.numel(), 2)
    out = torch.empty(cap, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        BE.encode_into([x], BF16, BOOK, 12, out)
        status = BE.decode_into_async(out, [y], BF16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    BE.raise_for_status(status, out, BF16, x.numel())
    assert torch.equal(y, x)
    out2 = torch.empty_like(out)
    y2 = torch.empty_like(x)
    assert _graph_roundtrip(x, BOOK, out2, y2) == 0
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    assert torch.equal(out2[:length], out[:length])
    assert torch.equal(y2, x)


def test_large_multi_tile_matches_gpu_reference():
    n = 48 * (1 << 20) + 12345  # ~96 MiB, thousands of tiles: exercises the look-back under real concurrency
    x = kv_like(n, seed=13, outliers=0.002)
    for cl in (12, 8):
        got = cuda_encode([x], BF16, BOOK, cl)
        ref = reference.encode([x], BF16, BOOK, cl)  # the reference runs on the GPU tensors
        assert torch.equal(got, ref)
        y = torch.empty_like(x)
        BE.decode_into(got, [y], BF16)
        assert torch.equal(y, x)


def test_api_backend_selection():
    from splitzip_vllm import codec
    x = kv_like(77777, seed=3)
    p = codec.encode(x, BOOK, backend="cuda")
    assert torch.equal(p.cpu(), reference.encode([x.cpu()], BF16, BOOK, 12))
    y = codec.decode(p, backend="cuda")
    assert torch.equal(y, x)


def test_multi_region_lists_refused_inside_graph_capture():
    """A list of regions needs a host-built table: refused while capturing, with a clear error; the device-table
    path captures and replays (multi-region graph capture + replay)."""
    pages = [kv_like(5120, seed=i) for i in range(4)]
    n = 4 * 5120
    out = torch.zeros(encode_capacity(n, 2), dtype=torch.uint8, device=DEV)
    s = torch.cuda.Stream()
    ptrs = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEV)
    ys = [torch.empty_like(p) for p in pages]
    yptrs = torch.tensor([y.data_ptr() for y in ys], dtype=torch.int64, device=DEV)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        BE.encode_table_into(ptrs, None, 5120, n, BF16, BOOK, 12, out)
        BE.decode_table_into_async(out, yptrs, None, 5120, n, BF16)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA-graph capture"):
        with torch.cuda.graph(graph):
            BE.encode_into(pages, BF16, BOOK, 12, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        BE.encode_table_into(ptrs, None, 5120, n, BF16, BOOK, 12, out)
        st = BE.decode_table_into_async(out, yptrs, None, 5120, n, BF16)
    for _ in range(3):
        out.zero_()
        for y in ys:
            y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert int(st[0].item()) == 0
        assert torch.equal(out[:parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes].cpu(),
                           reference.encode([p.cpu() for p in pages], BF16, BOOK, 12))
        for a, b in zip(ys, pages):
            assert torch.equal(a, b)


def test_side_stream_tensors_are_recorded():
    """Inputs made on the default stream, encoded / decoded on a side stream and freed right away: the caching
    allocator must not reuse their memory before the side stream's kernels are done."""
    s = torch.cuda.Stream()
    ref_payloads = []
    with torch.cuda.stream(s):
        for i in range(8):
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
            with torch.cuda.stream(torch.cuda.default_stream()):
                x = kv_like(1 << 20, seed=100 + i)
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
            out = torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8, device=DEV)
            BE.encode_into([x[: 1 << 19], x[1 << 19:]], BF16, BOOK, 12, out)
            ref_payloads.append((x.cpu(), out))
            del x  # freed while the side stream may still read it
            with torch.cuda.stream(torch.cuda.default_stream()):
                torch.empty(1 << 21, dtype=torch.bfloat16, device=DEV).fill_(7.0)  # would reuse it
    torch.cuda.synchronize()
    for x, out in ref_payloads:
        length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
        assert torch.equal(out[:length].cpu(), reference.encode([x], BF16, BOOK, 12))


def test_encode_batch_one_launch():
    """All layers of a request in one launch: payloads and device-written lengths equal per-layer encodes."""
    layers = [[kv_like(1 << 20, seed=i)] for i in range(6)] + [[kv_like(4096, seed=50 + j) for j in range(5)]]
    layers += [[kv_like(3, seed=60)], [kv_like(9001, seed=61, outliers=0.6)]]
    tags = list(range(1, len(layers) + 1))
    outs = [torch.full((encode_capacity(sum(r.numel() for r in regs), 2),), 0xA5, dtype=torch.uint8, device=DEV)
            for regs in layers]
    lens = BE.encode_batch_into(layers, BF16, BOOK, 12, outs, tags)
    assert lens.device.type == "cuda" and lens.dtype == torch.int64
    for regs, tag, out, length in zip(layers, tags, outs, lens.tolist()):
        ref = reference.encode([r.cpu() for r in regs], BF16, BOOK, 12, tag)
        assert length == ref.numel() and torch.equal(out[:length].cpu(), ref)


# ---- EXP2L (FORMAT.md §3a): two-level codebooks --------------------------------------------------------------------

def cb22(x: torch.Tensor, k: int = 22) -> Codebook:
    return top_codebook(x, k, two_level=True)


def _mode(p: torch.Tensor) -> int:
    return parse_header(p[:HEADER_BYTES].cpu().numpy().tobytes()).mode


@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_exp2l_all_bf16_patterns(chunk_log2):
    pat = all_bf16_patterns()
    pat = pat[torch.randperm(65536, generator=torch.Generator().manual_seed(chunk_log2))]
    x = torch.cat([channel_kv_bf16(200000, seed=3, outliers=0.0), pat, channel_kv_bf16(200000, seed=4, outliers=0.0)])
    cb = cb22(x)
    assert _mode(check_roundtrip([x.to(DEV)], cb, chunk_log2)) == 2
    check_roundtrip([pat.to(DEV)], cb, chunk_log2)  # alone: EXP2L loses, the fallback must match too


@pytest.mark.parametrize("n", [1, 7, 64, 65, 257, 1000, 4097, 8193, 30001, 262147])
def test_exp2l_sizes_and_rates(n):
    for rate in (0.0, 0.01, 0.2):
        x = kv_like(n, seed=n, outliers=rate)
        for cl in (8, 12, 15):
            check_roundtrip([x], cb22(x), cl)
            check_roundtrip([x], cb22(x, 9), cl)


def test_exp2l_mode_choice():
    """Codebooks of 4..22 exponents over data of several spreads: the mode (and bytes) are the reference's."""
    g = torch.Generator().manual_seed(3)
    modes = set()
    for spread in (0.3, 1.0, 3.0, 8.0, None):  # None: flat over 16 exponents, where EXP4 wins
        if spread is None:
            e = 112 + torch.randint(0, 16, (50000,), generator=g, dtype=torch.int32)
        else:
            e = (120 + (torch.randn(50000, generator=g) * spread).round().clamp(-100, 100)).to(torch.int32)
        sm = torch.randint(0, 256, (50000,), generator=g, dtype=torch.int32)
        x = (((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)).to(torch.int16).view(torch.bfloat16)
        for k in (4, 7, 8, 16, 22):
            modes.add(_mode(check_roundtrip([x.to(DEV)], cb22(x, k), 12)))
    assert modes == {0, 1, 2}


def test_exp2l_multi_region_and_pointer_tables():
    pages = [kv_like(16 * 576, seed=100 + i, outliers=0.005) for i in range(7)]  # tiles straddle pages
    cb = cb22(torch.cat(pages))
    assert _mode(check_roundtrip(pages, cb, 12)) == 2
    big = kv_like(300000, seed=11, outliers=0.02)
    cuts = [0, 1, 1, 9, 700, 701, 5000, 5003, 130000, 130000, 299999, 300000]
    for cl in (9, 12, 15):
        check_roundtrip([big[a:b] for a, b in zip(cuts[:-1], cuts[1:])], cb22(big), cl)
    ptrs = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEV)
    n = sum(p.numel() for p in pages)
    out = torch.empty(encode_capacity(n, 2), dtype=torch.uint8, device=DEV)
    BE.encode_table_into(ptrs, None, pages[0].numel(), n, BF16, cb, 12, out)
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    assert torch.equal(out[:length].cpu(), reference.encode([p.cpu() for p in pages], BF16, cb, 12))
    dst = [torch.empty_like(p) for p in pages]
    dptrs = torch.tensor([d.data_ptr() for d in dst], dtype=torch.int64, device=DEV)
    st = BE.decode_table_into_async(out[:length], dptrs, None, pages[0].numel(), n, BF16)
    BE.raise_for_status(st, out[:length], BF16, n)
    assert all(torch.equal(a, b) for a, b in zip(dst, pages))


def _cuda_verdict_untouched(payload: torch.Tensor, n: int) -> str | None:
    """As _cuda_verdict; a payload failing a structural check must leave the destination untouched too."""
    buf = torch.full((n,), 0x3C3C, dtype=torch.int16, device=DEV).view(torch.bfloat16)
    status = BE.decode_into_async(payload.to(DEV), [buf], BF16)
    try:
        BE.raise_for_status(status, payload.to(DEV), BF16, n)
    except PayloadError as e:
        if "checksum" not in str(e):
            assert bool((buf.view(torch.int16) == 0x3C3C).all()), f"a refused EXP2L decode wrote ({e})"
        return str(e)
    return None


def test_exp2l_corrupted_payloads_match_reference_errors():
    n = 9001
    x = kv_like(n, seed=21, outliers=0.02).cpu()
    payload = reference.encode([x], BF16, cb22(x, 12), 8)
    hdr = parse_header(payload[:HEADER_BYTES].numpy().tobytes())
    assert hdr.mode == 2 and hdr.n_escapes > 50
    lay = Exp2lLayout.compute(n, 8, hdr.n_escapes, hdr.sec_bytes)
    b = HEADER_BYTES
    spans = [(0, b), (b, b + n), (b + lay.off_codes, b + lay.off_scounts), (b + lay.off_scounts, b + lay.off_sec),
             (b + lay.off_sec, b + lay.off_counts), (b + lay.off_counts, b + lay.off_pos),
             (b + lay.off_pos, b + lay.off_exp), (b + lay.off_exp, b + lay.body_bytes)]
    g = torch.Generator().manual_seed(99)
    for lo, hi in spans:
        for _ in range(12):
            p = payload.clone()
            for _ in range(1 + int(torch.randint(0, 3, (1,), generator=g))):
                k = int(torch.randint(lo, hi, (1,), generator=g))
                p[k] ^= int(torch.randint(1, 256, (1,), generator=g))
            want = _reference_verdict(p, BF16, n)
            assert _cuda_verdict(p, BF16, n) == want, (lo, k)
            assert _cuda_verdict_untouched(p, n) == want
    for plen in (0, 63, 96, payload.numel() - 1):
        assert _cuda_verdict(payload[:plen], BF16, n) == _reference_verdict(payload[:plen], BF16, n)
    assert _cuda_verdict(payload, BF16, n) is None


def test_exp2l_encode_batch_and_no_host_sync():
    layers = [[kv_like(1 << 18, seed=i)] for i in range(3)] + [[kv_like(4096, seed=50 + j) for j in range(5)]]
    layers += [[kv_like(3, seed=60)], [kv_like(9001, seed=61, outliers=0.6)]]
    cb = cb22(torch.cat([r.reshape(-1) for regs in layers for r in regs]))
    tags = list(range(1, len(layers) + 1))
    outs = [torch.empty(encode_capacity(sum(r.numel() for r in regs), 2), dtype=torch.uint8, device=DEV)
            for regs in layers]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lens = BE.encode_batch_into(layers, BF16, cb, 12, outs, tags)
        y = torch.empty_like(layers[0][0])
        status = BE.decode_into_async(outs[0], [y], BF16, tag=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for regs, tag, out, length in zip(layers, tags, outs, lens.tolist()):
        ref = reference.encode([r.cpu() for r in regs], BF16, cb, 12, tag)
        assert length == ref.numel() and torch.equal(out[:length].cpu(), ref)
    assert _mode(outs[0]) == 2
    BE.raise_for_status(status, outs[0], BF16, y.numel(), tag=1)
    assert torch.equal(y, layers[0][0])


def test_exp2l_graph_capture():
    x = kv_like(1 << 20, seed=9)
    cb = cb22(x)
    out = torch.zeros(encode_capacity(x.numel(), 2), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    assert _graph_roundtrip(x, cb, out, y) == 0 and torch.equal(y, x)
    ref = reference.encode([x.cpu()], BF16, cb, 12)
    assert _mode(ref) == 2 and torch.equal(out[:ref.numel()].cpu(), ref)


def test_exp2l_large_multi_tile_matches_gpu_reference():
    n = 48 * (1 << 20) + 12345  # thousands of tiles: both look-backs under real concurrency
    x = kv_like(n, seed=13, outliers=0.002)
    cb = cb22(x)
    for cl in (12, 8, 15):
        got = cuda_encode([x], BF16, cb, cl)
        ref = reference.encode([x], BF16, cb, cl)  # the reference runs on the GPU tensors
        assert _mode(got) == 2 and torch.equal(got, ref)
        y = torch.empty_like(x)
        BE.decode_into(got, [y], BF16)
        assert torch.equal(y, x)
