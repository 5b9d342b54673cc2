"""The CUDA codec's kernel source, compiled for the CPU with csrc/cuda/emu/cuda_emu.h, against the reference.

No GPU needed: ``csrc/cuda/splitzip_cuda.cu`` is built as C++ with ``-DSPLITZIP_CUDA_EMU`` (256 cooperative
fibers per block with real barrier / warp-shuffle semantics, blocks on several OS threads so look-backs see
other blocks in flight) and driven through its C launchers with ctypes; "device" memory is host memory. The
payloads must be byte-identical to ``splitzip_vllm.codec.reference``, decoding must restore the data, and every
corrupted payload must give the reference decoder's error without a write outside the destination; a payload of
another transfer (FORMAT.md §6a) must be refused without any write.
tests/test_codec_cuda.py runs the same kind of checks on a real GPU through the torch extension.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from _codec_util import channel_kv_bf16 as kv_like
from _codec_util import to_v1, with_fields
from splitzip_vllm.codec import reference
from splitzip_vllm.codec.codebook import Codebook
from splitzip_vllm.codec.format import HEADER_BYTES, PayloadError, decode_error_message, encode_capacity, parse_header

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

BF16 = 1
BOOK = Codebook((122, 121, 123, 120, 124, 119, 125, 118, 117, 126, 116, 115, 127, 114, 113, 112), two_level=False)


class SzRegions(ctypes.Structure):
    _fields_ = [("ptrs", ctypes.c_void_p), ("prefix", ctypes.c_void_p), ("ptr0", ctypes.c_uint64),
                ("uniform", ctypes.c_int64), ("count", ctypes.c_int64), ("n", ctypes.c_int64)]


class SzBatchItem(ctypes.Structure):
    _fields_ = [("src", SzRegions), ("out", ctypes.c_void_p), ("out_capacity", ctypes.c_uint64),
                ("tag", ctypes.c_uint64), ("tile0", ctypes.c_uint64), ("ntiles", ctypes.c_uint64),
                ("state_off", ctypes.c_uint64), ("stage_off", ctypes.c_uint64), ("stage_cap", ctypes.c_uint64),
                ("exp4", ctypes.c_int32), ("pad", ctypes.c_int32)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler to build the CUDA-emulation library")
    out = tmp_path_factory.mktemp("szemu") / "libsplitzip_cuda_emu.so"
    cmd = [CXX, "-std=c++17", "-O1", "-DSPLITZIP_CUDA_EMU", "-x", "c++", "-shared", "-fPIC", "-pthread",
           "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc" / "cuda"),
           str(ROOT / "csrc" / "cuda" / "splitzip_cuda.cu"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"building the emulation library failed:\n{res.stderr[-4000:]}")
    so = ctypes.CDLL(str(out))
    P = ctypes.POINTER(SzRegions)
    so.splitzip_cuda_encode.argtypes = [P, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                        ctypes.c_size_t, ctypes.c_void_p]
    so.splitzip_cuda_encode_workspace_bytes.restype = ctypes.c_size_t
    so.splitzip_cuda_encode_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                        ctypes.c_int]
    so.splitzip_cuda_decode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, P, ctypes.c_int, ctypes.c_uint64,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    so.splitzip_cuda_decode_workspace_bytes.restype = ctypes.c_size_t
    so.splitzip_cuda_decode_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int]
    B = ctypes.POINTER(SzBatchItem)
    so.splitzip_cuda_encode_batch_plan.restype = ctypes.c_size_t
    so.splitzip_cuda_encode_batch_plan.argtypes = [B, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    so.splitzip_cuda_encode_batch.argtypes = [B, B, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_void_p]
    so.sz_emu_configure(4, 2, 3)  # 4 "SMs" x 2 resident blocks, blocks run on 3 OS threads
    return so


class Table:
    """SzRegions for a list of CPU tensors (host memory plays device memory), like the torch binding builds."""

    def __init__(self, regions: list[torch.Tensor], force_prefix: bool = False):
        parts = [r for r in regions if r.numel() > 0]
        n = sum(r.numel() for r in parts)
        self.keep = []
        if len(parts) == 0:
            self.s = SzRegions(None, None, 0, 0, 0, 0)
        elif len(parts) == 1 and not force_prefix:
            self.s = SzRegions(None, None, parts[0].data_ptr(), 0, 1, n)
        else:
            ptrs = torch.tensor([r.data_ptr() for r in parts], dtype=torch.int64)
            self.keep.append(ptrs)
            sizes = {r.numel() for r in parts}
            if len(sizes) == 1 and not force_prefix:
                self.s = SzRegions(ptrs.data_ptr(), None, 0, parts[0].numel(), len(parts), n)
            else:
                off = [0]
                for r in parts:
                    off.append(off[-1] + r.numel())
                prefix = torch.tensor(off, dtype=torch.int64)
                self.keep.append(prefix)
                self.s = SzRegions(ptrs.data_ptr(), prefix.data_ptr(), 0, 0, len(parts), n)


def aligned_empty(nbytes: int, fill: int | None = None) -> torch.Tensor:
    t = torch.empty(nbytes + 64, dtype=torch.uint8)
    off = (-t.data_ptr()) % 16
    v = t[off:off + nbytes]
    if fill is not None:
        v.fill_(fill)
    return v


def emu_encode(so, regions, dtype, codebook, chunk_log2, force_prefix=False, tag=0) -> torch.Tensor:
    tb = Table(regions, force_prefix)
    n = tb.s.n
    esize = regions[0].element_size() if regions else 2
    cap = encode_capacity(n, esize)
    out = aligned_empty(cap + 256, fill=0xA5)
    two = 1 if codebook is not None and codebook.two_level else 0  # as cuda_backend passes it
    wsb = so.splitzip_cuda_encode_workspace_bytes(n, dtype, 1 if codebook else 0, two, chunk_log2)
    ws = aligned_empty(wsb + 256, fill=0x5A)
    cb = bytes(codebook.exponents) if codebook else None
    rc = so.splitzip_cuda_encode(ctypes.byref(tb.s), dtype, cb, codebook.n_codes if codebook else 0, two,
                                 chunk_log2, tag, out.data_ptr(), cap, ws.data_ptr(), wsb, None)
    assert rc == 0, rc
    assert bool((out[cap:] == 0xA5).all()), "encode wrote past encode_capacity"
    assert bool((ws[wsb:] == 0x5A).all()), "encode wrote past its workspace"
    length = parse_header(out[:HEADER_BYTES].numpy().tobytes()).payload_bytes
    assert length <= cap
    return out[:length].clone()


def emu_decode(so, payload: torch.Tensor, regions, dtype, payload_len=None, force_prefix=False, tag=0):
    """Returns (code, aux) of the device status."""
    tb = Table(regions, force_prefix)
    p = aligned_empty(max(payload.numel(), 1))
    p[:payload.numel()].copy_(payload)
    plen = payload.numel() if payload_len is None else payload_len
    wsb = so.splitzip_cuda_decode_workspace_bytes(tb.s.n, dtype)
    ws = aligned_empty(wsb + 64, fill=0x5A)
    st = torch.full((4,), -1, dtype=torch.int32)
    rc = so.splitzip_cuda_decode(p.data_ptr(), plen, ctypes.byref(tb.s), dtype, tag, st.data_ptr(), ws.data_ptr(),
                                 wsb, None)
    assert rc == 0, rc
    assert bool((ws[wsb:] == 0x5A).all()), "decode wrote past its workspace"
    s = [int(v) & 0xFFFFFFFF for v in st.tolist()]
    return s[0], s[1] | (s[2] << 32)


def check_roundtrip(so, regions, codebook=BOOK, chunk_log2=12, dtype=BF16, force_prefix=False, tag=0):
    got = emu_encode(so, regions, dtype, codebook, chunk_log2, force_prefix, tag=tag)
    ref = reference.encode(regions, dtype, codebook, chunk_log2, tag)
    assert got.numel() == ref.numel() and torch.equal(got, ref), "payload differs from the reference"
    dst = [torch.empty_like(r) for r in regions]
    code, aux = emu_decode(so, ref, dst, dtype, force_prefix=force_prefix, tag=tag)
    assert (code, aux) == (0, 0)
    for a, b in zip(dst, regions):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return got


# ---- tests ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_all_bf16_patterns(lib, chunk_log2):
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    x = x[torch.randperm(65536, generator=torch.Generator().manual_seed(chunk_log2))].view(torch.bfloat16)
    # every pattern, with a codebook and with one that holds exponent 0 / 255 (escapes of all kinds)
    check_roundtrip(lib, [x], BOOK, chunk_log2)
    check_roundtrip(lib, [x], Codebook((0, 255, 127, 126), two_level=False), chunk_log2)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 1000, 2047, 2048, 2049,
                               4095, 4096, 4097, 8191, 8192, 8193, 12289, 30001])
def test_sizes(lib, n):
    x = kv_like(n, seed=n, outliers=0.01)
    for cl in (8, 12):
        check_roundtrip(lib, [x], BOOK, cl)


def test_empty(lib):
    check_roundtrip(lib, [torch.empty(0, dtype=torch.bfloat16)], BOOK, 12)
    got = emu_encode(lib, [], BF16, BOOK, 12)
    assert torch.equal(got, reference.encode([], BF16, BOOK, 12))


@pytest.mark.parametrize("rate", [0.0, 0.002, 0.05, 0.15, 0.4, 1.0])
def test_escape_rates(lib, rate):
    # high rates push the payload to the RAW fallback (FORMAT.md §5.1); both sides of the boundary
    x = kv_like(20000, seed=7, outliers=rate)
    for cl in (8, 13):
        check_roundtrip(lib, [x], BOOK, cl)


def test_raw_boundary_search(lib):
    # escape counts right around the EXP4/RAW decision for a fixed n
    n = 6000
    base = kv_like(n, seed=3, outliers=0.0)
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(n, generator=g)
    for m in (1400, 1440, 1455, 1460, 1470, 1500, 1600):
        x = base.clone()
        x[order[:m]] = torch.tensor(3.0e30, dtype=torch.bfloat16)
        check_roundtrip(lib, [x], BOOK, 8)


@pytest.mark.parametrize("dtype,torch_dtype", [(0, torch.uint8), (2, torch.float16), (3, torch.float32)] + (
    [(4, torch.float8_e4m3fn)] if hasattr(torch, "float8_e4m3fn") else []))
def test_raw_dtypes(lib, dtype, torch_dtype):
    for n in (1, 17, 5000, 40001):
        x = (torch.randn(n) * 4).to(torch_dtype) if torch_dtype != torch.uint8 else torch.randint(0, 256, (n,),
                                                                                                   dtype=torch.uint8)
        check_roundtrip(lib, [x], BOOK, 12, dtype=dtype)  # codebook ignored: RAW


def test_no_codebook(lib):
    check_roundtrip(lib, [kv_like(9999, seed=1)], None, 12)


def test_multi_region_uniform_pages(lib):
    pages = [kv_like(16 * 8 * 40, seed=i) for i in range(9)]  # 5120-element pages: tiles straddle pages
    check_roundtrip(lib, pages, BOOK, 12)
    check_roundtrip(lib, pages, BOOK, 8)
    check_roundtrip(lib, pages, BOOK, 12, force_prefix=True)


def test_multi_region_ragged_unaligned(lib):
    big = kv_like(60000, seed=11, outliers=0.02)
    cuts = [0, 1, 1, 9, 700, 701, 5000, 5003, 13000, 13000, 29999, 41000, 59990]
    regions = [big[a:b] for a, b in zip(cuts[:-1], cuts[1:])]  # odd sizes, empty ones, 2-byte aligned bases
    check_roundtrip(lib, regions, BOOK, 12)
    check_roundtrip(lib, regions, BOOK, 9)
    check_roundtrip(lib, [big[3:4003], big[5000:9000]], None, 12)  # RAW with unaligned regions
    f = torch.randn(9001).to(torch.float16)
    check_roundtrip(lib, [f[1:4000], f[4000:4001], f[4001:]], BOOK, 12, dtype=2)


def test_decode_into_regions_keeps_canaries(lib):
    x = kv_like(30000, seed=2, outliers=0.01)
    payload = reference.encode([x], BF16, BOOK, 12)
    buf = torch.full((40000,), 7.0, dtype=torch.bfloat16)
    cuts = [(5, 1005), (1100, 11100), (12001, 31001)]  # unaligned (offset 10 bytes) and aligned starts
    sizes = [b - a for a, b in cuts]
    assert sum(sizes) == 30000
    regions = [buf[a:b] for a, b in cuts]
    code, _ = emu_decode(lib, payload, regions, BF16)
    assert code == 0
    assert torch.equal(torch.cat(regions).view(torch.int16), x.view(torch.int16))
    mask = torch.ones(40000, dtype=torch.bool)
    for a, b in cuts:
        mask[a:b] = False
    assert bool((buf[mask] == 7.0).all())


def _reference_verdict(payload: torch.Tensor, dtype: int, n: int, tag: int = 0) -> str | None:
    try:
        reference.decode(payload, dtype, n, tag)
    except PayloadError as e:
        return str(e)
    return None


def _emu_verdict(lib, payload: torch.Tensor, dtype: int, n: int, torch_dtype=torch.bfloat16,
                 payload_len: int | None = None, tag: int = 0, untouched: bool = False) -> str | None:
    """The PayloadError message of the emulated decode (None = OK); no write outside the destination, and with
    ``untouched`` none at all."""
    buf = torch.full((n + 4096,), 0x3C3C, dtype=torch.int16).view(torch_dtype)  # 2-byte dtypes
    canary = buf.clone()
    regions = [buf[1000:1000 + n // 2], buf[1000 + n // 2 + 37:1000 + n + 37]]
    code, aux = emu_decode(lib, payload, regions, dtype, payload_len=payload_len, tag=tag)
    if untouched:
        assert torch.equal(buf.view(torch.uint8), canary.view(torch.uint8)), "a refused decode wrote"
    keep = torch.ones(buf.numel(), dtype=torch.bool)
    keep[1000:1000 + n // 2] = False
    keep[1000 + n // 2 + 37:1000 + n + 37] = False
    assert torch.equal(buf.view(torch.uint8).view(-1, buf.element_size())[keep],
                       canary.view(torch.uint8).view(-1, buf.element_size())[keep]), "write outside the destination"
    plen = payload.numel() if payload_len is None else payload_len
    header = payload[:min(HEADER_BYTES, plen)].numpy().tobytes()
    return decode_error_message(code, aux, header, plen, dtype, n, tag)


def _u16s(payload: torch.Tensor, off: int, count: int) -> list[int]:
    b = payload[off:off + 2 * count].to(torch.int32)
    return (b[0::2] | (b[1::2] << 8)).tolist()


def test_corrupted_payloads_match_reference_errors(lib):
    n = 9001
    x = kv_like(n, seed=21, outliers=0.02)
    payload = reference.encode([x], BF16, BOOK, 8)
    hdr = parse_header(payload[:HEADER_BYTES].numpy().tobytes())
    assert hdr.mode == 1 and hdr.n_escapes > 50
    from splitzip_vllm.codec.format import Exp4Layout
    lay = Exp4Layout.compute(n, 8, hdr.n_escapes)
    body = HEADER_BYTES
    spots = {
        "header": range(0, HEADER_BYTES),
        "sm": range(body, body + n),
        "codes": range(body + lay.off_codes, body + lay.off_codes + (n + 1) // 2),
        "counts": range(body + lay.off_counts, body + lay.off_counts + 2 * lay.n_chunks),
        "pos": range(body + lay.off_pos, body + lay.off_pos + 2 * hdr.n_escapes),
        "exp": range(body + lay.off_exp, body + lay.off_exp + hdr.n_escapes),
    }
    g = torch.Generator().manual_seed(99)
    cases = 0
    for name, rng in spots.items():
        for _ in range(6 if name != "header" else 10):
            p = payload.clone()
            k = rng[int(torch.randint(len(rng), (1,), generator=g))]
            p[k] ^= int(torch.randint(1, 256, (1,), generator=g))
            assert _emu_verdict(lib, p, BF16, n) == _reference_verdict(p, BF16, n), (name, k)
            cases += 1
    # targeted: a count too large, counts that do not sum, a position past the chunk, a short last chunk
    p = payload.clone()
    c0 = body + lay.off_counts
    p[c0:c0 + 2] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)
    assert _emu_verdict(lib, p, BF16, n) == _reference_verdict(p, BF16, n)
    p = payload.clone()
    cnt = int(p[c0]) | (int(p[c0 + 1]) << 8)
    p[c0] = (cnt + 1) & 0xFF
    assert _emu_verdict(lib, p, BF16, n) == _reference_verdict(p, BF16, n)
    p = payload.clone()
    p[body + lay.off_pos:body + lay.off_pos + 2] = torch.tensor([0xFF, 0xFF], dtype=torch.uint8)
    assert _emu_verdict(lib, p, BF16, n) == _reference_verdict(p, BF16, n)
    counts = [int(p) for p in _u16s(payload, c0, lay.n_chunks)]
    ch = next(i for i, k in enumerate(counts) if k >= 3)  # duplicate / descending positions inside one chunk
    k0 = body + lay.off_pos + 2 * sum(counts[:ch])
    for a, b in ((0, 2), (2, 0)):
        p = payload.clone()
        p[k0 + 2 * b:k0 + 2 * b + 2] = payload[k0 + 2 * a:k0 + 2 * a + 2]
        msg = _emu_verdict(lib, p, BF16, n)
        assert msg == _reference_verdict(p, BF16, n) and "not strictly ascending" in msg, msg
    last = body + lay.off_counts + 2 * (lay.n_chunks - 1)  # last chunk holds n % 256 = 41 elements
    p = payload.clone()
    p[last:last + 2] = torch.tensor([42, 0], dtype=torch.uint8)
    assert _emu_verdict(lib, p, BF16, n) == _reference_verdict(p, BF16, n)
    # truncations, wrong destination, empty buffer
    for plen in (0, 10, 63, 64, 95, 96, payload.numel() - 1):
        assert _emu_verdict(lib, payload, BF16, n, payload_len=plen) == \
            _reference_verdict(payload[:plen], BF16, n)
    assert _emu_verdict(lib, payload, BF16, n - 1) == _reference_verdict(payload, BF16, n - 1)
    assert _emu_verdict(lib, payload, 2, n, torch_dtype=torch.float16) == _reference_verdict(payload, 2, n)
    assert _emu_verdict(lib, payload, BF16, n) is None
    assert cases >= 40


def test_corrupted_raw_payload(lib):
    n = 5000
    x = torch.randn(n).to(torch.float16)
    payload = reference.encode([x], 2, None, 12)
    for k in (0, 5, 13, 40, 64, 72, 95, 96, 100, HEADER_BYTES + 2 * n - 1):
        p = payload.clone()
        p[k] ^= 0x10
        assert _emu_verdict(lib, p, 2, n, torch_dtype=torch.float16) == _reference_verdict(p, 2, n)


def test_launcher_argument_checks(lib):
    x = kv_like(1000, seed=1)
    tb = Table([x])
    cap = encode_capacity(1000, 2)
    out = aligned_empty(cap + 32)
    wsb = lib.splitzip_cuda_encode_workspace_bytes(1000, BF16, 1, 0, 12)
    ws = aligned_empty(wsb + 16)
    cb = bytes(BOOK.exponents)
    args = (ctypes.byref(tb.s), BF16, cb, 16, 0, 12, 0)
    assert lib.splitzip_cuda_encode(*args, out.data_ptr() + 1, cap, ws.data_ptr(), wsb, None) == -2
    assert lib.splitzip_cuda_encode(*args, out.data_ptr(), cap - 1, ws.data_ptr(), wsb, None) == -3
    assert lib.splitzip_cuda_encode(*args, out.data_ptr(), cap, ws.data_ptr(), wsb - 1, None) == -4
    assert lib.splitzip_cuda_encode(ctypes.byref(tb.s), 9, cb, 16, 0, 12, 0, out.data_ptr(), cap, ws.data_ptr(),
                                    wsb, None) == -1
    assert lib.splitzip_cuda_encode(ctypes.byref(tb.s), BF16, bytes([1, 1]), 2, 0, 12, 0, out.data_ptr(), cap,
                                    ws.data_ptr(), wsb, None) == -1
    assert lib.splitzip_cuda_encode(ctypes.byref(tb.s), BF16, bytes(range(23)), 23, 1, 12, 0, out.data_ptr(), cap,
                                    ws.data_ptr(), wsb, None) == -1  # at most 22 exponents


TAGS = (1, 0x5A5A_0000_FFFF_1234, 2**63, 2**64 - 1)


@pytest.mark.parametrize("codebook", [BOOK, None], ids=["exp4", "raw"])
def test_transfer_tag(lib, codebook):
    """Encoders write the caller's tag byte-identically; decoders refuse another transfer's payload before
    writing anything, with the reference decoder's message (FORMAT.md §6a)."""
    n = 9001
    x = kv_like(n, seed=31, outliers=0.01)
    for tag in TAGS:
        payload = check_roundtrip(lib, [x], codebook, 12, tag=tag)  # same tag: byte-identical, decodes bitwise
        assert parse_header(payload[:HEADER_BYTES].numpy().tobytes()).transfer_tag == tag
        for expected in (0, tag ^ 1, tag ^ (1 << 63)):
            msg = _emu_verdict(lib, payload, BF16, n, tag=expected, untouched=True)
            assert msg == _reference_verdict(payload, BF16, n, expected)
            assert msg.startswith(f"payload belongs to another transfer: its transfer tag is 0x{tag:016x}, "
                                  f"expected 0x{expected:016x}"), msg
    check_roundtrip(lib, [x], codebook, 12, tag=0)  # tag 0 (unbound) round-trips
    # a header with a non-zero ext area is refused (also without any write)
    bad = torch.frombuffer(with_fields(reference.encode([x], BF16, codebook, 12), ext=bytes(23) + b"\x01"),
                           dtype=torch.uint8)
    msg = _emu_verdict(lib, bad, BF16, n, untouched=True)
    assert msg == _reference_verdict(bad, BF16, n) and "non-zero ext field" in msg


