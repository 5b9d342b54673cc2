"""SplitZip-KV wire format v1: constants, header, section layout and validation.

The format is specified in ``docs/FORMAT.md``; this module is its Python twin (the C++/CUDA twin is
``csrc/include/splitzip/format.h``). Nothing here touches tensor data.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"SZKV"
VERSION = 1
HEADER_BYTES = 64
CAPACITY_SLACK = 64
MODE_RAW = 0
MODE_EXP4 = 1
CODE_BITS = 4
MAX_CODES = 16
MIN_CHUNK_LOG2 = 8
MAX_CHUNK_LOG2 = 15
DEFAULT_CHUNK_LOG2 = 12
SECTION_ALIGN = 16

# dtype code -> (torch dtype, element size, EXP4 allowed)
_DTYPES: dict[int, tuple[torch.dtype, int, bool]] = {
    0: (torch.uint8, 1, False),
    1: (torch.bfloat16, 2, True),
    2: (torch.float16, 2, False),
    3: (torch.float32, 4, False),
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES[4] = (torch.float8_e4m3fn, 1, False)
if hasattr(torch, "float8_e5m2"):
    _DTYPES[5] = (torch.float8_e5m2, 1, False)
_DTYPE_CODES = {v[0]: k for k, v in _DTYPES.items()}

# layout: magic, version, dtype, mode, code_bits, n_codes, chunk_log2, reserved, crc,
#         codebook[16], n_elems, n_escapes, body_bytes, checksum_a, checksum_b
_HEADER = struct.Struct("<4sBBBBBBHI16sQQQII")
assert _HEADER.size == HEADER_BYTES


class PayloadError(ValueError):
    """A payload is corrupted, truncated, of another format version, or does not fit its destination."""


class UnsupportedDtypeError(TypeError):
    """The tensor dtype has no wire-format code (the codec cannot carry it at all)."""


def dtype_code(dtype: torch.dtype) -> int:
    """Wire-format code of a torch dtype; raises :class:`UnsupportedDtypeError` for others."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        known = ", ".join(str(d).replace("torch.", "") for d in _DTYPE_CODES)
        raise UnsupportedDtypeError(
            f"splitzip cannot carry dtype {dtype}; supported dtypes are: {known}") from None


def dtype_from_code(code: int) -> torch.dtype:
    return _DTYPES[code][0]


def element_size(code: int) -> int:
    return _DTYPES[code][1]


def exp4_allowed(code: int) -> bool:
    return _DTYPES[code][2]


def align16(x: int) -> int:
    return (x + SECTION_ALIGN - 1) & ~(SECTION_ALIGN - 1)


def encode_capacity(n_elems: int, elem_size: int) -> int:
    """Bytes an output buffer must hold for any encoder (see FORMAT.md §5)."""
    return HEADER_BYTES + n_elems * elem_size + CAPACITY_SLACK


