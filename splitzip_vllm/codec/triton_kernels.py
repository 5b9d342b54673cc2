"""Triton kernels of the SplitZip codec (wire format v2, reads v1 too; ``docs/FORMAT.md``).

Imported lazily by :mod:`splitzip_vllm.codec.backends.triton_backend`; importing this module needs a working
``triton``. Whether the kernels are compiled or interpreted is fixed when this module is imported
(``TRITON_INTERPRET=1`` then means interpreted, which runs on CPU tensors).

Data comes as a list of *regions* (the logical concatenation is the data). A kernel receives either one region
as a plain tensor (``MULTI=False``: fast, vectorisable loads) or a device table of region base addresses and
start offsets (``MULTI=True``): a program finds the region holding its first element by binary search over the
starts, then walks the regions that overlap its tile (usually one) with masked loads/stores through
``int64 -> pointer`` casts (the pattern of Triton's grouped-GEMM tutorial). Inputs are never concatenated.

Checksums (FORMAT.md §4) are computed per program as ``int64`` partial sums already reduced mod 2^32
(weights ``(k + 1) mod 2^32``, so products stay below 2^40 and per-program sums below 2^57) and summed on the
device by the caller.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import format as _fmt

# what encoders write (decoders take the payload's header length ``hb``: 64 for format v1, 96 for v2)
HEADER_BYTES = tl.constexpr(_fmt.HEADER_BYTES)
FORMAT_VERSION = tl.constexpr(_fmt.VERSION)
LUT_ESCAPE = tl.constexpr(_fmt.LUT_ESCAPE)
_NOSPEC = dict(do_not_specialize=["R", "n", "nb", "n_tiles", "n_chunks", "chunk_log2", "off_codes", "off_counts",
                                  "off_pos", "off_exp", "dtype_code", "n_codes", "n_esc", "tag"])


def _jit(fn):
    names = [a for a in _NOSPEC["do_not_specialize"] if a in fn.__code__.co_varnames[:fn.__code__.co_argcount]]
    return triton.jit(fn, do_not_specialize=names)


# --------------------------------------------------------------------------------------------- helpers

@triton.jit
def _xor_combine(a, b):
    return a ^ b


# how triton.jit decorated this module (TRITON_INTERPRET=1 at import time -> the interpreter)
INTERPRETED = type(_xor_combine).__name__ == "InterpretedFunction"


@triton.jit
def _region_of(starts, R, g):
    """Largest r in [0, R) with starts[r] <= g (starts[0] == 0, starts ascending, regions non-empty)."""
    lo = R * 0
    hi = R - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(starts + mid) <= g
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _gather(x0, ptrs, starts, R, idx, mask, lo, hi, BLOCK: tl.constexpr, DT: tl.constexpr,
            MULTI: tl.constexpr, ALIGN: tl.constexpr):
    """Elements ``idx`` (int64, all lanes of ``mask`` inside [lo, hi)) of the concatenated regions; 0 elsewhere."""
    if MULTI:
        x = tl.zeros([BLOCK], DT)
        r = _region_of(starts, R, lo)
        go = tl.load(starts + r) < hi
        while go:
            addr = tl.load(ptrs + r)
            s = tl.load(starts + r)
            e = tl.load(starts + r + 1)
            if ALIGN > 1:  # host-checked: bases 16-byte aligned, starts multiples of ALIGN elements
                addr = tl.multiple_of(addr, 16)
                s = tl.multiple_of(s, ALIGN)
                e = tl.multiple_of(e, ALIGN)
            base = addr.to(tl.pointer_type(DT))
            m = mask & (idx >= s) & (idx < e)
            x = tl.where(m, tl.load(base + (idx - s), mask=m, other=0), x)
            r += 1
            go = e < hi
    else:
        x = tl.load(x0 + idx, mask=mask, other=0)
    return x


@triton.jit
def _scatter(y0, ptrs, starts, R, idx, val, mask, lo, hi, DT: tl.constexpr, MULTI: tl.constexpr,
             ALIGN: tl.constexpr):
    """Store ``val`` at elements ``idx`` (lanes of ``mask``, all inside [lo, hi)) of the concatenated regions."""
    if MULTI:
        r = _region_of(starts, R, lo)
        go = tl.load(starts + r) < hi
        while go:
            addr = tl.load(ptrs + r)
            s = tl.load(starts + r)
            e = tl.load(starts + r + 1)
            if ALIGN > 1:  # host-checked: bases 16-byte aligned, starts multiples of ALIGN elements
                addr = tl.multiple_of(addr, 16)
                s = tl.multiple_of(s, ALIGN)
                e = tl.multiple_of(e, ALIGN)
            base = addr.to(tl.pointer_type(DT))
            m = mask & (idx >= s) & (idx < e)
            tl.store(base + (idx - s), val, mask=m)
            r += 1
            go = e < hi
    else:
        tl.store(y0 + idx, val, mask=mask)


@triton.jit
def _put(v, k, off: tl.constexpr, size: tl.constexpr, val):
    inside = (k >= off) & (k < off + size)
    sh = tl.where(inside, 8 * (k - off), 0)
    return tl.where(inside, (val >> sh) & 0xFF, v)


@triton.jit
def _header_base(k, dtype_code, n, n_esc, body, ck_a, ck_b, tag):
    """Header byte values (lanes ``k`` = byte offsets) of the fields every mode writes: magic, version, dtype,
    counts, checksums, transfer tag (a two's-complement int64); the mode fields are left 0."""
    v = tl.zeros([128], tl.int64)
    v = tl.where(k == 0, 0x53, v)
    v = tl.where(k == 1, 0x5A, v)
    v = tl.where(k == 2, 0x4B, v)
    v = tl.where(k == 3, 0x56, v)
    v = tl.where(k == 4, FORMAT_VERSION, v)
    v = tl.where(k == 5, dtype_code, v)
    v = _put(v, k, 32, 8, n)
    v = _put(v, k, 40, 8, n_esc)
    v = _put(v, k, 48, 8, body)
    v = _put(v, k, 56, 4, ck_a)
    v = _put(v, k, 60, 4, ck_b)
    v = _put(v, k, 64, 8, tag.to(tl.int64))
    return v


@triton.jit
def _seal_header(out, dtab, k, v):
    """Store the 96 header bytes ``v`` (lanes ``k``, 128 of them, the last 32 masked off) with their CRC-32.

    The CRC is affine in the message bits: crc32(m) = crc32(0^96) ^ XOR over set bits (i, j) of dtab[i*8 + j];
    dtab[768] = crc32(0^96)."""
    inside = k < HEADER_BYTES
    j = tl.arange(0, 8)
    bits = (v[:, None] >> j[None, :]) & 1
    d = tl.load(dtab + k[:, None] * 8 + j[None, :], mask=inside[:, None], other=0)
    crc = tl.reduce(tl.reduce(tl.where(bits != 0, d, 0), 1, _xor_combine), 0, _xor_combine)
    crc = crc ^ tl.load(dtab + HEADER_BYTES * 8)
    v = _put(v, k, 12, 4, crc)
    tl.store(out + k, v.to(tl.uint8), mask=inside)


@triton.jit
def _write_header(out, dtab, cbt, exp4, dtype_code, n_codes, chunk_log2, n, n_esc, body, ck_a, ck_b, tag,
                  HAS_CB: tl.constexpr):
    """Write the 96 header bytes (FORMAT.md §1, version 2) of a RAW or EXP4 payload, from one program.

    ``exp4`` is a scalar flag; RAW headers zero the coding fields; ``ext`` stays zero."""
    k = tl.arange(0, 128).to(tl.int64)
    v = _header_base(k, dtype_code, n, n_esc, body, ck_a, ck_b, tag)
    if HAS_CB:
        # vector mask & scalar flag spelled with int32 (the interpreter mistypes the plain &)
        on = ((k >= 0).to(tl.int32) & exp4.to(tl.int32)) != 0
        v = tl.where(on & (k == 6), 1, v)
        v = tl.where(on & (k == 7), 4, v)
        v = tl.where(on & (k == 8), n_codes, v)
        v = tl.where(on & (k == 9), chunk_log2, v)
        cbm = on & (k >= 16) & (k < 32)
        cb = tl.load(cbt + 256 + (k - 16), mask=cbm, other=0).to(tl.int64)
        v = tl.where(cbm, cb, v)
    _seal_header(out, dtab, k, v)


@triton.jit
def _bf16_sums(x, idx):
    """Checksum terms (FORMAT.md §4) of bfloat16 bit patterns ``x`` (int32, 0 on masked lanes) at element
    indices ``idx``: (sum of bytes, sum of (k + 1) * byte mod 2^32), both int64."""
    b_lo = (x & 0xFF).to(tl.int64)
    b_hi = (x >> 8).to(tl.int64)
    M32 = tl.full([], 4294967295, tl.int64)
    w = (2 * idx + 1) & M32
    return tl.sum(b_lo + b_hi, 0), tl.sum(w * b_lo + ((w + 1) & M32) * b_hi, 0) & M32


@triton.jit
def _tile(n, TILE: tl.constexpr):
    """This program's tile of [0, n): (tile index, first element, end, element indices, lanes inside [0, n))."""
    t = tl.program_id(0)
    lo = t.to(tl.int64) * TILE
    hi = tl.minimum(lo + TILE, n.to(tl.int64))
    idx = lo + tl.arange(0, TILE)
    return t, lo, hi, idx, idx < hi


@triton.jit
def _load_u16(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int64) | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int64) << 8)