@pytest.mark.parametrize("codebook", [BOOK, None], ids=["exp4", "raw"])
def test_format_v1_payloads(lib, codebook):
    """A v1 payload (64-byte header, body at 64) decodes with tag 0 and is refused with any other tag."""
    n = 7777
    x = kv_like(n, seed=32, outliers=0.01)
    v1 = torch.frombuffer(to_v1(reference.encode([x], BF16, codebook, 8)), dtype=torch.uint8)
    assert v1[4] == 1
    dst = torch.empty_like(x)
    assert emu_decode(lib, v1, [dst], BF16) == (0, 0)
    assert torch.equal(dst.view(torch.int16), x.view(torch.int16))
    for expected in (1, 2**64 - 1):
        msg = _emu_verdict(lib, v1, BF16, n, tag=expected, untouched=True)
        assert msg == _reference_verdict(v1, BF16, n, expected)
        assert msg.startswith("format v1 payloads carry no transfer tag"), msg
    for plen in (63, 64, 65, v1.numel() - 1):  # truncated v1 payloads
        assert _emu_verdict(lib, v1, BF16, n, payload_len=plen) == _reference_verdict(v1[:plen], BF16, n)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 3), (16, 4, 2)])
def test_many_tiles_under_different_grids(lib, shape):
    # tens of encode / decode tiles; grids of 1 .. 64 persistent decode blocks on 1 .. 3 OS threads
    lib.sz_emu_configure(*shape)
    try:
        x = kv_like(150001, seed=sum(shape), outliers=0.004)
        for cl in (8, 13):
            check_roundtrip(lib, [x], BOOK, cl)
    finally:
        lib.sz_emu_configure(4, 2, 3)