@dataclass(frozen=True)
class Exp4Layout:
    """Byte offsets of the EXP4 sections, relative to the body start."""
    n: int
    chunk_log2: int
    n_escapes: int
    n_chunks: int
    off_codes: int
    off_counts: int
    off_pos: int
    off_exp: int
    body_bytes: int

    @staticmethod
    def compute(n: int, chunk_log2: int, n_escapes: int) -> "Exp4Layout":
        c = 1 << chunk_log2
        n_chunks = (n + c - 1) // c
        off_codes = align16(n)
        off_counts = align16(off_codes + (n + 1) // 2)
        off_pos = align16(off_counts + 2 * n_chunks)
        off_exp = align16(off_pos + 2 * n_escapes)
        return Exp4Layout(n, chunk_log2, n_escapes, n_chunks, off_codes, off_counts, off_pos,
                          off_exp, off_exp + n_escapes)


@dataclass(frozen=True)
class Header:
    """Parsed payload header."""
    dtype: int
    mode: int
    code_bits: int
    n_codes: int
    chunk_log2: int
    codebook: bytes
    n_elems: int
    n_escapes: int
    body_bytes: int
    checksum_a: int
    checksum_b: int
    version: int = VERSION

    @property
    def payload_bytes(self) -> int:
        return HEADER_BYTES + self.body_bytes

    @property
    def raw_bytes(self) -> int:
        return self.n_elems * element_size(self.dtype)

    def pack(self) -> bytes:
        fields = [MAGIC, self.version, self.dtype, self.mode, self.code_bits, self.n_codes,
                  self.chunk_log2, 0, 0, self.codebook, self.n_elems, self.n_escapes,
                  self.body_bytes, self.checksum_a, self.checksum_b]
        raw = _HEADER.pack(*fields)
        fields[8] = zlib.crc32(raw) & 0xFFFFFFFF
        return _HEADER.pack(*fields)


def parse_header(buf: bytes | bytearray | memoryview, available: int | None = None) -> Header:
    """Parse and validate a header (FORMAT.md §6 steps 1-3 for the header alone).

    ``available`` is the payload buffer length; when given, truncation is detected.
    """
    if len(buf) < HEADER_BYTES:
        raise PayloadError(f"payload truncated: {len(buf)} bytes, the header alone needs {HEADER_BYTES}")
    raw = bytes(buf[:HEADER_BYTES])
    (magic, version, dtype, mode, code_bits, n_codes, chunk_log2, reserved, crc, codebook,
     n_elems, n_escapes, body_bytes, ca, cb) = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise PayloadError(f"not a splitzip payload: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported splitzip format version {version}; this build reads version "
                           f"{VERSION} (upgrade splitzip-vllm on both prefill and decode)")
    zeroed = raw[:12] + b"\0\0\0\0" + raw[16:]
    if zlib.crc32(zeroed) & 0xFFFFFFFF != crc:
        raise PayloadError("payload header is corrupted (header CRC mismatch)")
    if dtype not in _DTYPES:
        raise PayloadError(f"payload header names unknown dtype code {dtype}")
    if reserved != 0:
        raise PayloadError("payload header has non-zero reserved field")
    esize = element_size(dtype)
    if mode == MODE_RAW:
        if code_bits or n_codes or chunk_log2 or n_escapes or any(codebook):
            raise PayloadError("RAW payload header has coding fields set")
        if body_bytes != n_elems * esize:
            raise PayloadError(f"RAW payload body is {body_bytes} bytes but {n_elems} elements of size "
                               f"{esize} need {n_elems * esize}")
    elif mode == MODE_EXP4:
        if not exp4_allowed(dtype):
            raise PayloadError(f"EXP4 coding is not defined for dtype code {dtype}")
        if code_bits != CODE_BITS:
            raise PayloadError(f"unsupported code width {code_bits} bits (this build reads {CODE_BITS})")
        if not 1 <= n_codes <= MAX_CODES:
            raise PayloadError(f"codebook size {n_codes} outside 1..{MAX_CODES}")
        if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
            raise PayloadError(f"chunk_log2 {chunk_log2} outside {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
        if n_escapes > n_elems:
            raise PayloadError(f"{n_escapes} escapes for only {n_elems} elements")
        if any(codebook[n_codes:]) or len(set(codebook[:n_codes])) != n_codes:
            raise PayloadError("payload codebook is malformed (duplicate or stray entries)")
        if body_bytes != Exp4Layout.compute(n_elems, chunk_log2, n_escapes).body_bytes:
            raise PayloadError("payload body length does not match its element and escape counts")
    else:
        raise PayloadError(f"unknown payload mode {mode}")
    if available is not None and available < HEADER_BYTES + body_bytes:
        raise PayloadError(f"payload truncated: {available} bytes, header says "
                           f"{HEADER_BYTES + body_bytes}")
    return Header(dtype, mode, code_bits, n_codes, chunk_log2, codebook, n_elems, n_escapes,
                  body_bytes, ca, cb, version)


def payload_length(buf: bytes | bytearray | memoryview) -> int:
    """Total payload length read from a (validated) header."""
    return parse_header(buf).payload_bytes
