"""Plain PyTorch reference codec: the oracle every other backend must match byte for byte.

Vectorised torch ops only, so it runs on any device (CPU, CUDA). It favours clarity over speed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .codebook import Codebook
from .format import (CODE_BITS, HEADER_BYTES, MODE_EXP4, MODE_RAW, Exp4Layout, Header, PayloadError, Status,
                     check_destination, check_tag, element_size, exp4_allowed, parse_header)

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
    transfer ``tag`` (FORMAT.md §6a)."""
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
        lut = torch.full((256,), -1, dtype=torch.int32, device=device)
        lut[torch.tensor(codebook.exponents, dtype=torch.long, device=device)] = torch.arange(
            codebook.n_codes, dtype=torch.int32, device=device)
        code = lut[e]
        esc = code < 0
        code = torch.where(esc, torch.zeros_like(code), code)
        esc_idx = torch.nonzero(esc).reshape(-1)
        m = esc_idx.numel()
        lay = Exp4Layout.compute(n, chunk_log2, m)
        if lay.body_bytes < n * esize:
            body = torch.zeros(lay.body_bytes, dtype=torch.uint8, device=device)
            body[:n] = sm
            if n % 2:
                code = torch.cat([code, code.new_zeros(1)])
            pairs = code.view(-1, 2)
            body[lay.off_codes:lay.off_codes + (n + 1) // 2] = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
            counts = torch.bincount(esc_idx >> chunk_log2, minlength=lay.n_chunks).to(torch.int32)
            body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks] = _u16_bytes(counts)
            pos = (esc_idx & ((1 << chunk_log2) - 1)).to(torch.int32)
            body[lay.off_pos:lay.off_pos + 2 * m] = _u16_bytes(pos)
            body[lay.off_exp:lay.off_exp + m] = e[esc_idx].to(torch.uint8)
            hdr = Header(dtype, MODE_EXP4, CODE_BITS, codebook.n_codes, chunk_log2, codebook.table16(), n, m,
                         lay.body_bytes, ca, cb, transfer_tag=tag)
            return torch.cat([_header_tensor(hdr, device), body])
    hdr = Header(dtype, MODE_RAW, 0, 0, 0, bytes(16), n, 0, raw.numel(), ca, cb, transfer_tag=tag)
    return torch.cat([_header_tensor(hdr, device), raw])


def decode(payload: torch.Tensor, dtype: int, n_elems: int, tag: int = 0) -> torch.Tensor:
    """Decode a payload of transfer ``tag`` to a flat uint8 tensor of the original bytes; validates everything
    (FORMAT.md §6)."""
    payload = payload.reshape(-1)
    hdr = parse_header(payload[:HEADER_BYTES].cpu().numpy().tobytes(), payload.numel(), check_tag(tag))
    check_destination(hdr, dtype, n_elems)
    body = payload[hdr.header_bytes:hdr.header_bytes + hdr.body_bytes]
    if hdr.mode == MODE_RAW:
        out = body.clone()
    else:
        out = _decode_exp4(hdr, body)
    if checksum_bytes(out) != (hdr.checksum_a, hdr.checksum_b):
        raise PayloadError.of(Status.CHECKSUM)
    return out


def _decode_exp4(hdr: Header, body: torch.Tensor) -> torch.Tensor:
    n, c_log2, m = hdr.n_elems, hdr.chunk_log2, hdr.n_escapes
    lay = Exp4Layout.compute(n, c_log2, m)
    dev = body.device
    sm = body[:n].to(torch.int32)
    packed = body[lay.off_codes:lay.off_codes + (n + 1) // 2].to(torch.int32)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    table = torch.tensor(list(hdr.codebook), dtype=torch.int32, device=dev)
    e = table[codes]
    counts = _u16_from(body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks]).to(torch.int64)
    if int(counts.sum()) != m:
        raise PayloadError.of(Status.ESC_SUM, aux=int(counts.sum()), n_escapes=m)
    c = 1 << c_log2
    chunk_len = torch.full((lay.n_chunks,), c, dtype=torch.int64, device=dev)
    if lay.n_chunks:
        chunk_len[-1] = n - (lay.n_chunks - 1) * c
    if bool((counts > chunk_len).any()):
        raise PayloadError.of(Status.ESC_COUNT)
    if m:
        chunk_of = torch.repeat_interleave(torch.arange(lay.n_chunks, device=dev), counts)
        pos = _u16_from(body[lay.off_pos:lay.off_pos + 2 * m]).to(torch.int64)
        if bool((pos >= chunk_len[chunk_of]).any()):
            raise PayloadError.of(Status.ESC_POS)
        same_chunk = chunk_of[1:] == chunk_of[:-1]  # positions strictly increase within a chunk (FORMAT.md §6)
        if bool((same_chunk & (pos[1:] <= pos[:-1])).any()):
            raise PayloadError.of(Status.ESC_ORDER)
        e[chunk_of * c + pos] = body[lay.off_exp:lay.off_exp + m].to(torch.int32)
    x = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    return x.to(torch.int16).view(torch.uint8) if n else torch.empty(0, dtype=torch.uint8, device=dev)


def _u16_bytes(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int32)
    return torch.stack([v & 0xFF, (v >> 8) & 0xFF], dim=1).reshape(-1).to(torch.uint8)


def _u16_from(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32).view(-1, 2)
    return b[:, 0] | (b[:, 1] << 8)


def _header_tensor(hdr: Header, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(hdr.pack()), dtype=torch.uint8).to(device)