def emu_encode_batch(so, items: list[list[torch.Tensor]], dtype, codebook, chunk_log2, tags) -> list[torch.Tensor]:
    """One batched launch for all items; returns the payloads (lengths from the device-written lens)."""
    tables = [Table(regions) for regions in items]
    outs, caps = [], []
    arr = (SzBatchItem * len(items))()
    for i, (tb, regions) in enumerate(zip(tables, items)):
        esize = regions[0].element_size() if regions else 2
        cap = encode_capacity(tb.s.n, esize)
        outs.append(aligned_empty(cap + 64, fill=0xA5))
        caps.append(cap)
        arr[i].src = tb.s
        arr[i].out = outs[-1].data_ptr()
        arr[i].out_capacity = cap
        arr[i].tag = tags[i]
    n_codes = codebook.n_codes if codebook else 0
    wsb = so.splitzip_cuda_encode_batch_plan(arr, len(items), dtype, n_codes, chunk_log2)
    assert wsb > 0
    ws = aligned_empty(wsb + 64, fill=0x5A)
    lens = torch.full((len(items),), -1, dtype=torch.int64)
    cb = bytes(codebook.exponents) if codebook else None
    rc = so.splitzip_cuda_encode_batch(arr, arr, len(items), dtype, cb, n_codes, chunk_log2, lens.data_ptr(),
                                       ws.data_ptr(), wsb, None)
    assert rc == 0, rc
    assert bool((ws[wsb:] == 0x5A).all()), "batched encode wrote past its workspace"
    got = []
    for out, cap, length in zip(outs, caps, lens.tolist()):
        assert bool((out[cap:] == 0xA5).all()), "batched encode wrote past encode_capacity"
        assert length == parse_header(out[:HEADER_BYTES].numpy().tobytes()).payload_bytes
        got.append(out[:length].clone())
    return got


