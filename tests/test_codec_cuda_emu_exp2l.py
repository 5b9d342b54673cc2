"""EXP2L (FORMAT.md §3a, mode 2) in the CUDA codec's kernel source, run on the CPU through csrc/cuda/emu/cuda_emu.h.

The kernels of csrc/cuda/splitzip_cuda_exp2l_{enc,dec}.cuh (built with splitzip_cuda.cu, as in
tests/test_codec_cuda_emu.py, whose helpers this module shares) must write payloads byte-identical to
``splitzip_vllm.codec.reference`` for two-level codebooks -- EXP2L, or EXP4 / RAW where FORMAT.md §5 says so --,
decode them back bit for bit, and report the reference decoder's error for every corrupted payload (FORMAT.md §6:
EXP2L's checks in their order, not by lowest code), never writing outside the destination. The CUDA EXP2L decoder
validates everything before writing, so a payload that fails a structural check leaves the destination untouched.
tests/test_codec_cuda.py runs the same kind of checks on a real GPU.
"""
from __future__ import annotations

import pytest
import torch

from _codec_util import all_bf16_patterns, channel_kv_bf16, header_fields, to_v1, top_codebook, with_fields
from splitzip_vllm.codec import reference
from splitzip_vllm.codec.codebook import Codebook
from splitzip_vllm.codec.format import HEADER_BYTES, Exp2lLayout, Exp4Layout, Status
import test_codec_cuda_emu
from test_codec_cuda_emu import BF16, _emu_verdict, _reference_verdict, _u16s, check_roundtrip, emu_decode, emu_encode

lib = test_codec_cuda_emu.lib  # the module-scoped fixture that builds the emulation library


def cb22(x: torch.Tensor, k: int = 22) -> Codebook:
    return top_codebook(x, k, two_level=True)


def mode_of(payload: torch.Tensor) -> int:
    return header_fields(payload[:HEADER_BYTES].numpy().tobytes())["mode"]


def roundtrip2(so, regions, codebook, chunk_log2, **kw) -> torch.Tensor:
    """check_roundtrip (byte identity with the reference, bitwise decode) for a two-level codebook."""
    assert codebook is None or codebook.two_level
    return check_roundtrip(so, regions, codebook, chunk_log2, **kw)


_PATTERNS = None


def patterns_with_filler() -> tuple[torch.Tensor, Codebook]:
    """All 65,536 BF16 patterns (every exponent: primary, secondary and escapes) plus KV-like data so EXP2L wins."""
    global _PATTERNS
    if _PATTERNS is None:
        pat = all_bf16_patterns()
        pat = pat[torch.randperm(pat.numel(), generator=torch.Generator().manual_seed(1))]
        kv = [channel_kv_bf16(200000, seed=s, outliers=0.0) for s in (3, 4)]
        x = torch.cat([kv[0], pat, kv[1]])
        _PATTERNS = (x, cb22(x))
    return _PATTERNS


# ---- byte identity and round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_all_bf16_patterns(lib, chunk_log2):
    x, cb = patterns_with_filler()
    p = roundtrip2(lib, [x], cb, chunk_log2)
    h = header_fields(p[:HEADER_BYTES].numpy().tobytes())
    assert h["mode"] == 2 and h["n_escapes"] >= 234 * 256 and h["code_bits"] == 3 and h["n_codes"] == 7
    pat = all_bf16_patterns()  # alone: EXP2L cannot win, the mode choice falls back like the reference
    roundtrip2(lib, [pat], cb, chunk_log2)
    roundtrip2(lib, [pat], Codebook((0, 255, 127, 126, 125, 124, 123, 122, 121), two_level=True), chunk_log2)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 63, 64, 65, 127, 129, 255, 256, 257, 1000, 2047, 2049, 4095, 4097,
                               8191, 8193, 12289, 30001, 70001])
def test_sizes(lib, n):
    x = channel_kv_bf16(n, seed=n, outliers=0.01)
    modes = set()
    for cl in (8, 12, 15):
        modes.add(mode_of(roundtrip2(lib, [x], cb22(x), cl)))
    if n >= 1000:
        assert modes == {2}


