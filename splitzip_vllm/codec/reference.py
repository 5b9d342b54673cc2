"""Plain PyTorch reference codec: the oracle every other backend must match byte for byte.

Vectorised torch ops only, so it runs on any device (CPU, CUDA). It favours clarity over speed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .codebook import Codebook
from .format import (CODE_BITS, EXP2L_CODE_BITS, EXP2L_MARKER, EXP2L_MAX_PRIMARY, EXP2L_SEC_ESCAPE, HEADER_BYTES,
                     MODE_EXP2L, MODE_EXP4, MODE_RAW, Exp2lLayout, Exp4Layout, Header, PayloadError, Status,
                     check_destination, check_tag, element_size, exp2l_ext, exp4_allowed, parse_header)

_MOD = 1 << 32
_CHECKSUM_STEP = 1 << 22


def checksum_bytes(data: torch.Tensor) -> tuple[int, int]:
    """FORMAT.md §4 checksum over a flat uint8 tensor."""
    a = b = 0
    n = data.numel()
    for start in range(0, n, _CHECKSUM_STEP):
        blk = data[start:start + _CHECKSUM_STEP].to(torch.int64)
        w = torch.arange(start + 1, start + 1 + blk.numel(), device=blk.device, dtype=torch.int64) % _MOD
        a = (a + int(blk.sum())) % _MOD
        b = (b + int((w * blk).sum())) % _MOD
    return a, b


def _flat_bytes(regions: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = [r.contiguous().reshape(-1).view(torch.uint8) for r in regions]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def encode(regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
           chunk_log2: int, tag: int = 0) -> torch.Tensor:
    """Encode the logical concatenation of ``regions`` (all of wire dtype ``dtype``) to a payload bound to
    transfer ``tag`` (FORMAT.md §6a), in the mode FORMAT.md §5 chooses."""
    check_tag(tag)
    raw = _flat_bytes(regions)
    esize = element_size(dtype)
    n = raw.numel() // esize
    ca, cb = checksum_bytes(raw)
    device = raw.device
    if codebook is not None and exp4_allowed(dtype) and n > 0:
        x = raw.view(torch.int16).to(torch.int32) & 0xFFFF
        e = (x >> 7) & 0xFF
        sm = (((x >> 8) & 0x80) | (x & 0x7F)).to(torch.uint8)
        exp4 = _Exp4Plan(e, codebook, n, chunk_log2)
        best = exp4 if exp4.body_bytes < n * esize else None
        if codebook.two_level:
            two = _Exp2lPlan(e, codebook, n, chunk_log2)
            if two.body_bytes < min(exp4.body_bytes, n * esize):
                best = two
        if best is not None:
            body, hdr = best.write(sm, e, dtype, ca, cb, tag)
            return torch.cat([_header_tensor(hdr, device), body])
    hdr = Header(dtype, MODE_RAW, 0, 0, 0, bytes(16), n, 0, raw.numel(), ca, cb, transfer_tag=tag)
    return torch.cat([_header_tensor(hdr, device), raw])


def _lut(exps: Sequence[int], device: torch.device) -> torch.Tensor:
    lut = torch.full((256,), -1, dtype=torch.int32, device=device)
    if exps:
        lut[torch.tensor(list(exps), dtype=torch.long, device=device)] = torch.arange(
            len(exps), dtype=torch.int32, device=device)
    return lut


class _Exp4Plan:
    """EXP4 coding of one payload (FORMAT.md §3)."""

    def __init__(self, e: torch.Tensor, codebook: Codebook, n: int, chunk_log2: int) -> None:
        self.cb = codebook.exp4()
        code = _lut(self.cb.exponents, e.device)[e]
        self.esc_idx = torch.nonzero(code < 0).reshape(-1)
        self.code = code.clamp_min(0)
        self.n, self.chunk_log2 = n, chunk_log2
        self.lay = Exp4Layout.compute(n, chunk_log2, self.esc_idx.numel())
        self.body_bytes = self.lay.body_bytes

    def write(self, sm, e, dtype, ca, cb, tag):
        lay, n, code, m = self.lay, self.n, self.code, self.esc_idx.numel()
        body = torch.zeros(lay.body_bytes, dtype=torch.uint8, device=e.device)
        body[:n] = sm
        if n % 2:
            code = torch.cat([code, code.new_zeros(1)])
        pairs = code.view(-1, 2)
        body[lay.off_codes:lay.off_codes + (n + 1) // 2] = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
        _write_escapes(body, lay, self.esc_idx, e, self.chunk_log2)
        hdr = Header(dtype, MODE_EXP4, CODE_BITS, self.cb.n_codes, self.chunk_log2, self.cb.table16(), n, m,
                     lay.body_bytes, ca, cb, transfer_tag=tag)
        return body, hdr


class _Exp2lPlan:
    """EXP2L coding of one payload (FORMAT.md §3a)."""

    def __init__(self, e: torch.Tensor, codebook: Codebook, n: int, chunk_log2: int) -> None:
        dev = e.device
        self.primary, self.secondary = codebook.primary, codebook.secondary
        p = _lut(self.primary, dev)[e]
        s = _lut(self.secondary, dev)[e]
        marked = p < 0
        self.pcode = torch.where(marked, torch.full_like(p, EXP2L_MARKER), p)
        self.mark_idx = torch.nonzero(marked).reshape(-1)
        sec = s[self.mark_idx]
        self.sec = torch.where(sec < 0, torch.full_like(sec, EXP2L_SEC_ESCAPE), sec)
        self.esc_idx = self.mark_idx[sec < 0]
        self.n, self.chunk_log2 = n, chunk_log2
        n_chunks = (n + (1 << chunk_log2) - 1) >> chunk_log2
        self.cnt = torch.bincount(self.mark_idx >> chunk_log2, minlength=n_chunks).to(torch.int64)
        self.sec_bytes = int(((self.cnt + 1) // 2).sum())
        self.lay = Exp2lLayout.compute(n, chunk_log2, self.esc_idx.numel(), self.sec_bytes)
        self.body_bytes = self.lay.body_bytes

    def write(self, sm, e, dtype, ca, cb, tag):
        lay, n = self.lay, self.n
        dev = e.device
        body = torch.zeros(lay.body_bytes, dtype=torch.uint8, device=dev)
        body[:n] = sm
        body[lay.off_codes:lay.off_codes + 24 * ((n + 63) // 64)] = _pack_planes(self.pcode)
        body[lay.off_scounts:lay.off_scounts + 2 * lay.n_chunks] = _u16_bytes(self.cnt)
        byte_idx, shift = _sec_nibbles(self.mark_idx, self.cnt, self.chunk_log2)
        sec = torch.zeros(lay.sec_bytes, dtype=torch.int64, device=dev)
        sec.index_add_(0, byte_idx, self.sec.to(torch.int64) << shift)
        body[lay.off_sec:lay.off_sec + lay.sec_bytes] = sec.to(torch.uint8)
        _write_escapes(body, lay, self.esc_idx, e, self.chunk_log2)
        ext = exp2l_ext(bytes(self.secondary), lay.sec_bytes)
        hdr = Header(dtype, MODE_EXP2L, EXP2L_CODE_BITS, len(self.primary), self.chunk_log2,
                     bytes(self.primary) + bytes(16 - len(self.primary)), n, lay.n_escapes, lay.body_bytes, ca, cb,
                     transfer_tag=tag, ext=ext)
        return body, hdr


def _sec_nibbles(mark_idx: torch.Tensor, cnt: torch.Tensor, chunk_log2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte index in the ``sec`` section and bit shift (0/4) of each marker's secondary code (global order)."""
    chunk = mark_idx >> chunk_log2
    first = torch.cumsum(cnt, 0) - cnt                     # markers before each chunk
    start = torch.cumsum((cnt + 1) // 2, 0) - (cnt + 1) // 2  # sec bytes before each chunk
    rank = torch.arange(mark_idx.numel(), device=mark_idx.device) - first[chunk]
    return start[chunk] + (rank >> 1), (rank & 1) * 4


def _pack_planes(code: torch.Tensor) -> torch.Tensor:
    """3-bit codes -> per 64-element block three u64 bit planes (FORMAT.md §3a)."""
    pad = (-code.numel()) % 64
    c = torch.cat([code, code.new_zeros(pad)]).to(torch.int64).view(-1, 1, 8, 8)       # block, -, byte, bit
    bits = (c >> torch.arange(3, device=c.device).view(1, 3, 1, 1)) & 1               # block, plane, byte, bit
    return (bits << torch.arange(8, device=c.device)).sum(-1).reshape(-1).to(torch.uint8)


def _unpack_planes(b: torch.Tensor, n: int) -> torch.Tensor:
    planes = b.to(torch.int64).view(-1, 3, 8, 1)                                       # block, plane, byte, -
    bits = (planes >> torch.arange(8, device=b.device)) & 1                           # block, plane, byte, bit
    code = (bits << torch.arange(3, device=b.device).view(1, 3, 1, 1)).sum(1)         # block, byte, bit
    return code.reshape(-1)[:n]


def _write_escapes(body: torch.Tensor, lay, esc_idx: torch.Tensor, e: torch.Tensor, chunk_log2: int) -> None:
    m = esc_idx.numel()
    counts = torch.bincount(esc_idx >> chunk_log2, minlength=lay.n_chunks).to(torch.int32)
    body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks] = _u16_bytes(counts)
    pos = (esc_idx & ((1 << chunk_log2) - 1)).to(torch.int32)
    body[lay.off_pos:lay.off_pos + 2 * m] = _u16_bytes(pos)
    body[lay.off_exp:lay.off_exp + m] = e[esc_idx].to(torch.uint8)