@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_encode_batch_one_launch(lib, chunk_log2):
    """All layers of a request in one launch: every payload (EXP4, RAW fallback, too small, empty, multi-region)
    and its device-written length equal the reference encoder's, with each item's own tag."""
    items = [[kv_like(20000, seed=1, outliers=0.01)],
             [kv_like(5120, seed=i) for i in range(2, 6)],        # pages: tiles straddle regions
             [kv_like(9001, seed=7, outliers=0.6)],               # too many escapes: RAW fallback
             [kv_like(5, seed=8)],                                # too small to gain: RAW tiles
             [],                                                  # no elements
             [kv_like(70001, seed=9, outliers=0.003)]]
    tags = [0, 1, 2**64 - 1, 0x1234, 5, 2**63]
    got = emu_encode_batch(lib, items, BF16, BOOK, chunk_log2, tags)
    for regions, tag, payload in zip(items, tags, got):
        assert torch.equal(payload, reference.encode(regions, BF16, BOOK, chunk_log2, tag))
    raw = emu_encode_batch(lib, items[:2], BF16, None, chunk_log2, tags[:2])  # no codebook: RAW items only
    for regions, tag, payload in zip(items, tags, raw):
        assert torch.equal(payload, reference.encode(regions, BF16, None, chunk_log2, tag))