@pytest.mark.parametrize("rate", [0.0, 0.002, 0.05, 0.15, 0.4])
def test_escape_rates(lib, rate):
    x = channel_kv_bf16(40000, seed=7, outliers=rate)
    for cl in (8, 13):
        roundtrip2(lib, [x], cb22(x), cl)


def _lengths(x: torch.Tensor, cb: Codebook, cl: int) -> dict[str, int]:
    """Body lengths of FORMAT.md §5 for x (EXP4 with the first 16 exponents, EXP2L with 7 + 15)."""
    e = ((x.view(torch.int16).to(torch.int32) >> 7) & 0xFF)
    n, c = e.numel(), 1 << cl
    ex = list(cb.exponents)
    in4 = torch.zeros(256, dtype=torch.bool)
    in4[ex[:16]] = True
    prim, sec = torch.zeros(256, dtype=torch.bool), torch.zeros(256, dtype=torch.bool)
    prim[ex[:7]] = True
    sec[ex[7:22]] = True
    marked = ~prim[e]
    cnt = torch.bincount(torch.nonzero(marked).reshape(-1) // c, minlength=(n + c - 1) // c)
    m2 = int((marked & ~sec[e]).sum())
    return {"raw": 2 * n, "exp4": Exp4Layout.compute(n, cl, int((~in4[e]).sum())).body_bytes,
            "exp2l": Exp2lLayout.compute(n, cl, m2, int(((cnt + 1) // 2).sum())).body_bytes}


def _spread(n: int, exps: list[int], weights: list[float], seed: int) -> torch.Tensor:
    """bf16 data whose exponents follow `weights` over `exps` (random signs and mantissas)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)
    e = torch.tensor(exps, dtype=torch.int32)[idx]
    sm = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32)
    x = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    return x.to(torch.int16).view(torch.bfloat16)


def test_mode_choice_matches_reference(lib):
    """EXP2L, EXP4 and RAW each win somewhere; the CUDA encoder picks what the reference picks (FORMAT.md §5)."""
    exps = list(range(100, 130))
    seen = set()
    cases = [([1.0] * 7 + [0.05] * 15 + [0.001] * 8, 22),   # concentrated: EXP2L
             ([1.0] * 16 + [0.0] * 14, 22),                 # flat over 16: EXP4 (markers cost half a byte each)
             ([1.0] * 30, 22),                              # flat over 30: escapes, RAW
             ([1.0] * 7 + [0.3] * 9 + [0.0] * 14, 16),      # 16-entry codebook, both modes close
             ([1.0] * 4 + [0.01] * 26, 4),                  # 4 primary codes, no secondary table
             ([1.0] * 7 + [0.2] * 3 + [0.05] * 20, 8)]      # 7 + 1
    for i, (w, k) in enumerate(cases):
        for n in (700, 20000):
            x = _spread(n, exps, w, seed=10 * i + n)
            cb = Codebook(tuple(exps[:k]), two_level=True)
            for cl in (8, 12):
                p = roundtrip2(lib, [x], cb, cl)
                L = _lengths(x, cb, cl)
                want = 2 if L["exp2l"] < min(L["exp4"], L["raw"]) else 1 if L["exp4"] < L["raw"] else 0
                assert mode_of(p) == want
                seen.add(want)
    assert seen == {0, 1, 2}


def _tie_cases(kind: str, want: int, trials: int) -> list[tuple[torch.Tensor, int]]:
    """Data on which EXP2L's body equals EXP4's (kind "exp4": weights concentrated on the 16 EXP4 exponents) or
    RAW's (kind "raw": flat weights, many escapes), found by a seeded search over FORMAT.md's lengths."""
    exps = list(range(100, 124))
    cb = Codebook(tuple(exps[:22]), two_level=True)
    g = torch.Generator().manual_seed(5 if kind == "exp4" else 77)
    out = []
    for trial in range(trials):
        if kind == "exp4":
            n = int(torch.randint(200, 3000, (1,), generator=g))
            w = [1.0] * 7 + [float(torch.rand(1, generator=g)) * 1.5] * 9 + [0.002] * 8
        else:
            n = int(torch.randint(64, 900, (1,), generator=g))
            w = torch.rand(24, generator=g).tolist()
        x = _spread(n, exps, w, seed=trial)
        L = _lengths(x, cb, 8)
        if L["exp2l"] == L[kind] and L[kind] <= min(L["exp4"], L["raw"]):
            out.append((x, 1 if L["exp4"] < L["raw"] else 0))  # the simpler mode that wins
            if len(out) == want:
                break
    return out


@pytest.mark.parametrize("kind", ["exp4", "raw"])
def test_mode_ties_go_to_the_simpler_mode(lib, kind):
    """Data where EXP2L's body equals EXP4's or RAW's: the encoder must not pick EXP2L (FORMAT.md §5)."""
    cb = Codebook(tuple(range(100, 122)), two_level=True)
    cases = _tie_cases(kind, 3, 6000)
    assert cases
    for x, mode in cases:
        assert mode_of(roundtrip2(lib, [x], cb, 8)) == mode


def test_codebook_without_two_level_stays_exp4(lib):
    x = channel_kv_bf16(30000, seed=5, outliers=0.01)
    cb = top_codebook(x, 22, two_level=False)  # EXP4 view of 22 exponents: first 16
    p = check_roundtrip(lib, [x], cb, 12)
    assert mode_of(p) == 1 and torch.equal(p, reference.encode([x], BF16, cb.exp4(), 12))


def test_multi_region(lib):
    pages = [channel_kv_bf16(16 * 8 * 40, seed=i, outliers=0.005) for i in range(9)]  # tiles straddle pages
    cb = cb22(torch.cat(pages))
    for cl in (8, 12, 15):
        assert mode_of(roundtrip2(lib, pages, cb, cl)) == 2
    roundtrip2(lib, pages, cb, 12, force_prefix=True)
    big = channel_kv_bf16(60000, seed=11, outliers=0.02)
    cuts = [0, 1, 1, 9, 700, 701, 5000, 5003, 13000, 13000, 29999, 41000, 59990]
    regions = [big[a:b] for a, b in zip(cuts[:-1], cuts[1:])]  # odd sizes, empty ones, 2-byte aligned bases
    for cl in (8, 9, 12):
        assert mode_of(roundtrip2(lib, regions, cb22(big), cl)) == 2


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 3), (16, 4, 2)])
def test_many_tiles_under_different_grids(lib, shape):
    """Tens of tiles: both look-backs (secondary bytes, escapes) under different concurrency."""
    lib.sz_emu_configure(*shape)
    try:
        x = channel_kv_bf16(150001, seed=sum(shape), outliers=0.004)
        for cl in (8, 13, 15):
            assert mode_of(roundtrip2(lib, [x], cb22(x), cl)) == 2
    finally:
        lib.sz_emu_configure(4, 2, 3)


def test_decode_into_regions_keeps_canaries_and_tags(lib):
    x = channel_kv_bf16(30000, seed=2, outliers=0.01)
    payload = reference.encode([x], BF16, cb22(x), 12, tag=0xABCD)
    assert mode_of(payload) == 2
    buf = torch.full((40000,), 7.0, dtype=torch.bfloat16)
    cuts = [(5, 1005), (1100, 11100), (12001, 31001)]  # unaligned (offset 10 bytes) and aligned starts
    regions = [buf[a:b] for a, b in cuts]
    assert emu_decode(lib, payload, regions, BF16, tag=0xABCD) == (0, 0)
    assert torch.equal(torch.cat(regions).view(torch.int16), x.view(torch.int16))
    mask = torch.ones(40000, dtype=torch.bool)
    for a, b in cuts:
        mask[a:b] = False
    assert bool((buf[mask] == 7.0).all())
    for tag in (0, 0xABCC):  # another transfer: refused before any write, with the reference's message
        assert _emu_verdict(lib, payload, BF16, 30000, tag=tag, untouched=True) == \
            _reference_verdict(payload, BF16, 30000, tag)
    assert emu_encode(lib, [x], BF16, cb22(x), 12, tag=0xABCD).equal(payload)


# ---- corrupted payloads ------------------------------------------------------------------------------------------

N = 9001
CL = 8


def _good() -> tuple[torch.Tensor, Exp2lLayout, dict]:
    x = channel_kv_bf16(N, seed=21, outliers=0.02)
    p = reference.encode([x], BF16, cb22(x, 12), CL)  # 7 + 5: markers with secondary codes and escapes
    h = header_fields(p[:HEADER_BYTES].numpy().tobytes())
    sec_bytes = int.from_bytes(h["ext"][16:24], "little")
    assert h["mode"] == 2 and h["n_escapes"] > 50
    return p, Exp2lLayout.compute(N, CL, h["n_escapes"], sec_bytes), h


def _same(lib, p: torch.Tensor, untouched: bool | None = None, n: int = N) -> str | None:
    """The emulated decode's verdict equals the reference's; a failing structural check writes nothing."""
    want = _reference_verdict(p, BF16, n)
    if untouched is None:
        untouched = want is not None and "checksum" not in want
    got = _emu_verdict(lib, p, BF16, n, untouched=untouched)
    assert got == want
    return got


def test_good_payload_decodes(lib):
    p, _, _ = _good()
    assert _same(lib, p) is None


def test_random_corruption_per_section(lib):
    p0, lay, h = _good()
    b = HEADER_BYTES
    spans = {"header": (0, HEADER_BYTES), "sm": (b, b + N), "codes": (b + lay.off_codes, b + lay.off_scounts),
             "scounts": (b + lay.off_scounts, b + lay.off_sec), "sec": (b + lay.off_sec, b + lay.off_counts),
             "counts": (b + lay.off_counts, b + lay.off_pos), "pos": (b + lay.off_pos, b + lay.off_exp),
             "exp": (b + lay.off_exp, b + lay.body_bytes)}
    g = torch.Generator().manual_seed(99)
    codes = set()
    for name, (lo, hi) in spans.items():
        for _ in range(10):
            p = p0.clone()
            k = int(torch.randint(lo, hi, (1,), generator=g))
            p[k] ^= int(torch.randint(1, 256, (1,), generator=g))
            codes.add(_same(lib, p))
    assert len(codes) >= 5, codes


def test_header_errors(lib):
    p0, _, h = _good()
    raw = p0.numpy().tobytes()
    ext = bytearray(h["ext"])
    cases = []
    e = bytearray(ext)
    e[15] = 16
    cases.append(with_fields(raw, ext=bytes(e)))                   # n_sec_codes > 15
    e = bytearray(ext)
    e[16:24] = (N + 1).to_bytes(8, "little")
    cases.append(with_fields(raw, ext=bytes(e)))                   # sec_bytes > n
    e = bytearray(ext)
    e[16:24] = (int.from_bytes(ext[16:24], "little") + 16).to_bytes(8, "little")
    cases.append(with_fields(raw, ext=bytes(e)))                   # body length no longer matches
    e = bytearray(ext)
    e[14] = 99
    cases.append(with_fields(raw, ext=bytes(e)))                   # stray secondary entry
    cases.append(with_fields(raw, code_bits=4))
    cases.append(with_fields(raw, n_codes=8))
    cases.append(with_fields(raw, codebook=h["codebook"][:6] + bytes([h["codebook"][0]]) + bytes(9)))
    cases.append(to_v1(raw))                                        # EXP2L in a version-1 header
    for c in cases:
        msg = _same(lib, torch.frombuffer(bytearray(c), dtype=torch.uint8))
        assert msg is not None


def _set_u16(p: torch.Tensor, off: int, v: int) -> None:
    p[off] = v & 0xFF
    p[off + 1] = (v >> 8) & 0xFF


def test_count_table_errors(lib):
    p0, lay, _ = _good()
    b = HEADER_BYTES
    sc = b + lay.off_scounts
    cnt = _u16s(p0, sc, lay.n_chunks)
    ec = b + lay.off_counts
    esc = _u16s(p0, ec, lay.n_chunks)
    expect = []
    p = p0.clone()
    _set_u16(p, sc + 2 * 3, 257)                                  # (a) a count above the chunk length
    expect.append((p, Status.SEC_COUNT))
    p = p0.clone()
    _set_u16(p, sc + 2 * 5, cnt[5] + 2)                           # (a) one more byte needed
    expect.append((p, Status.SEC_BYTES))
    p = p0.clone()
    j = next(i for i, k in enumerate(cnt) if k % 2 == 1 and k < 255)
    _set_u16(p, sc + 2 * j, cnt[j] + 1)                           # same byte count: the markers disagree
    expect.append((p, Status.SEC_MARKERS))
    last = lay.n_chunks - 1                                       # last chunk: 9001 % 256 = 41 elements
    p = p0.clone()
    _set_u16(p, sc + 2 * last, 42)
    expect.append((p, Status.SEC_COUNT))
    p = p0.clone()
    _set_u16(p, ec + 2 * 7, esc[7] + 1)                           # (b) counts do not sum
    expect.append((p, Status.ESC_SUM))
    p = p0.clone()
    _set_u16(p, ec + 2 * 2, 300)
    expect.append((p, Status.ESC_SUM))                            # the sum is checked before the bound
    p = p0.clone()
    j = next(i for i, k in enumerate(esc) if k > 0)
    _set_u16(p, ec + 2 * j, 0)
    _set_u16(p, ec + 2 * last, esc[last] + esc[j])                # same sum, too many for the last chunk?
    expect.append((p, Status.ESC_COUNT if esc[last] + esc[j] > 41 else None))
    p = p0.clone()
    _set_u16(p, ec + 2 * 1, 257)                                  # same sum, one chunk above its length
    _set_u16(p, ec + 2 * 2, esc[1] + esc[2] - 257 if esc[1] + esc[2] >= 257 else 0)
    expect.append((p, None))
    p = p0.clone()
    _set_u16(p, sc + 2 * 3, 257)                                  # (a) before (b)
    _set_u16(p, ec + 2 * 7, esc[7] + 1)
    expect.append((p, Status.SEC_COUNT))
    for p, st in expect:
        msg = _same(lib, p)
        assert msg is not None and (st is None or reference_status(p) == st), (msg, st)


def reference_status(p: torch.Tensor):
    from splitzip_vllm.codec.format import PayloadError
    try:
        reference.decode(p, BF16, N)
    except PayloadError as e:
        return e.status
    return None


def _flip_marker(p: torch.Tensor, lay: Exp2lLayout, i: int, make: bool) -> None:
    """Set (make) or clear the marker code of element i (all three planes / plane 0 only)."""
    base = HEADER_BYTES + lay.off_codes + 24 * (i // 64)
    bit = i % 64
    for k in range(3) if make else range(1):
        byte = base + 8 * k + bit // 8
        if make:
            p[byte] |= 1 << (bit % 8)
        else:
            p[byte] &= ~(1 << (bit % 8)) & 0xFF


def _codes(p: torch.Tensor, lay: Exp2lLayout, i: int) -> int:
    base = HEADER_BYTES + lay.off_codes + 24 * (i // 64)
    return sum(((int(p[base + 8 * k + (i % 64) // 8]) >> (i % 8)) & 1) << k for k in range(3))


def _set_code(p: torch.Tensor, lay: Exp2lLayout, i: int, code: int) -> None:
    base = HEADER_BYTES + lay.off_codes + 24 * (i // 64)
    for k in range(3):
        byte = base + 8 * k + (i % 64) // 8
        p[byte] = (int(p[byte]) & ~(1 << (i % 8)) & 0xFF) | (((code >> k) & 1) << (i % 8))


def test_marker_count_and_position_order(lib):
    """(c) before (d) within a chunk, chunk by chunk: the reference's first failing chunk decides."""
    p0, lay, _ = _good()
    b = HEADER_BYTES
    esc = _u16s(p0, b + lay.off_counts, lay.n_chunks)
    first = [sum(esc[:c]) for c in range(lay.n_chunks)]
    ca, cb_ = [c for c in range(lay.n_chunks) if esc[c] >= 2][:2]

    def bad_marker(p, c):  # a non-marker element of chunk c becomes a marker
        i = next(i for i in range(c * 256, c * 256 + 256) if _codes(p, lay, i) != 7)
        _flip_marker(p, lay, i, True)

    def bad_pos(p, c):
        _set_u16(p, b + lay.off_pos + 2 * first[c], 0x1FF)

    for marker_chunk, pos_chunk, want in ((ca, cb_, Status.SEC_MARKERS), (cb_, ca, Status.ESC_POS),
                                          (ca, ca, Status.SEC_MARKERS)):
        p = p0.clone()
        bad_marker(p, marker_chunk)
        bad_pos(p, pos_chunk)
        msg = _same(lib, p)
        assert reference_status(p) == want, msg
    p = p0.clone()
    i = next(i for i in range(N) if _codes(p, lay, i) == 7)
    _flip_marker(p, lay, i, False)  # one marker fewer
    assert "marker codes of chunk" in _same(lib, p)
    p = p0.clone()  # codes past n are ignored (FORMAT.md §3a): a marker there changes nothing
    assert N % 64
    _flip_marker(p, lay, N, True)
    assert _same(lib, p) is None


def test_escape_order_errors(lib):
    p0, lay, _ = _good()
    b = HEADER_BYTES
    esc = _u16s(p0, b + lay.off_counts, lay.n_chunks)
    ch = next(i for i, k in enumerate(esc) if k >= 3)
    k0 = b + lay.off_pos + 2 * sum(esc[:ch])
    for a, c in ((0, 2), (2, 0), (0, 1)):
        p = p0.clone()
        p[k0 + 2 * c:k0 + 2 * c + 2] = p0[k0 + 2 * a:k0 + 2 * a + 2]
        msg = _same(lib, p)
        assert "not strictly ascending" in msg, msg
    p = p0.clone()  # order violation in an early chunk, position outside a later chunk: ESC_POS wins
    p[k0 + 2:k0 + 4] = p0[k0:k0 + 2]
    later = next(i for i, k in enumerate(esc) if k > 0 and i > ch + 3)
    _set_u16(p, b + lay.off_pos + 2 * sum(esc[:later]), 0x7FFF)
    assert "outside its chunk" in _same(lib, p)


@pytest.mark.parametrize("section", ["sm", "sec", "exp", "codes_swap"])
def test_checksum_detects(lib, section):
    p0, lay, _ = _good()
    b = HEADER_BYTES
    p = p0.clone()
    if section == "sm":
        p[b + 1234] ^= 0x21
    elif section == "sec":
        p[b + lay.off_sec + 3] ^= 0x11  # other secondary codes, same counts
    elif section == "exp":
        p[b + lay.off_exp + 5] ^= 0x40
    else:  # two primary codes (not the marker) exchanged inside chunk 0: every count still holds
        i = next(i for i in range(256) if _codes(p0, lay, i) != 7)
        j = next(j for j in range(256) if _codes(p0, lay, j) not in (7, _codes(p0, lay, i)))
        _set_code(p, lay, i, _codes(p0, lay, j))
        _set_code(p, lay, j, _codes(p0, lay, i))
    msg = _same(lib, p)
    assert msg is not None and "checksum" in msg


def test_truncation_and_destination(lib):
    p0, _, _ = _good()
    for plen in (0, 10, 63, 64, 95, 96, 200, p0.numel() - 1):
        assert _emu_verdict(lib, p0, BF16, N, payload_len=plen, untouched=True) == \
            _reference_verdict(p0[:plen], BF16, N)
    assert _emu_verdict(lib, p0, BF16, N - 1, untouched=True) == _reference_verdict(p0, BF16, N - 1)
    assert _emu_verdict(lib, p0, 2, N, torch_dtype=torch.float16, untouched=True) == _reference_verdict(p0, 2, N)


def test_fuzz_matches_reference(lib):
    """Random multi-byte corruptions anywhere: the same verdict as the reference, nothing written outside."""
    p0, lay, _ = _good()
    g = torch.Generator().manual_seed(2024)
    body_hi = HEADER_BYTES + lay.body_bytes
    seen = set()
    for it in range(120):
        p = p0.clone()
        for _ in range(1 + it % 3):
            k = int(torch.randint(HEADER_BYTES, body_hi, (1,), generator=g))
            p[k] = int(torch.randint(0, 256, (1,), generator=g))
        seen.add(_same(lib, p, untouched=False))
    assert len(seen) >= 4