def decode(payload: torch.Tensor, dtype: int, n_elems: int, tag: int = 0) -> torch.Tensor:
    """Decode a payload of transfer ``tag`` to a flat uint8 tensor of the original bytes; validates everything
    (FORMAT.md §6)."""
    payload = payload.reshape(-1)
    hdr = parse_header(payload[:HEADER_BYTES].cpu().numpy().tobytes(), payload.numel(), check_tag(tag))
    check_destination(hdr, dtype, n_elems)
    body = payload[hdr.header_bytes:hdr.header_bytes + hdr.body_bytes]
    if hdr.mode == MODE_RAW:
        out = body.clone()
    elif hdr.mode == MODE_EXP4:
        out = _decode_exp4(hdr, body)
    else:
        out = _decode_exp2l(hdr, body)
    if checksum_bytes(out) != (hdr.checksum_a, hdr.checksum_b):
        raise PayloadError.of(Status.CHECKSUM)
    return out


def _chunk_lengths(n: int, n_chunks: int, c_log2: int, dev: torch.device) -> torch.Tensor:
    c = 1 << c_log2
    chunk_len = torch.full((n_chunks,), c, dtype=torch.int64, device=dev)
    if n_chunks:
        chunk_len[-1] = n - (n_chunks - 1) * c
    return chunk_len


