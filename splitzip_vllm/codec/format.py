"""SplitZip-KV wire format v2 (reads v1 too): constants, header, section layout and validation.

The format is specified in ``docs/FORMAT.md``; this module is its Python twin (the C++/CUDA twin is
``csrc/include/splitzip/format.h``). Nothing here touches tensor data.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"SZKV"
VERSION = 2                 # what encoders write
VERSION_V1 = 1              # still read: 64-byte header, implicit transfer tag 0 (FORMAT.md §6a, §8)
HEADER_BYTES = 96           # header of a version-2 payload (what encoders write)
HEADER_BYTES_V1 = 64        # header of a version-1 payload
EXT_BYTES = 24              # the zero ``ext`` area at offset 72 (version 2)
TAG_MAX = (1 << 64) - 1     # transfer tags are u64; 0 = unbound
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

# layout of bytes 0..63 (both versions): magic, version, dtype, mode, code_bits, n_codes, chunk_log2, reserved,
#         crc, codebook[16], n_elems, n_escapes, body_bytes, checksum_a, checksum_b
_HEADER_V1 = struct.Struct("<4sBBBBBBHI16sQQQII")
# version 2 appends transfer_tag (u64) and ext[24]
_HEADER = struct.Struct(_HEADER_V1.format + f"Q{EXT_BYTES}s")
assert _HEADER_V1.size == HEADER_BYTES_V1 and _HEADER.size == HEADER_BYTES
_OFF_CRC = 12


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


def header_bytes_of(version: int) -> int:
    """Header length of a payload of ``version`` (1 or 2), 0 for an unknown version."""
    return {VERSION: HEADER_BYTES, VERSION_V1: HEADER_BYTES_V1}.get(version, 0)


def check_tag(tag: int) -> int:
    """``tag`` as a u64 transfer tag; raises ValueError outside 0..2^64-1."""
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag <= TAG_MAX:
        raise ValueError(f"a transfer tag is an integer in 0..2^64-1, got {tag!r}")
    return tag


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
    transfer_tag: int = 0   # version 1: always 0 (implicit)

    @property
    def header_bytes(self) -> int:
        return header_bytes_of(self.version)

    @property
    def payload_bytes(self) -> int:
        return self.header_bytes + self.body_bytes

    @property
    def raw_bytes(self) -> int:
        return self.n_elems * element_size(self.dtype)

    def pack(self) -> bytes:
        """The 96 header bytes of a version-2 payload (encoders write only version 2)."""
        if self.version != VERSION:
            raise ValueError(f"encoders write format version {VERSION} headers only, not {self.version}")
        fields = [MAGIC, VERSION, self.dtype, self.mode, self.code_bits, self.n_codes,
                  self.chunk_log2, 0, 0, self.codebook, self.n_elems, self.n_escapes,
                  self.body_bytes, self.checksum_a, self.checksum_b, check_tag(self.transfer_tag),
                  bytes(EXT_BYTES)]
        fields[8] = zlib.crc32(_HEADER.pack(*fields)) & 0xFFFFFFFF
        return _HEADER.pack(*fields)


def tag_mismatch_message(version: int, tag: int, expected: int) -> str:
    """Why a payload of transfer ``tag`` (format ``version``) is refused where ``expected`` is (FORMAT.md §6a)."""
    if version == VERSION_V1:
        return (f"format v1 payloads carry no transfer tag (implicit tag 0x{0:016x}), but this decode expects "
                f"transfer tag 0x{expected:016x}: upgrade splitzip-vllm on the sending side")
    return (f"payload belongs to another transfer: its transfer tag is 0x{tag:016x}, expected 0x{expected:016x} "
            f"(another request, layer or an older allocation: a read after the prefill's lease expired?)")


def parse_header(buf: bytes | bytearray | memoryview, available: int | None = None,
                 tag: int | None = None) -> Header:
    """Parse and validate a header of version 1 or 2 (FORMAT.md §6 steps 1-3 for the header alone).

    ``available`` is the payload buffer length; when given, truncation is detected. ``tag``: the transfer tag the
    caller expects (FORMAT.md §6a); None skips that check (reading a length, not decoding).
    """
    if len(buf) < HEADER_BYTES_V1:
        raise PayloadError(f"payload truncated: {len(buf)} bytes, the header alone needs {HEADER_BYTES_V1}")
    raw = bytes(buf[:HEADER_BYTES])
    magic, version = raw[:4], raw[4]
    if magic != MAGIC:
        raise PayloadError(f"not a splitzip payload: magic {magic!r}, expected {MAGIC!r}")
    hb = header_bytes_of(version)
    if hb == 0:
        raise PayloadError(f"unsupported splitzip format version {version}; this build reads versions "
                           f"{VERSION_V1} and {VERSION} (upgrade splitzip-vllm on both prefill and decode)")
    if len(raw) < hb:
        raise PayloadError(f"payload truncated: {len(raw)} bytes, the header alone needs {hb}")
    raw = raw[:hb]
    crc = struct.unpack_from("<I", raw, _OFF_CRC)[0]
    if zlib.crc32(raw[:_OFF_CRC] + bytes(4) + raw[_OFF_CRC + 4:]) & 0xFFFFFFFF != crc:
        raise PayloadError("payload header is corrupted (header CRC mismatch)")
    if version == VERSION:
        (*fields, transfer_tag, ext) = _HEADER.unpack(raw)
    else:
        fields, transfer_tag, ext = list(_HEADER_V1.unpack(raw)), 0, bytes(EXT_BYTES)
    (_, _, dtype, mode, code_bits, n_codes, chunk_log2, reserved, _, codebook,
     n_elems, n_escapes, body_bytes, ca, cb) = fields
    hdr = Header(dtype, mode, code_bits, n_codes, chunk_log2, codebook, n_elems, n_escapes, body_bytes, ca, cb,
                 version, transfer_tag)
    _check_fields(hdr, reserved)
    if any(ext):
        raise PayloadError("payload header has non-zero ext field (reserved for later modes)")
    if tag is not None and transfer_tag != tag:
        raise PayloadError(tag_mismatch_message(version, transfer_tag, tag))
    if available is not None and available < hb + body_bytes:
        raise PayloadError(f"payload truncated: {available} bytes, header says {hb + body_bytes}")
    return hdr


def _check_fields(h: Header, reserved: int) -> None:
    """FORMAT.md §6 step 2: dtype, reserved field, mode and the mode's field combination."""
    dtype, mode, n_codes, n_elems, n_escapes, body_bytes = (h.dtype, h.mode, h.n_codes, h.n_elems, h.n_escapes,
                                                            h.body_bytes)
    if dtype not in _DTYPES:
        raise PayloadError(f"payload header names unknown dtype code {dtype}")
    if reserved != 0:
        raise PayloadError("payload header has non-zero reserved field")
    esize = element_size(dtype)
    if mode == MODE_RAW:
        if h.code_bits or n_codes or h.chunk_log2 or n_escapes or any(h.codebook):
            raise PayloadError("RAW payload header has coding fields set")
        if body_bytes != n_elems * esize:
            raise PayloadError(f"RAW payload body is {body_bytes} bytes but {n_elems} elements of size "
                               f"{esize} need {n_elems * esize}")
    elif mode == MODE_EXP4:
        if not exp4_allowed(dtype):
            raise PayloadError(f"EXP4 coding is not defined for dtype code {dtype}")
        if h.code_bits != CODE_BITS:
            raise PayloadError(f"unsupported code width {h.code_bits} bits (this build reads {CODE_BITS})")
        if not 1 <= n_codes <= MAX_CODES:
            raise PayloadError(f"codebook size {n_codes} outside 1..{MAX_CODES}")
        if not MIN_CHUNK_LOG2 <= h.chunk_log2 <= MAX_CHUNK_LOG2:
            raise PayloadError(f"chunk_log2 {h.chunk_log2} outside {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
        if n_escapes > n_elems:
            raise PayloadError(f"{n_escapes} escapes for only {n_elems} elements")
        if any(h.codebook[n_codes:]) or len(set(h.codebook[:n_codes])) != n_codes:
            raise PayloadError("payload codebook is malformed (duplicate or stray entries)")
        if body_bytes != Exp4Layout.compute(n_elems, h.chunk_log2, n_escapes).body_bytes:
            raise PayloadError("payload body length does not match its element and escape counts")
    else:
        raise PayloadError(f"unknown payload mode {mode}")


def payload_length(buf: bytes | bytearray | memoryview) -> int:
    """Total payload length read from a (validated) header."""
    return parse_header(buf).payload_bytes
