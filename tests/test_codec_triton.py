"""Triton backend: byte equality with the reference codec, decoding, and corrupted payloads.

Runs on a CPU-only machine through the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the environment
*before triton is imported*: ``triton.jit`` fixes compiled vs interpreted when a function is decorated, and
triton's own library (``tl.sum``...) is decorated when triton is imported. In a pytest session other test files
(or the backend registry) may import triton first, so this file is robust either way:

* ``TRITON_INTERPRET=1 pytest tests/test_codec_triton.py``: triton is imported interpreted, tests run in-process;
* any other session (``pytest tests/``): the in-process tests skip and ``test_run_under_interpreter`` runs this
  file in a child ``pytest`` with ``TRITON_INTERPRET=1`` set from the start, failing with the child's output.

Tile sizes do not change payload bytes; the tests run both the compiled-mode (GPU) tile sizes, where tiles are
smaller than chunks, and the interpreter's larger ones.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import sys

import pytest
import torch

from _codec_util import Canary, bits, run_under_interpreter, to_v1, top_codebook, with_fields
from splitzip_vllm.codec import Codebook, PayloadError, available_backends, decode, encode, get_backend
from splitzip_vllm.codec import reference
from splitzip_vllm.codec.backends import triton_backend as TB
from splitzip_vllm.codec.format import (HEADER_BYTES, MODE_EXP4, MODE_RAW, Exp4Layout, dtype_code, encode_capacity,
                                        parse_header)

BF16 = torch.bfloat16
FULL16 = Codebook(tuple(range(112, 128)), two_level=False)
FIVE = Codebook((0, 255, 127, 126, 1), two_level=False)


def _interpreter_ready() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1" or not TB.TritonBackend.is_available():
        return False
    return TB.TritonBackend.supports_device(torch.device("cpu"))  # imports triton now if nobody did


IN_PROCESS = _interpreter_ready()


@pytest.fixture(autouse=True)
def _only_under_interpreter(request):
    if request.function is not test_run_under_interpreter and not IN_PROCESS:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported; covered by test_run_under_interpreter")


def test_run_under_interpreter():
    if IN_PROCESS:
        pytest.skip("running in-process already")
    run_under_interpreter(__file__)


@pytest.fixture(params=["gpu_tiles", "interp_tiles"])
def tiles(request):
    old = TB.TILES
    TB.TILES = dict(TB.GPU_TILES) if request.param == "gpu_tiles" else dict(TB.INTERPRETER_TILES)
    yield request.param
    TB.TILES = old


@pytest.fixture
def gpu_tiles():
    old = TB.TILES
    TB.TILES = dict(TB.GPU_TILES)
    yield
    TB.TILES = old


# ---------------------------------------------------------------------------------------------------- helpers

def _be():
    return get_backend("triton", "cpu")


def kv_like(n: int, seed: int, outliers: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.05
    k = int(n * outliers)
    if k:
        x[torch.randint(0, n, (k,), generator=g)] = torch.randn(k, generator=g) * 500.0
        x[torch.randint(0, n, (max(1, k // 4),), generator=g)] = 0.0
    return x.to(BF16)


def with_filler(patterns: torch.Tensor, cb: Codebook, n_filler: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ex = torch.tensor(cb.exponents, dtype=torch.int32)[torch.randint(0, cb.n_codes, (n_filler,), generator=g)]
    sm = torch.randint(0, 256, (n_filler,), generator=g, dtype=torch.int32)
    filler = (((sm & 0x80) << 8) | (ex << 7) | (sm & 0x7F)).to(torch.int16).view(BF16)
    allx = torch.cat([patterns, filler])
    return allx[torch.randperm(allx.numel(), generator=g)]


def triton_encode(regions, cb, cl2: int, dtype=None) -> torch.Tensor:
    """Encode with the triton backend into an exact-capacity buffer followed by a canary; returns the payload."""
    dtype = dtype if dtype is not None else regions[0].dtype
    n = sum(r.numel() for r in regions)
    cap = encode_capacity(n, torch.empty(0, dtype=dtype).element_size())
    buf = torch.full((cap + 97,), 0xC3, dtype=torch.uint8)
    _be().encode_into(regions, dtype_code(dtype), cb, cl2, buf[:cap])
    assert bool((buf[cap:] == 0xC3).all()), "encoder wrote past encode_capacity"
    length = parse_header(buf[:HEADER_BYTES].numpy().tobytes()).payload_bytes
    assert length <= cap
    return buf[:length].clone()


def assert_same_payload(regions, cb, cl2: int, dtype=None) -> torch.Tensor:
    got = triton_encode(regions, cb, cl2, dtype)
    want = reference.encode(regions, dtype_code(dtype if dtype is not None else regions[0].dtype), cb, cl2)
    if not torch.equal(got, want):
        hg = parse_header(got[:HEADER_BYTES].numpy().tobytes())
        hw = parse_header(want[:HEADER_BYTES].numpy().tobytes())
        m = min(got.numel(), want.numel())
        diff = (got[:m] != want[:m]).nonzero().reshape(-1)[:8].tolist()
        raise AssertionError(f"payload differs: lengths {got.numel()} vs {want.numel()}, first differing bytes "
                             f"{diff}\ntriton    {hg}\nreference {hw}")
    return want


def decode_into_canary(payload: torch.Tensor, sizes, dtype=BF16) -> Canary:
    can = Canary(sizes, dtype)
    _be().decode_into(payload, can.regions, dtype_code(dtype))
    can.check()
    return can


def check_roundtrip(payload: torch.Tensor, x: torch.Tensor, sizes=None) -> None:
    sizes = sizes or [x.numel()]
    can = decode_into_canary(payload, sizes, x.dtype)
    assert torch.equal(bits(can.data()), bits(x))


def split_sizes(n: int, cuts) -> list[int]:
    cuts = sorted(min(max(c, 0), n) for c in cuts)
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def mode_of(p: torch.Tensor) -> int:
    return parse_header(p[:HEADER_BYTES].numpy().tobytes()).mode


# ---------------------------------------------------------------------------------------------------- tests

def test_backend_listed_under_interpreter():
    assert "triton" in available_backends("cpu")
    assert TB.TritonBackend.supports_device(torch.device("cpu"))
    assert not TB.TritonBackend.supports_device(torch.device("meta"))
    # automatic selection on CPU never picks the (slow) interpreter
    assert get_backend("auto", "cpu").name != "triton"


def test_cpu_needs_interpret_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not TB.TritonBackend.supports_device(torch.device("cpu"))
    assert "triton" not in available_backends("cpu")


@pytest.mark.parametrize("cb", [FULL16, FIVE], ids=["16codes", "5codes"])
def test_all_bf16_patterns_exp4(cb):
    # chunk_log2 15 with the interpreter tiles keeps this at 16 programs per kernel (the chunk_log2 12 and
    # GPU-tile paths are covered by the smaller tests below)
    cl2 = 15
    pats = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(BF16)
    x = with_filler(pats, cb, (1 << 19) - 65536, seed=cb.n_codes)
    ref = assert_same_payload([x], cb, cl2)
    h = parse_header(ref[:HEADER_BYTES].numpy().tobytes())
    assert h.mode == MODE_EXP4 and h.n_escapes == 65536 - 256 * cb.n_codes
    check_roundtrip(ref, x, split_sizes(x.numel(), [1, 123457, 300001]))


def test_all_bf16_patterns_raw_fallback(gpu_tiles):
    pats = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(BF16)
    for cb in (FULL16, None):  # FULL16: 61440 escapes, the device-side decision falls back to RAW
        ref = assert_same_payload([pats], cb, 12)
        assert mode_of(ref) == MODE_RAW
        check_roundtrip(ref, pats, [7, 65529])


SIZES = [0, 1, 2, 3, 15, 16, 17, 255, 256, 257, 511, 1000, 2047, 2049, 4097, 9000]


@pytest.mark.parametrize("cl2", [8, 12])
def test_sizes(cl2, gpu_tiles):
    for n in SIZES:
        if cl2 == 8 and n > 4097:
            continue
        x = kv_like(n, seed=n)
        cb = top_codebook(x, 12) if n else FIVE
        ref = assert_same_payload([x], cb, cl2)
        if n >= 1000:
            assert mode_of(ref) == MODE_EXP4, n
        check_roundtrip(ref, x)


def test_escape_threshold_exact(gpu_tiles):
    """The device-side EXP4/RAW decision flips exactly where FORMAT.md §5.1 says."""
    n, cl2 = 4096, 12
    m_max = max(m for m in range(n) if Exp4Layout.compute(n, cl2, m).body_bytes < 2 * n)
    for m, mode in ((m_max, MODE_EXP4), (m_max + 1, MODE_RAW)):
        x = torch.full((n,), 1.5, dtype=BF16)
        x[torch.randperm(n, generator=torch.Generator().manual_seed(m))[:m]] = 3.0
        ref = assert_same_payload([x], Codebook((127,), two_level=False), cl2)
        assert mode_of(ref) == mode
        check_roundtrip(ref, x)


def test_escape_layouts(tiles):
    # one chunk entirely escaped, the others clean
    x = torch.full((4096,), 1.5, dtype=BF16)
    x[768:1024] = 3.0
    ref = assert_same_payload([x], Codebook((127,), two_level=False), 8)
    assert mode_of(ref) == MODE_EXP4
    check_roundtrip(ref, x)
    # escape positions with a high byte (chunk_log2 15), chunks of several tiles, partial last chunk
    x = kv_like(40001, seed=3, outliers=0.02)
    ref = assert_same_payload([x], top_codebook(x, 10), 15)
    assert mode_of(ref) == MODE_EXP4 and parse_header(ref[:HEADER_BYTES].numpy().tobytes()).n_escapes > 800
    check_roundtrip(ref, x, [30000, 10001])
    # escapes only in the last element / first element
    x = torch.full((3001,), 1.5, dtype=BF16)
    x[0] = -7.0
    x[-1] = 1e-30
    ref = assert_same_payload([x], Codebook((127, 3), two_level=False), 8)
    check_roundtrip(ref, x)


LAYOUTS = {
    "uneven": [3, 0, 1, 300, 257, 1000, 0, 2500],
    "tiny": [1] * 37 + [2] * 11,
    "blocks_aligned": [1024] * 6,            # KV-block-like: 16-byte aligned equal regions
    "blocks_small": [640] * 9,               # regions smaller than a chunk
    "one_plus_empties": [0, 5000, 0],
}
MULTI_CASES = [("uneven", 8, "gpu"), ("uneven", 12, "interp"), ("tiny", 8, "gpu"), ("blocks_aligned", 12, "gpu"),
               ("blocks_aligned", 10, "interp"), ("blocks_small", 12, "gpu"), ("one_plus_empties", 10, "interp")]


@pytest.mark.parametrize("layout,cl2,tile_kind", MULTI_CASES)
def test_multi_region(layout, cl2, tile_kind, monkeypatch):
    monkeypatch.setattr(TB, "TILES", dict(TB.GPU_TILES if tile_kind == "gpu" else TB.INTERPRETER_TILES))
    sizes = LAYOUTS[layout]
    full = kv_like(sum(sizes), seed=len(sizes) + cl2)
    cb = top_codebook(full, 13)
    # sources are views at odd offsets of one buffer (unaligned) or separate tensors (aligned)
    if layout == "uneven":
        host = torch.cat([torch.zeros(1, dtype=BF16), full])
        regions = list(torch.split(host[1:], sizes))
    else:
        regions = [t.clone() for t in torch.split(full, sizes)]
    ref = assert_same_payload(regions, cb, cl2)
    assert torch.equal(ref, reference.encode([full], 1, cb, cl2))
    n = full.numel()
    check_roundtrip(ref, full, split_sizes(n, [n // 3, n // 3 + 1, n - 5]))
    check_roundtrip(ref, full, sizes)


RAW_DTYPES = [torch.uint8, torch.float16, torch.float32] + [
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


@pytest.mark.parametrize("dtype", RAW_DTYPES + [BF16], ids=str)
def test_raw_payloads(dtype, gpu_tiles):
    g = torch.Generator().manual_seed(5)
    for n in (1, 1001, 9001):
        size = torch.empty(0, dtype=dtype).element_size()
        x = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.int32).to(torch.uint8).view(dtype)
        cbs = (None,) if dtype == BF16 else (None, FULL16)
        for cb in cbs:
            ref = assert_same_payload([x], cb, 12)
            assert mode_of(ref) == MODE_RAW
            parts = list(torch.split(x, split_sizes(n, [n // 2, n // 2 + 1])))
            assert torch.equal(assert_same_payload(parts, cb, 12), ref)
            check_roundtrip(ref, x, split_sizes(n, [1, n // 2]))
    # bfloat16 too small to gain from EXP4 takes the RAW path with a codebook
    x = kv_like(5, seed=1)
    assert mode_of(assert_same_payload([x], FULL16, 8)) == MODE_RAW


def test_public_api_roundtrip():
    x = kv_like(6000, seed=9).reshape(60, 100)
    cb = top_codebook(x)
    p = encode(x, cb, chunk_log2=9, backend="triton")
    assert torch.equal(p, reference.encode([x], 1, cb, 9))
    y = decode(p, backend="triton")
    assert torch.equal(bits(y), bits(x))
    out = torch.empty(100, 60, dtype=BF16).t()  # non-contiguous destination, staged by the API
    decode(p, out, backend="triton")
    assert torch.equal(bits(out.contiguous()), bits(x))


# ---------------------------------------------------------------------------------------------------- corruption

N_C, CL_C = 3000, 8            # 12 chunks, the last one partial (184 elements)
_XC = kv_like(N_C, seed=7, outliers=0.03)
_CBC = top_codebook(_XC, 6)     # about 230 escapes, every chunk has some
_GOOD = reference.encode([_XC], 1, _CBC, CL_C)
_HDR = parse_header(_GOOD[:HEADER_BYTES].numpy().tobytes())
_LAY = Exp4Layout.compute(N_C, CL_C, _HDR.n_escapes)
_RAWP = reference.encode([_XC], 1, None, CL_C)


def _counts(p: bytes) -> list[int]:
    return list(struct.unpack_from(f"<{_LAY.n_chunks}H", p, HEADER_BYTES + _LAY.off_counts))


def _patched(base: torch.Tensor, off: int, data: bytes) -> torch.Tensor:
    b = bytearray(base.numpy().tobytes())
    b[off:off + len(data)] = data
    return torch.frombuffer(b, dtype=torch.uint8)


def _resealed(base: torch.Tensor, **fields) -> torch.Tensor:
    h = dataclasses.replace(parse_header(base[:HEADER_BYTES].numpy().tobytes()), **fields)
    b = bytearray(base.numpy().tobytes())
    b[:HEADER_BYTES] = h.pack()
    return torch.frombuffer(b, dtype=torch.uint8)


def _case(kind: str) -> tuple[torch.Tensor, str, bool]:
    """(payload, message pattern, whether the decoder must not write at all)"""
    good = _GOOD.numpy().tobytes()
    counts = _counts(good)
    assert _HDR.mode == MODE_EXP4 and _HDR.n_escapes > 185 and all(c > 1 for c in counts)
    hb = HEADER_BYTES
    pos0 = hb + _LAY.off_pos
    if kind == "sm":
        return _patched(_GOOD, hb + 1234, bytes([good[hb + 1234] ^ 0x04])), "checksum mismatch", False
    if kind == "code":
        o = HEADER_BYTES + _LAY.off_codes + 77
        return _patched(_GOOD, o, bytes([good[o] ^ 0x30])), "checksum mismatch", False
    if kind == "esc_exp":
        o = HEADER_BYTES + _LAY.off_exp + 5
        return _patched(_GOOD, o, bytes([good[o] ^ 0x01])), "checksum mismatch", False
    if kind == "esc_pos_moved":   # still ascending, inside the chunk
        p0, p1 = struct.unpack_from("<HH", good, pos0)
        assert p1 > p0 + 1 or p0 > 0
        newp = p0 + 1 if p1 > p0 + 1 else p0 - 1
        return _patched(_GOOD, pos0, struct.pack("<H", newp)), "checksum mismatch", False
    if kind == "raw_body":
        return _patched(_RAWP, hb + 4321, bytes([_RAWP[hb + 4321].item() ^ 0x80])), "checksum mismatch", False
    if kind == "checksum_field":
        return _resealed(_GOOD, checksum_b=_HDR.checksum_b ^ 1), "checksum mismatch", False
    if kind == "count_sum":
        c = counts[:]
        c[2] += 1
        return (_patched(_GOOD, HEADER_BYTES + _LAY.off_counts, struct.pack(f"<{len(c)}H", *c)),
                f"chunk counts sum to {_HDR.n_escapes + 1}, header says {_HDR.n_escapes}", True)
    if kind == "count_huge":
        return (_patched(_GOOD, hb + _LAY.off_counts + 2 * 4, struct.pack("<H", 0xFFFF)), "chunk counts sum to",
                True)
    if kind == "count_exceeds_chunk":   # sum kept: the last (184-element) chunk claims 185
        c = [0] * _LAY.n_chunks
        c[-1] = 185
        rest = _HDR.n_escapes - 185
        assert rest >= 0
        c[0] = min(rest, 256)
        c[1] = rest - c[0]
        assert c[1] <= 256
        return (_patched(_GOOD, HEADER_BYTES + _LAY.off_counts, struct.pack(f"<{len(c)}H", *c)),
                "a chunk claims more escapes than elements", True)
    if kind == "pos_outside_last":
        k = sum(counts[:-1])
        return (_patched(_GOOD, pos0 + 2 * k, struct.pack("<H", 184)), "escape position lies outside its chunk",
                True)
    if kind == "pos_huge":
        return _patched(_GOOD, pos0 + 2 * 3, struct.pack("<H", 0xFFFF)), "outside its chunk", True
    if kind == "pos_not_ascending":
        p0, p1 = struct.unpack_from("<HH", good, pos0)
        return _patched(_GOOD, pos0, struct.pack("<HH", p1, p0)), "not strictly ascending", True
    if kind == "pos_duplicate":
        p0, _ = struct.unpack_from("<HH", good, pos0)
        return _patched(_GOOD, pos0, struct.pack("<HH", p0, p0)), "not strictly ascending", True
    if kind == "truncated":
        return _GOOD[:-1].clone(), "payload truncated", True
    if kind == "header_crc":
        b = bytearray(good)
        b[33] ^= 1
        return torch.frombuffer(b, dtype=torch.uint8), "header CRC", True
    if kind == "body_len":
        return _resealed(_GOOD, body_bytes=_HDR.body_bytes + 16), "body length does not match", True
    if kind == "version":
        return torch.frombuffer(with_fields(good, version=3), dtype=torch.uint8), "format version 3", True
    if kind == "short_v2_header":
        return _GOOD[:80].clone(), "payload truncated: 80 bytes, the header alone needs 96", True
    if kind == "ext":
        return torch.frombuffer(with_fields(good, ext=bytes(5) + b"\x02" + bytes(18)), dtype=torch.uint8), \
            "non-zero ext field", True
    if kind == "tag":
        return (_resealed(_GOOD, transfer_tag=0xABCD), "payload belongs to another transfer: its transfer tag is "
                "0x000000000000abcd, expected 0x0000000000000000", True)
    raise KeyError(kind)


CORRUPTIONS = ["sm", "code", "esc_exp", "esc_pos_moved", "raw_body", "checksum_field", "count_sum", "count_huge",
               "count_exceeds_chunk", "pos_outside_last", "pos_huge", "pos_not_ascending", "pos_duplicate",
               "truncated", "header_crc", "body_len", "version", "short_v2_header", "ext", "tag"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_payloads(kind, gpu_tiles):
    payload, match, no_write = _case(kind)
    for sizes in ([1000, 0, 1, 1999],) if no_write else ([N_C], [1000, 0, 1, 1999]):
        can = Canary(sizes, BF16)
        with pytest.raises(PayloadError, match=match):
            _be().decode_into(payload, can.regions, 1)
        can.check()
        if no_write:
            assert can.untouched(), "decoder wrote although validation failed before decoding"


def test_destination_mismatch():
    with pytest.raises(PayloadError, match=f"payload holds {N_C} elements but the destination has {N_C - 1}"):
        decode_into_canary(_GOOD, [N_C - 1])
    with pytest.raises(PayloadError, match="payload holds dtype code 1 but the destination has dtype code 2"):
        decode_into_canary(_GOOD, [N_C], torch.float16)


def test_good_payloads_still_decode():
    for p in (_GOOD, _RAWP, torch.cat([_GOOD, torch.full((33,), 0x99, dtype=torch.uint8)])):
        check_roundtrip(p, _XC, [10, 2990])


# ---------------------------------------------------------------------------------------------------- transfer tags

TAGS = (1, 0x0123_4567_89AB_CDEF, 2**63, 2**64 - 1)


@pytest.mark.parametrize("cb", [FULL16, None], ids=["exp4", "raw"])
def test_transfer_tag(cb, gpu_tiles):
    """FORMAT.md §6a: the tag is written byte-identically to the reference; a payload of another transfer is
    refused before any write; the same tag (and 0) decodes bitwise."""
    x = kv_like(6000, seed=23)
    for tag in TAGS + (0,):
        got = torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8)
        _be().encode_into([x[:2500], x[2500:]], 1, cb, 9, got, tag)
        want = reference.encode([x], 1, cb, 9, tag)
        assert torch.equal(got[:want.numel()], want), f"tag {tag:#x}"
        assert parse_header(want[:HEADER_BYTES].numpy().tobytes()).transfer_tag == tag
        can = Canary([3000, 3000], BF16)
        _be().decode_into(want, can.regions, 1, tag)
        assert torch.equal(bits(can.data()), bits(x))
        for expected in {0, tag ^ 1, tag ^ (1 << 63)} - {tag}:
            can = Canary([3000, 3000], BF16)
            with pytest.raises(PayloadError, match=f"its transfer tag is 0x{tag:016x}, expected 0x{expected:016x}"):
                _be().decode_into(want, can.regions, 1, expected)
            assert can.untouched(), "a refused decode wrote"


@pytest.mark.parametrize("cb", [FULL16, None], ids=["exp4", "raw"])
def test_format_v1_payloads(cb, gpu_tiles):
    """A v1 payload (64-byte header, body at 64) decodes with tag 0 and is refused with any other tag."""
    x = kv_like(5000, seed=24)
    v1 = torch.frombuffer(to_v1(reference.encode([x], 1, cb, 8)), dtype=torch.uint8)
    assert v1[4] == 1
    check_roundtrip(v1, x, [1234, 3766])
    can = Canary([5000], BF16)
    with pytest.raises(PayloadError, match="format v1 payloads carry no transfer tag .* expects transfer tag "
                                           "0x0000000000000005"):
        _be().decode_into(v1, can.regions, 1, 5)
    assert can.untouched()


# ---------------------------------------------------------------------------------------------------- import guard

def test_module_imports_without_triton(monkeypatch):
    """The backend module imports (and reports itself unavailable) when ``import triton`` fails."""
    import importlib.util

    from splitzip_vllm.codec.backends import _REGISTRY
    monkeypatch.setitem(sys.modules, "triton", None)           # import triton -> ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setitem(_REGISTRY, "triton", TB.TritonBackend)  # restored after the probe re-registers
    monkeypatch.setattr(TB, "_triton_ok", None)
    assert not TB.TritonBackend.is_available()
    assert "triton" not in available_backends("cpu")
    # a fresh copy of the module, imported while triton is unimportable
    spec = importlib.util.spec_from_file_location("splitzip_vllm.codec.backends._triton_probe", TB.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.TritonBackend.name == "triton" and not probe.TritonBackend.is_available()