def _escape_counts(body: torch.Tensor, lay, m: int, chunk_len: torch.Tensor) -> torch.Tensor:
    """FORMAT.md §6 step 4: escape chunk counts (sum, per-chunk bound)."""
    counts = _u16_from(body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks]).to(torch.int64)
    if int(counts.sum()) != m:
        raise PayloadError.of(Status.ESC_SUM, aux=int(counts.sum()), n_escapes=m)
    if bool((counts > chunk_len).any()):
        raise PayloadError.of(Status.ESC_COUNT)
    return counts


def _decode_exp4(hdr: Header, body: torch.Tensor) -> torch.Tensor:
    n, c_log2, m = hdr.n_elems, hdr.chunk_log2, hdr.n_escapes
    lay = Exp4Layout.compute(n, c_log2, m)
    dev = body.device
    sm = body[:n].to(torch.int32)
    packed = body[lay.off_codes:lay.off_codes + (n + 1) // 2].to(torch.int32)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    table = torch.tensor(list(hdr.codebook), dtype=torch.int32, device=dev)
    e = table[codes]
    chunk_len = _chunk_lengths(n, lay.n_chunks, c_log2, dev)
    counts = _escape_counts(body, lay, m, chunk_len)
    c = 1 << c_log2
    if m:
        chunk_of = torch.repeat_interleave(torch.arange(lay.n_chunks, device=dev), counts)
        pos = _u16_from(body[lay.off_pos:lay.off_pos + 2 * m]).to(torch.int64)
        if bool((pos >= chunk_len[chunk_of]).any()):
            raise PayloadError.of(Status.ESC_POS)
        same_chunk = chunk_of[1:] == chunk_of[:-1]  # positions strictly increase within a chunk (FORMAT.md §6)
        if bool((same_chunk & (pos[1:] <= pos[:-1])).any()):
            raise PayloadError.of(Status.ESC_ORDER)
        e[chunk_of * c + pos] = body[lay.off_exp:lay.off_exp + m].to(torch.int32)
    return _combine(sm, e, n, dev)


def _combine(sm: torch.Tensor, e: torch.Tensor, n: int, dev: torch.device) -> torch.Tensor:
    x = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    return x.to(torch.int16).view(torch.uint8) if n else torch.empty(0, dtype=torch.uint8, device=dev)


def _decode_exp2l(hdr: Header, body: torch.Tensor) -> torch.Tensor:
    n, c_log2, m = hdr.n_elems, hdr.chunk_log2, hdr.n_escapes
    lay = Exp2lLayout.compute(n, c_log2, m, hdr.sec_bytes)
    dev = body.device
    chunk_len = _chunk_lengths(n, lay.n_chunks, c_log2, dev)
    cnt = _u16_from(body[lay.off_scounts:lay.off_scounts + 2 * lay.n_chunks]).to(torch.int64)
    if bool((cnt > chunk_len).any()):
        raise PayloadError.of(Status.SEC_COUNT)
    if int(((cnt + 1) // 2).sum()) != lay.sec_bytes:
        raise PayloadError.of(Status.SEC_BYTES, aux=int(((cnt + 1) // 2).sum()), sec_bytes=lay.sec_bytes)
    counts = _escape_counts(body, lay, m, chunk_len)
    pcode = _unpack_planes(body[lay.off_codes:lay.off_codes + 24 * ((n + 63) // 64)], n)
    mark_idx = torch.nonzero(pcode == EXP2L_MARKER).reshape(-1)
    chunk_of = torch.repeat_interleave(torch.arange(lay.n_chunks, device=dev), counts)
    pos = _u16_from(body[lay.off_pos:lay.off_pos + 2 * m]).to(torch.int64)
    _check_chunks(mark_idx, cnt, chunk_of, pos, chunk_len, c_log2)
    ptable = torch.tensor(list(hdr.codebook[:EXP2L_MAX_PRIMARY]) + [0], dtype=torch.int32, device=dev)
    stable = torch.tensor(list(hdr.sec_codebook) + [0], dtype=torch.int32, device=dev)
    e = ptable[pcode]
    if mark_idx.numel():
        byte_idx, shift = _sec_nibbles(mark_idx, cnt, c_log2)
        sec = (body[lay.off_sec:lay.off_sec + lay.sec_bytes].to(torch.int64)[byte_idx] >> shift) & 0xF
        e[mark_idx] = stable[sec]
    if m:
        e[chunk_of * (1 << c_log2) + pos] = body[lay.off_exp:lay.off_exp + m].to(torch.int32)
    return _combine(body[:n].to(torch.int32), e, n, dev)


def _check_chunks(mark_idx, cnt, chunk_of, pos, chunk_len, c_log2) -> None:
    """FORMAT.md §6 step 4 (c), (d) for EXP2L in the order a chunk-by-chunk decoder meets them: chunk by chunk,
    the marker count, then each escape's position (ESC_POS); out-of-order positions (ESC_ORDER) after all chunks,
    as in EXP4."""
    have = torch.bincount(mark_idx >> c_log2, minlength=cnt.numel()).to(torch.int64)
    bad_mark = torch.nonzero(have != cnt).reshape(-1)
    outside = torch.nonzero(pos >= chunk_len[chunk_of]).reshape(-1)
    first_mark = int(bad_mark[0]) if bad_mark.numel() else None
    first_out = int(chunk_of[outside[0]]) if outside.numel() else None
    if first_mark is not None and (first_out is None or first_mark <= first_out):
        raise PayloadError.of(Status.SEC_MARKERS, aux=first_mark)
    if first_out is not None:
        raise PayloadError.of(Status.ESC_POS)
    if pos.numel() > 1 and bool(((chunk_of[1:] == chunk_of[:-1]) & (pos[1:] <= pos[:-1])).any()):
        raise PayloadError.of(Status.ESC_ORDER)


def _u16_bytes(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int32)
    return torch.stack([v & 0xFF, (v >> 8) & 0xFF], dim=1).reshape(-1).to(torch.uint8)


def _u16_from(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32).view(-1, 2)
    return b[:, 0] | (b[:, 1] << 8)


def _header_tensor(hdr: Header, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(hdr.pack()), dtype=torch.uint8).to(device)