def test_encode_batch_rejects_unplanned_items(lib):
    x = kv_like(1000, seed=1)
    tb = Table([x])
    arr = (SzBatchItem * 1)()
    arr[0].src = tb.s
    out = aligned_empty(encode_capacity(1000, 2))
    arr[0].out, arr[0].out_capacity = out.data_ptr(), encode_capacity(1000, 2)
    ws = aligned_empty(1 << 16)
    lens = torch.zeros(1, dtype=torch.int64)
    args = (arr, arr, 1, BF16, bytes(BOOK.exponents), 16, 12, lens.data_ptr(), ws.data_ptr(), 1 << 16, None)
    assert lib.splitzip_cuda_encode_batch(*args) == -1  # plan fields not filled
    assert lib.splitzip_cuda_encode_batch_plan(arr, 1, BF16, 16, 12) > 0
    assert lib.splitzip_cuda_encode_batch(*args) == 0


def test_multi_region_capture_refused_in_python(monkeypatch):
    """cuda_backend refuses a host-built region table while the stream is being captured (no GPU needed)."""
    from splitzip_vllm.codec.backends import cuda_backend
    regions = [torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="CUDA-graph capture"):
        cuda_backend.refuse_host_table_in_capture(regions, "encode")
    cuda_backend.refuse_host_table_in_capture(regions[:1] + [torch.zeros(0)], "encode")  # one region: fine
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_backend.refuse_host_table_in_capture(regions, "encode")
