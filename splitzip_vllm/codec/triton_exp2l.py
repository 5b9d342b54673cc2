"""Triton kernels of the EXP2L mode (FORMAT.md §3a: two-level exponent code), encode and decode.

Imported lazily by :mod:`splitzip_vllm.codec.backends.triton_backend` next to :mod:`.triton_kernels`, whose region
helpers, header sealing, checksum terms and escape patching these kernels share (so both modules are compiled or
interpreted alike).

Work is split into *tiles* (``TILE`` elements per program, a multiple of 64) and counted per *unit*
(``UNIT = min(TILE, 2^chunk_log2)`` elements): a unit never straddles a chunk and a tile holds ``TILE // UNIT``
whole units, so per-unit counts and their prefix sums give both a tile's global ranks and a chunk's totals, for
tiles smaller than chunks (GPU) and tiles holding many chunks (the interpreter) alike.

Encode (no host sync): ``exp2l_encode_count`` counts per unit the markers (primary code 7), EXP2L escapes and
EXP4 escapes, and writes per-tile checksum terms; ``torch.cumsum`` over units; ``exp2l_encode_plan`` (one
program) scans the chunks (marker count, escape count, first ``sec`` byte of each chunk), computes the EXP2L and
EXP4 lengths and makes the FORMAT.md §5 choice into ``meta``; the EXP4 kernels run with ``skip = meta[0]``;
``exp2l_encode_write`` (EXP2L only) writes sm, bit planes, escapes and each marker's secondary code into a
scratch array at its global marker index; ``exp2l_encode_finish`` packs each chunk's codes two per byte (a byte
can take codes from two tiles, so packing waits for all of them), writes the count tables, header and zero gaps.

Decode (header validated on the host, so the layout is known there): ``exp2l_decode_count`` counts markers per
unit from the planes; ``exp2l_decode_plan`` (one program) scans the chunks: count-table checks of FORMAT.md §6
step 4 (a) and (c), each chunk's first ``sec`` byte and marker index, escape prefix sums for
``exp4_validate_kernel`` (step 4 (b), (d)); ``exp2l_decode_dense`` writes every element (rank of a marker in its
chunk = global marker index - the chunk's first one) and ``exp2l_decode_patch`` the escapes, both only when
everything validated, and both add their checksum terms.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import (HEADER_BYTES, LUT_ESCAPE, _bf16_of, _bf16_sums, _gather, _header_base, _load_u16,
                             _patch_escapes, _put, _scatter, _seal_header, _tile)

_NOSPEC = ["R", "n", "hb", "n_units", "upc", "n_chunks", "chunk_log2", "off_codes", "off_scounts", "off_sec",
           "off_counts", "off_pos", "off_pos4", "n_esc", "n_codes", "sec_bytes", "tag"]
# meta (int64) written by exp2l_encode_plan: EXP2L chosen (0/1), then the EXP2L section numbers
META_SLOTS = 8
(META_TWO, META_SEC_BYTES, META_N_ESC, META_OFF_COUNTS, META_OFF_POS, META_OFF_EXP,
 META_BODY) = (tl.constexpr(i) for i in range(7))
META_LEN = tl.constexpr(META_SLOTS)
# int64 per-chunk records: encode (first marker index, markers, escapes, first sec byte); decode (first marker
# index, first sec byte)
ENC_SLOTS, DEC_SLOTS = 4, 2
ENC_CHUNK = tl.constexpr(ENC_SLOTS)
DEC_CHUNK = tl.constexpr(DEC_SLOTS)


def _jit(fn):
    names = [a for a in _NOSPEC if a in fn.__code__.co_varnames[:fn.__code__.co_argcount]]
    return triton.jit(fn, do_not_specialize=names)


@triton.jit
def _a16(x):
    return (x + 15) // 16 * 16


@triton.jit
def _store_u16(ptr, v, mask):
    tl.store(ptr, (v & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, ((v >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _unit_sums(flags, TILE: tl.constexpr, UNIT: tl.constexpr):
    """Per-unit sums of a tile's int32 lane values (TILE // UNIT of them)."""
    return tl.sum(tl.reshape(flags, [TILE // UNIT, UNIT]), 1)


@triton.jit
def _before(incl, t, col, W: tl.constexpr, TILE: tl.constexpr, UNIT: tl.constexpr):
    """Column ``col`` of the inclusive per-unit prefix ``incl`` (W columns) before tile ``t``'s first unit."""
    prev = tl.maximum(t * (TILE // UNIT) - 1, 0)
    return tl.where(t > 0, tl.load(incl + W * prev + col), 0)


# --------------------------------------------------------------------------------------------- encode

@_jit
def exp2l_encode_count(x0, ptrs, starts, R, n, lut, cnt, ck, MULTI: tl.constexpr, ALIGN: tl.constexpr,
                       TILE: tl.constexpr, UNIT: tl.constexpr):
    """Per unit: markers, EXP2L escapes, EXP4 escapes (cnt, int32 [units, 3]); per tile: checksum terms.

    ``lut[e]`` = primary code (bits 0..2, 7 = marker) | secondary code << 3 (15 = escape), plus LUT_ESCAPE when
    EXP4 escapes ``e``."""
    t, lo, hi, idx, valid = _tile(n, TILE)
    x = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.int16, MULTI, ALIGN)
    x = x.to(tl.int32) & 0xFFFF
    c = tl.load(lut + ((x >> 7) & 0xFF))
    mark = valid & ((c & 7) == 7)
    u = t * (TILE // UNIT) + tl.arange(0, TILE // UNIT)
    um = u.to(tl.int64) * UNIT < n
    tl.store(cnt + 3 * u, _unit_sums(mark.to(tl.int32), TILE, UNIT), mask=um)
    tl.store(cnt + 3 * u + 1, _unit_sums((mark & (((c >> 3) & 15) == 15)).to(tl.int32), TILE, UNIT), mask=um)
    tl.store(cnt + 3 * u + 2, _unit_sums((valid & ((c & LUT_ESCAPE) != 0)).to(tl.int32), TILE, UNIT), mask=um)
    ck_a, ck_b = _bf16_sums(x, idx)
    tl.store(ck + 2 * t, ck_a)
    tl.store(ck + 2 * t + 1, ck_b)


@_jit
def exp2l_encode_plan(incl, chunks, meta, n, n_units, upc, n_chunks, off_sec, off_pos4, CB: tl.constexpr):
    """One program: per chunk (first marker index, markers, escapes, first sec byte), then the FORMAT.md §5
    choice. ``incl``: inclusive prefix over units of exp2l_encode_count's columns; ``off_pos4``: EXP4's off_pos."""
    n64 = n.to(tl.int64)
    sec = n64 * 0
    for c0 in range(0, n_chunks, CB):
        c = c0 + tl.arange(0, CB).to(tl.int64)
        m = c < n_chunks
        prev = tl.maximum(c * upc - 1, 0)
        pm = m & (c > 0)
        last = tl.minimum(c * upc + upc, n_units) - 1
        f_mark = tl.load(incl + 3 * prev, mask=pm, other=0)
        cnt = tl.load(incl + 3 * last, mask=m, other=0) - f_mark
        esc = tl.load(incl + 3 * last + 1, mask=m, other=0) - tl.load(incl + 3 * prev + 1, mask=pm, other=0)
        half = (cnt + 1) // 2
        tl.store(chunks + ENC_CHUNK * c, f_mark, mask=m)
        tl.store(chunks + ENC_CHUNK * c + 1, cnt, mask=m)
        tl.store(chunks + ENC_CHUNK * c + 2, esc, mask=m)
        tl.store(chunks + ENC_CHUNK * c + 3, sec + tl.cumsum(half, 0) - half, mask=m)
        sec += tl.sum(half, 0)
    m2 = tl.load(incl + 3 * (n_units - 1) + 1)
    m4 = tl.load(incl + 3 * (n_units - 1) + 2)
    body4 = _a16(off_pos4 + 2 * m4) + m4
    off_counts = _a16(off_sec + sec)
    off_pos = _a16(off_counts + 2 * n_chunks)
    off_exp = _a16(off_pos + 2 * m2)
    body = off_exp + m2
    two = (body < body4) & (body < 2 * n64)   # strictly smaller than both: ties go to the simpler mode
    k = tl.arange(0, META_LEN)
    v = tl.where(k == META_TWO, two.to(tl.int64), 0)
    v = tl.where(k == META_SEC_BYTES, sec, v)
    v = tl.where(k == META_N_ESC, m2, v)
    v = tl.where(k == META_OFF_COUNTS, off_counts, v)
    v = tl.where(k == META_OFF_POS, off_pos, v)
    v = tl.where(k == META_OFF_EXP, off_exp, v)
    v = tl.where(k == META_BODY, body, v)
    tl.store(meta + k, v)


@triton.jit
def _store_planes(codes, p, lo, n, TILE: tl.constexpr):
    """The 3 bit planes of a tile's codes ``p`` (0 past n): byte b of plane k of block g at codes + 24g + 8k + b.
    Bits of different lanes never overlap, so a sum of shifted bits is their OR."""
    q = lo // 8 + tl.arange(0, TILE // 8)          # index of a group of 8 elements = (block, byte)
    qm = q < (n + 63) // 64 * 8                    # the last block is written whole (zero codes past n)
    sh = tl.arange(0, 8)[None, :]
    for k in tl.static_range(3):
        bits = tl.reshape((p >> k) & 1, [TILE // 8, 8])
        tl.store(codes + 24 * (q // 8) + 8 * k + (q % 8), tl.sum(bits << sh, 1).to(tl.uint8), mask=qm)


@_jit
def exp2l_encode_write(x0, ptrs, starts, R, n, out, lut, incl, meta, scratch, chunk_log2, off_codes,
                       MULTI: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr, UNIT: tl.constexpr):
    """Per tile, when EXP2L was chosen: sm bytes, bit planes, escapes (global index from ``incl``) and each
    marker's secondary code into ``scratch`` at its global marker index."""
    if tl.load(meta + META_TWO) != 0:
        t, lo, hi, idx, valid = _tile(n, TILE)
        x = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.int16, MULTI, ALIGN)
        x = x.to(tl.int32) & 0xFFFF
        e = (x >> 7) & 0xFF
        c = tl.load(lut + e)
        p = tl.where(valid, c & 7, 0)
        s = (c >> 3) & 15
        mark = p == 7
        esc = mark & (s == 15)
        body = out + HEADER_BYTES
        tl.store(body + idx, (((x >> 8) & 0x80) | (x & 0x7F)).to(tl.uint8), mask=valid)
        _store_planes(body + off_codes, p, lo, n.to(tl.int64), TILE)
        g = _before(incl, t, 0, 3, TILE, UNIT) + tl.cumsum(mark.to(tl.int32), 0) - 1
        tl.store(scratch + g, s.to(tl.uint8), mask=mark)
        k = _before(incl, t, 1, 3, TILE, UNIT) + tl.cumsum(esc.to(tl.int32), 0) - 1
        _store_u16(body + tl.load(meta + META_OFF_POS) + 2 * k, idx & ((1 << chunk_log2) - 1), esc)
        tl.store(body + tl.load(meta + META_OFF_EXP) + k, e.to(tl.uint8), mask=esc)


@triton.jit
def _write_header_2l(out, dtab, lut, n_codes, chunk_log2, n, n_esc, body, ck_a, ck_b, tag, sec_bytes):
    """The EXP2L header: mode 2, code_bits 3, primary table (lut[256:272]), ext = secondary table, its size
    (lut[272:288]) and sec_bytes."""
    k = tl.arange(0, 128).to(tl.int64)
    v = _header_base(k, 1, n, n_esc, body, ck_a, ck_b, tag)
    v = tl.where(k == 6, 2, v)
    v = tl.where(k == 7, 3, v)
    v = tl.where(k == 8, n_codes, v)
    v = tl.where(k == 9, chunk_log2, v)
    cbm = (k >= 16) & (k < 32)
    v = tl.where(cbm, tl.load(lut + 256 + (k - 16), mask=cbm, other=0).to(tl.int64), v)
    exm = (k >= 72) & (k < 88)
    v = tl.where(exm, tl.load(lut + 272 + (k - 72), mask=exm, other=0).to(tl.int64), v)
    v = _put(v, k, 88, 8, sec_bytes)
    _seal_header(out, dtab, k, v)


@triton.jit
def _zero_gap(body, start, end):
    g = start + tl.arange(0, 16).to(tl.int64)
    tl.store(body + g, tl.zeros([16], tl.uint8), mask=g < end)


@_jit
def exp2l_encode_finish(out, lut, dtab, chunks, meta, scratch, sums, n, n_chunks, chunk_log2, n_codes, off_codes,
                        off_scounts, off_sec, tag, CPP: tl.constexpr, SB: tl.constexpr):
    """Per CPP chunks, when EXP2L was chosen: sec_counts and escape chunk counts, and the chunk's secondary
    codes packed two per byte (first in the low nibble) from ``scratch``. Program 0: header and zero gaps."""
    if tl.load(meta + META_TWO) != 0:
        body = out + HEADER_BYTES
        off_counts = tl.load(meta + META_OFF_COUNTS)
        c0 = tl.program_id(0).to(tl.int64) * CPP
        cs = c0 + tl.arange(0, CPP)
        cm = cs < n_chunks
        _store_u16(body + off_scounts + 2 * cs, tl.load(chunks + ENC_CHUNK * cs + 1, mask=cm, other=0), cm)
        _store_u16(body + off_counts + 2 * cs, tl.load(chunks + ENC_CHUNK * cs + 2, mask=cm, other=0), cm)
        for c in range(c0, tl.minimum(c0 + CPP, n_chunks)):
            first = tl.load(chunks + ENC_CHUNK * c)
            cnt = tl.load(chunks + ENC_CHUNK * c + 1)
            dst = body + off_sec + tl.load(chunks + ENC_CHUNK * c + 3)
            for j0 in range(0, (cnt + 1) // 2, SB):
                j = j0 + tl.arange(0, SB)
                jm = j < (cnt + 1) // 2
                lo_n = tl.load(scratch + first + 2 * j, mask=jm, other=0)
                hi_n = tl.load(scratch + first + 2 * j + 1, mask=jm & (2 * j + 1 < cnt), other=0)
                tl.store(dst + j, lo_n | (hi_n << 4), mask=jm)
        if c0 == 0:
            n64 = n.to(tl.int64)
            sec_bytes = tl.load(meta + META_SEC_BYTES)
            n_esc = tl.load(meta + META_N_ESC)
            off_pos = tl.load(meta + META_OFF_POS)
            off_exp = tl.load(meta + META_OFF_EXP)
            M32 = tl.full([], 4294967295, tl.int64)
            _write_header_2l(out, dtab, lut, n_codes, chunk_log2, n64, n_esc, tl.load(meta + META_BODY),
                             tl.load(sums) & M32, tl.load(sums + 1) & M32, tag, sec_bytes)
            _zero_gap(body, n64, off_codes)
            _zero_gap(body, off_codes + 24 * ((n64 + 63) // 64), off_scounts)
            _zero_gap(body, off_scounts + 2 * n_chunks, off_sec)
            _zero_gap(body, off_sec + sec_bytes, off_counts)
            _zero_gap(body, off_counts + 2 * n_chunks, off_pos)
            _zero_gap(body, off_pos + 2 * n_esc, off_exp)


# --------------------------------------------------------------------------------------------- decode

@_jit
def exp2l_decode_count(payload, hb, n, cnt, off_codes, TILE: tl.constexpr, UNIT: tl.constexpr):
    """Per unit: elements [0, n) whose primary code is 7 (all three plane bits set), int32."""
    t = tl.program_id(0)
    n64 = n.to(tl.int64)
    q = t.to(tl.int64) * (TILE // 8) + tl.arange(0, TILE // 8)   # groups of 8 elements
    qm = 8 * q < n64
    a = payload + hb + off_codes + 24 * (q // 8) + (q % 8)
    m = tl.load(a, mask=qm, other=0) & tl.load(a + 8, mask=qm, other=0) & tl.load(a + 16, mask=qm, other=0)
    m = m.to(tl.int32) & ((1 << tl.minimum(tl.maximum(n64 - 8 * q, 0), 8)) - 1).to(tl.int32)   # not past n
    m = m - ((m >> 1) & 0x55)                                   # popcount of a byte
    m = (m & 0x33) + ((m >> 2) & 0x33)
    m = (m + (m >> 4)) & 0x0F
    u = t * (TILE // UNIT) + tl.arange(0, TILE // UNIT)
    tl.store(cnt + u, _unit_sums(m, TILE // 8, UNIT // 8), mask=u.to(tl.int64) * UNIT < n64)


@_jit
def exp2l_decode_plan(payload, hb, incl, chunks, ecounts, eincl, st, n, n_units, upc, n_chunks, chunk_log2,
                      off_scounts, off_counts, CB: tl.constexpr):
    """One program, over the chunks: (first marker index, first sec byte) per chunk; escape counts and their
    inclusive prefix (for exp4_validate_kernel); st = [a sec count exceeds its chunk, bytes the sec counts need,
    escape count sum, first chunk whose marker count differs from its sec count (n_chunks if none)]."""
    n64 = n.to(tl.int64)
    body = payload + hb
    sec = n64 * 0
    esc_sum = n64 * 0
    too_many = n64 * 0
    first_bad = n_chunks.to(tl.int64)
    for c0 in range(0, n_chunks, CB):
        c = c0 + tl.arange(0, CB).to(tl.int64)
        m = c < n_chunks
        clen = tl.minimum(n64 - (c << chunk_log2), 1 << chunk_log2)
        cnt = _load_u16(body + off_scounts + 2 * c, m)
        esc = _load_u16(body + off_counts + 2 * c, m)
        prev = tl.maximum(c * upc - 1, 0)
        f_mark = tl.load(incl + prev, mask=m & (c > 0), other=0)
        have = tl.load(incl + tl.minimum(c * upc + upc, n_units) - 1, mask=m, other=0) - f_mark
        half = (cnt + 1) // 2
        tl.store(chunks + DEC_CHUNK * c, f_mark, mask=m)
        tl.store(chunks + DEC_CHUNK * c + 1, sec + tl.cumsum(half, 0) - half, mask=m)
        tl.store(ecounts + c, esc, mask=m)
        tl.store(eincl + c, esc_sum + tl.cumsum(esc, 0), mask=m)
        too_many = tl.maximum(too_many, tl.max((m & (cnt > clen)).to(tl.int64), 0))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(m & (have != cnt), c, n_chunks), 0))
        sec += tl.sum(half, 0)
        esc_sum += tl.sum(esc, 0)
    k = tl.arange(0, 4)
    v = tl.where(k == 0, too_many, tl.where(k == 1, sec, tl.where(k == 2, esc_sum, first_bad)))
    tl.store(st + k, v)


@_jit
def exp2l_decode_dense(payload, hb, y0, ptrs, starts, R, n, okp, incl, chunks, ck, chunk_log2, off_codes, off_sec,
                       MULTI: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr, UNIT: tl.constexpr):
    """Per tile: x from sm and the exponent of the primary code, or for a marker of its secondary code (rank r
    in the chunk -> nibble r of the chunk's sec bytes), stored only when everything validated (then every sec
    byte read lies inside its chunk's bytes); checksum terms of these values."""
    t, lo, hi, idx, valid = _tile(n, TILE)
    body = payload + hb
    sm = tl.load(body + idx, mask=valid, other=0).to(tl.int32)
    a = body + off_codes + 24 * (idx // 64) + (idx % 64) // 8
    sh = (idx % 8).to(tl.int32)
    p = (tl.load(a, mask=valid, other=0).to(tl.int32) >> sh) & 1
    p |= ((tl.load(a + 8, mask=valid, other=0).to(tl.int32) >> sh) & 1) << 1
    p |= ((tl.load(a + 16, mask=valid, other=0).to(tl.int32) >> sh) & 1) << 2
    mark = valid & (p == 7)
    # (a vector mask & a scalar flag is spelled with int32: the interpreter mistypes the plain &)
    ok = (tl.load(okp) != 0).to(tl.int32)
    mm = (mark.to(tl.int32) & ok) != 0
    c = idx >> chunk_log2
    r = _before(incl, t, 0, 1, TILE, UNIT) + tl.cumsum(mark.to(tl.int32), 0) - 1
    r -= tl.load(chunks + DEC_CHUNK * c, mask=mm, other=0)
    sb = tl.load(body + off_sec + tl.load(chunks + DEC_CHUNK * c + 1, mask=mm, other=0) + r // 2, mask=mm,
                 other=0).to(tl.int32)
    s = (sb >> ((r & 1) * 4).to(tl.int32)) & 15
    e_sec = tl.load(payload + 72 + s, mask=mm & (s < 15), other=0)          # sec_table[15] = 0
    e_pri = tl.load(payload + 16 + p, mask=valid & (p < 7), other=0)
    x = _bf16_of(sm, tl.where(mark, e_sec, e_pri).to(tl.int32))
    _scatter(y0, ptrs, starts, R, idx, x.to(tl.int16), (valid.to(tl.int32) & ok) != 0, lo, hi, tl.int16,
             MULTI, ALIGN)
    ck_a, ck_b = _bf16_sums(x, idx)
    tl.store(ck + 2 * t, ck_a)
    tl.store(ck + 2 * t + 1, ck_b)


@_jit
def exp2l_decode_patch(payload, hb, y0, ptrs, starts, R, n, n_esc, okp, counts, incl, ck, chunk_log2, off_pos,
                       off_exp, MULTI: tl.constexpr, ALIGN: tl.constexpr, EB: tl.constexpr):
    """Per chunk, after exp2l_decode_dense and only when everything validated: overwrite the escaped elements
    with their raw exponents and write the checksum change. The old value is read back from the destination
    (recomputing it would need the element's marker rank); positions are unique (validated), so the change is
    exact (_patch_escapes)."""
    _patch_escapes(payload, hb, y0, ptrs, starts, R, n, n_esc, okp, counts, incl, ck, chunk_log2, 0, off_pos, off_exp,
                   MULTI, ALIGN, EB, True)