@triton.jit
def _bf16_of(sm, e):
    """bfloat16 bit patterns (int32) from sm bytes and exponents (int32)."""
    return ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)


# --------------------------------------------------------------------------------------------- RAW

@_jit
def raw_encode_kernel(x0, ptrs, starts, R, nb, out, ck, MULTI: tl.constexpr, ALIGN: tl.constexpr,
                      TILE: tl.constexpr):
    """Copy bytes of the regions to the body (out + HEADER_BYTES) and write this tile's checksum terms."""
    t, lo, hi, idx, valid = _tile(nb, TILE)
    b = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.uint8, MULTI, ALIGN)
    tl.store(out + HEADER_BYTES + idx, b, mask=valid)
    bi = b.to(tl.int64)
    M32 = tl.full([], 4294967295, tl.int64)
    tl.store(ck + 2 * t, tl.sum(bi, 0))
    tl.store(ck + 2 * t + 1, tl.sum(((idx + 1) & M32) * bi, 0) & M32)


@_jit
def raw_decode_kernel(payload, hb, y0, ptrs, starts, R, nb, ck, MULTI: tl.constexpr, ALIGN: tl.constexpr,
                      TILE: tl.constexpr):
    """Copy the RAW body (at payload + hb, the payload's header length) into the regions and write this tile's
    checksum terms."""
    t, lo, hi, idx, valid = _tile(nb, TILE)
    b = tl.load(payload + hb + idx, mask=valid, other=0)
    _scatter(y0, ptrs, starts, R, idx, b, valid, lo, hi, tl.uint8, MULTI, ALIGN)
    bi = b.to(tl.int64)
    M32 = tl.full([], 4294967295, tl.int64)
    tl.store(ck + 2 * t, tl.sum(bi, 0))
    tl.store(ck + 2 * t + 1, tl.sum(((idx + 1) & M32) * bi, 0) & M32)


@_jit
def raw_header_kernel(out, dtab, sums, dtype_code, n, nb, tag):
    """Header of a RAW payload (after raw_encode_kernel and the device-side sum of its terms)."""
    M32 = tl.full([], 4294967295, tl.int64)
    a = tl.load(sums) & M32
    b = tl.load(sums + 1) & M32
    n64 = n.to(tl.int64)
    _write_header(out, dtab, dtab, False, dtype_code, 0, 0, n64, n64 * 0, nb.to(tl.int64), a, b, tag, False)


# --------------------------------------------------------------------------------------------- EXP4 encode

@_jit
def exp4_encode_pass1(x0, ptrs, starts, R, n, out, cbt, cnt, ck, off_codes, skip,
                      MULTI: tl.constexpr, ALIGN: tl.constexpr, TILE: tl.constexpr):
    """Per tile: sm bytes, packed 4-bit codes, escape count and checksum terms. Does nothing when the flag at
    ``skip`` is non-zero: the two-level encoder launches the EXP4 and EXP2L kernels alike and lets the device-side
    mode choice skip one of them (no host sync)."""
    if tl.load(skip) == 0:
        t, lo, hi, idx, valid = _tile(n, TILE)
        n64 = n.to(tl.int64)
        x = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.int16, MULTI, ALIGN)
        x = x.to(tl.int32) & 0xFFFF
        e = (x >> 7) & 0xFF
        sm = ((x >> 8) & 0x80) | (x & 0x7F)
        body = out + HEADER_BYTES
        tl.store(body + idx, sm.to(tl.uint8), mask=valid)
        code = tl.load(cbt + e)
        esc = valid & (code == LUT_ESCAPE)
        code = tl.where(valid & (code != LUT_ESCAPE), code, 0)
        c_even, c_odd = tl.split(tl.reshape(code, [TILE // 2, 2]))
        j = lo // 2 + tl.arange(0, TILE // 2)
        tl.store(body + off_codes + j, (c_even | (c_odd << 4)).to(tl.uint8), mask=j < (n64 + 1) // 2)
        tl.store(cnt + t, tl.sum(esc.to(tl.int32), 0))
        ck_a, ck_b = _bf16_sums(x, idx)
        tl.store(ck + 2 * t, ck_a)
        tl.store(ck + 2 * t + 1, ck_b)


@_jit
def exp4_encode_pass2(x0, ptrs, starts, R, n, out, cbt, dtab, cnt, incl, sums, n_tiles, n_chunks, chunk_log2,
                      n_codes, off_codes, off_counts, off_pos, tag, skip, MULTI: tl.constexpr, ALIGN: tl.constexpr,
                      TILE: tl.constexpr):
    """Decide EXP4 vs RAW on the device from the escape total; then per tile either scatter its escapes (and
    the chunk count when it starts a chunk) or copy its raw bytes. Program 0 writes the header and zero gaps.
    Nothing when the flag at ``skip`` is non-zero (EXP2L chosen, see exp4_encode_pass1)."""
    if tl.load(skip) == 0:
        t, lo, hi, idx, valid = _tile(n, TILE)
        n64 = n.to(tl.int64)
        n_esc = tl.load(incl + n_tiles - 1)
        off_exp = (off_pos + 2 * n_esc + 15) // 16 * 16
        body_len = off_exp + n_esc
        exp4 = body_len < 2 * n64
        body = out + HEADER_BYTES
        if t == 0:
            M32 = tl.full([], 4294967295, tl.int64)
            a = tl.load(sums) & M32
            b = tl.load(sums + 1) & M32
            _write_header(out, dtab, cbt, exp4, 1, n_codes, chunk_log2, n64, tl.where(exp4, n_esc, 0),
                          tl.where(exp4, body_len, 2 * n64), a, b, tag, True)
            if exp4:
                g = tl.arange(0, 16).to(tl.int64)
                zero = tl.zeros([16], tl.uint8)
                s1 = n64 + g
                tl.store(body + s1, zero, mask=s1 < off_codes)
                s2 = off_codes + (n64 + 1) // 2 + g
                tl.store(body + s2, zero, mask=s2 < off_counts)
                s3 = off_counts + 2 * n_chunks + g
                tl.store(body + s3, zero, mask=s3 < off_pos)
                s4 = off_pos + 2 * n_esc + g
                tl.store(body + s4, zero, mask=s4 < off_exp)
        if exp4:
            c_t = tl.load(cnt + t)
            k0 = tl.load(incl + t) - c_t
            tpc = (1 << chunk_log2) // TILE
            if t % tpc == 0:
                last = tl.minimum(t + tpc, n_tiles) - 1
                cc = tl.load(incl + last) - k0
                chunk = t // tpc
                tl.store(body + off_counts + 2 * chunk, (cc & 0xFF).to(tl.uint8))
                tl.store(body + off_counts + 2 * chunk + 1, ((cc >> 8) & 0xFF).to(tl.uint8))
            if c_t > 0:
                x = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.int16, MULTI, ALIGN)
                x = x.to(tl.int32) & 0xFFFF
                e = (x >> 7) & 0xFF
                esc = valid & (tl.load(cbt + e) == LUT_ESCAPE)
                k = k0 + tl.cumsum(esc.to(tl.int32), 0) - 1
                p = (idx & ((1 << chunk_log2) - 1)).to(tl.int32)
                tl.store(body + off_pos + 2 * k, (p & 0xFF).to(tl.uint8), mask=esc)
                tl.store(body + off_pos + 2 * k + 1, (p >> 8).to(tl.uint8), mask=esc)
                tl.store(body + off_exp + k, e.to(tl.uint8), mask=esc)
        else:
            x = _gather(x0, ptrs, starts, R, idx, valid, lo, hi, TILE, tl.int16, MULTI, ALIGN)
            x = x.to(tl.int32) & 0xFFFF
            bytes2 = tl.interleave(x & 0xFF, x >> 8).to(tl.uint8)
            bidx = 2 * lo + tl.arange(0, 2 * TILE)
            tl.store(body + bidx, bytes2, mask=bidx < 2 * hi)


# --------------------------------------------------------------------------------------------- EXP4 decode

@_jit
def exp4_validate_kernel(payload, hb, counts, incl, err, n, n_esc, chunk_log2, off_pos, EB: tl.constexpr):
    """Per chunk: bit 0 = count exceeds chunk length, bit 1 = position outside chunk, bit 2 = positions not
    strictly ascending. Reads only escape entries with index < n_esc (inside the payload)."""
    c = tl.program_id(0)
    n64 = n.to(tl.int64)
    m_esc = n_esc.to(tl.int64)
    cs = c.to(tl.int64) << chunk_log2
    clen = tl.minimum(n64 - cs, 1 << chunk_log2)
    cc = tl.load(counts + c)
    base = tl.load(incl + c) - cc
    cc_chk = tl.minimum(cc, clen)  # a longer list is an error already; bounded work per chunk
    pos = payload + hb + off_pos
    bad_pos = tl.zeros([EB], tl.int32)
    bad_ord = tl.zeros([EB], tl.int32)
    for j0 in range(0, cc_chk, EB):
        jj = j0 + tl.arange(0, EB)
        kk = base + jj
        m = (jj < cc_chk) & (kk < m_esc)
        p = tl.load(pos + 2 * kk, mask=m, other=0).to(tl.int32) | \
            (tl.load(pos + 2 * kk + 1, mask=m, other=0).to(tl.int32) << 8)
        mp = m & (jj > 0)
        pp = tl.load(pos + 2 * kk - 2, mask=mp, other=0).to(tl.int32) | \
            (tl.load(pos + 2 * kk - 1, mask=mp, other=0).to(tl.int32) << 8)
        bad_pos |= (m & (p >= clen)).to(tl.int32)
        bad_ord |= (mp & (p <= pp)).to(tl.int32)
    bits = tl.where(cc > clen, 1, 0) | (tl.max(bad_pos, 0) << 1) | (tl.max(bad_ord, 0) << 2)
    tl.store(err + c, bits.to(tl.int32))


@_jit
def exp4_decode_dense(payload, hb, y0, ptrs, starts, R, n, okp, ck, off_codes, MULTI: tl.constexpr,
                      ALIGN: tl.constexpr, TILE: tl.constexpr):
    """Per tile: x = sm + codebook[code] exponent, stored to the regions (only when the escape table
    validated); checksum terms of the dense values."""
    t, lo, hi, idx, valid = _tile(n, TILE)
    body = payload + hb
    sm = tl.load(body + idx, mask=valid, other=0).to(tl.int32)
    cb = tl.load(body + off_codes + idx // 2, mask=valid, other=0).to(tl.int32)
    code = (cb >> ((idx & 1) * 4).to(tl.int32)) & 0xF
    x = _bf16_of(sm, tl.load(payload + 16 + code, mask=valid, other=0).to(tl.int32))
    # (a vector mask & a scalar flag is spelled with int32: the interpreter mistypes the plain &)
    ok = (tl.load(okp) != 0).to(tl.int32)
    _scatter(y0, ptrs, starts, R, idx, x.to(tl.int16), (valid.to(tl.int32) & ok) != 0, lo, hi, tl.int16, MULTI,
             ALIGN)
    ck_a, ck_b = _bf16_sums(x, idx)
    tl.store(ck + 2 * t, ck_a)
    tl.store(ck + 2 * t + 1, ck_b)


@triton.jit
def _patch_escapes(payload, hb, y0, ptrs, starts, R, n, n_esc, okp, counts, incl, ck, chunk_log2, off_codes,
                   off_pos, off_exp, MULTI: tl.constexpr, ALIGN: tl.constexpr, EB: tl.constexpr,
                   READBACK: tl.constexpr):
    """Per chunk, after the dense kernel and only when the flag at ``okp`` is set (everything validated): overwrite
    the chunk's escaped elements with their raw exponents and write the checksum change this makes (positions are
    unique: validated, so the change is exact). The old value is the element's 4-bit code's exponent (EXP4,
    ``off_codes``), or with ``READBACK`` (EXP2L: recomputing it would need the element's marker rank) read back
    from the destination."""
    c = tl.program_id(0)
    cs = c.to(tl.int64) << chunk_log2
    clen = tl.minimum(n.to(tl.int64) - cs, 1 << chunk_log2)
    cc = tl.where(tl.load(okp) != 0, tl.load(counts + c), 0)   # no escape is read unless everything validated
    base = tl.load(incl + c) - tl.load(counts + c)
    body = payload + hb
    M32 = tl.full([], 4294967295, tl.int64)
    da = tl.zeros([EB], tl.int64)
    db = tl.zeros([EB], tl.int64)
    for j0 in range(0, cc, EB):
        jj = j0 + tl.arange(0, EB)
        kk = base + jj
        m = (jj < cc) & (kk < n_esc.to(tl.int64))
        p = _load_u16(body + off_pos + 2 * kk, m)
        m = m & (p < clen)
        g = cs + p
        sm = tl.load(body + g, mask=m, other=0).to(tl.int32)
        x_new = _bf16_of(sm, tl.load(body + off_exp + kk, mask=m, other=0).to(tl.int32))
        if READBACK:
            x_old = _gather(y0, ptrs, starts, R, g, m, cs, cs + clen, EB, tl.int16, MULTI, ALIGN).to(tl.int32) & 0xFFFF
        else:
            cb = tl.load(body + off_codes + g // 2, mask=m, other=0).to(tl.int32)
            code = (cb >> ((g & 1) * 4).to(tl.int32)) & 0xF
            x_old = _bf16_of(sm, tl.load(payload + 16 + code, mask=m, other=0).to(tl.int32))
        _scatter(y0, ptrs, starts, R, g, x_new.to(tl.int16), m, cs, cs + clen, tl.int16, MULTI, ALIGN)
        d_lo = tl.where(m, (x_new & 0xFF) - (x_old & 0xFF), 0).to(tl.int64)
        d_hi = tl.where(m, (x_new >> 8) - (x_old >> 8), 0).to(tl.int64)
        w = (2 * g + 1) & M32
        da += d_lo + d_hi
        db += w * d_lo + ((w + 1) & M32) * d_hi
    tl.store(ck + 2 * c, tl.sum(da, 0) & M32)
    tl.store(ck + 2 * c + 1, tl.sum(db, 0) & M32)


@_jit
def exp4_decode_patch(payload, hb, y0, ptrs, starts, R, n, n_esc, okp, counts, incl, ck, chunk_log2, off_codes,
                      off_pos, off_exp, MULTI: tl.constexpr, ALIGN: tl.constexpr, EB: tl.constexpr):
    """Per chunk: overwrite its escaped elements with their raw exponents (after exp4_decode_dense, only when the
    escape table validated) and write the checksum change this makes (_patch_escapes)."""
    _patch_escapes(payload, hb, y0, ptrs, starts, R, n, n_esc, okp, counts, incl, ck, chunk_log2, off_codes,
                   off_pos, off_exp, MULTI, ALIGN, EB, False)
