"""SplitZip-KV wire format v2 (reads v1 too): constants, header, section layout and validation.

The format is specified in ``docs/FORMAT.md``; this module is its Python twin (the C++/CUDA twin is
``csrc/include/splitzip/format.h``). Nothing here touches tensor data.

Validation verdicts are :class:`Status` codes (the twin of format.h ``enum SzStatus``); :data:`STATUS_MESSAGES` is
the ONE place their messages are worded, for every backend: the Python validator (:func:`parse_header`, the
oracle), and the C++ / CUDA decoders, which report a status code (:func:`decode_error_message`).
"""
from __future__ import annotations

import enum
import struct
import zlib
from collections import defaultdict
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
MODE_EXP2L = 2              # two-level exponent code (FORMAT.md §3a)
CODE_BITS = 4
MAX_CODES = 16
EXP2L_CODE_BITS = 3         # primary code width
EXP2L_MAX_PRIMARY = 7       # primary entries; primary code 7 is the marker "secondary code follows"
EXP2L_MAX_SECONDARY = 15    # secondary entries; secondary code 15 is the escape
EXP2L_MARKER = 7
EXP2L_SEC_ESCAPE = 15
MAX_CODEBOOK = EXP2L_MAX_PRIMARY + EXP2L_MAX_SECONDARY   # 22 exponents in a codebook
EXT_OFF_N_SEC = 15          # ext layout in EXP2L: sec_codebook[15], n_sec_codes (u8), sec_bytes (u64)
EXT_OFF_SEC_BYTES = 16
MIN_CHUNK_LOG2 = 8
MAX_CHUNK_LOG2 = 15
DEFAULT_CHUNK_LOG2 = 12
SECTION_ALIGN = 16
LUT_ESCAPE = 0x80           # escape marker of a 256-entry exponent -> code table (format.h kLutEscape)

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


class Status(enum.IntEnum):
    """Decode verdicts (FORMAT.md §6) in the order of the checks: the lowest code of several problems is
    reported. Twin of ``enum SzStatus`` in format.h (tests/test_format_constants.py)."""
    OK = 0
    TRUNCATED_HEADER = 1
    MAGIC = 2
    VERSION = 3
    HEADER_CRC = 4
    DTYPE = 5
    RESERVED = 6
    RAW_FIELDS = 7
    RAW_BODY = 8
    EXP4_DTYPE = 9
    CODE_BITS = 10
    N_CODES = 11
    CHUNK_LOG2 = 12
    ESCAPES_GT_N = 13
    CODEBOOK = 14
    EXP4_BODY = 15
    MODE = 16
    EXT = 17
    TAG = 18
    TAG_V1 = 19
    TRUNCATED_BODY = 20
    DST_DTYPE = 21
    DST_COUNT = 22
    ESC_SUM = 23
    ESC_COUNT = 24
    ESC_POS = 25
    ESC_ORDER = 26
    CHECKSUM = 27
    # EXP2L (FORMAT.md §3a, §6): appended so the codes above keep their numbers
    EXP2L_VERSION = 28     # header: EXP2L in a version-1 header
    SEC_N_CODES = 29       # header: n_sec_codes > 15
    SEC_BYTES_GT_N = 30    # header: sec_bytes > n_elems
    SEC_COUNT = 31         # a secondary count exceeds its chunk length
    SEC_BYTES = 32         # the secondary counts need another number of bytes than sec_bytes (aux = their need)
    SEC_MARKERS = 33       # a chunk holds another number of marker codes than its count (aux = the chunk)
    MODE_UNSUPPORTED = 34  # a valid EXP2L payload given to a backend without EXP2L kernels (none in this release)


# FORMAT.md §6 steps 1-3, the header alone
HEADER_STATUSES = frozenset([*range(Status.TRUNCATED_HEADER, Status.TRUNCATED_BODY + 1), Status.EXP2L_VERSION,
                             Status.SEC_N_CODES, Status.SEC_BYTES_GT_N])

# The message of every status ({fields} come from the header, the destination and the decode's arguments).
STATUS_MESSAGES: dict[Status, str] = {
    Status.TRUNCATED_HEADER: "payload truncated: {available} bytes, the header alone needs {need}",
    Status.MAGIC: "not a splitzip payload: magic {magic!r}, expected " + repr(MAGIC),
    Status.VERSION: ("unsupported splitzip format version {version}; this build reads versions "
                     f"{VERSION_V1} and {VERSION} (upgrade splitzip-vllm on both prefill and decode)"),
    Status.HEADER_CRC: "payload header is corrupted (header CRC mismatch)",
    Status.DTYPE: "payload header names unknown dtype code {dtype}",
    Status.RESERVED: "payload header has non-zero reserved field",
    Status.RAW_FIELDS: "RAW payload header has coding fields set",
    Status.RAW_BODY: "RAW payload body is {body_bytes} bytes but {n_elems} elements of size {esize} need {need}",
    Status.EXP4_DTYPE: "{mode_name} coding is not defined for dtype code {dtype}",
    Status.CODE_BITS: "unsupported code width {code_bits} bits (this build reads {want})",
    Status.N_CODES: "codebook size {n_codes} outside 1..{max_codes}",
    Status.CHUNK_LOG2: "chunk_log2 {chunk_log2} outside " + f"{MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}",
    Status.ESCAPES_GT_N: "{n_escapes} escapes for only {n_elems} elements",
    Status.CODEBOOK: "payload codebook is malformed (duplicate or stray entries)",
    Status.EXP4_BODY: "payload body length does not match its element and escape counts",
    Status.MODE: "unknown payload mode {mode}",
    Status.EXT: "payload header has non-zero ext field (reserved for later modes)",
    Status.TAG: ("payload belongs to another transfer: its transfer tag is {tag_hex}, expected {expected_hex} "
                 "(another request, layer or an older allocation: a read after the prefill's lease expired?)"),
    Status.TAG_V1: ("format v1 payloads carry no transfer tag (implicit tag 0x" + "0" * 16 + "), but this decode "
                    "expects transfer tag {expected_hex}: upgrade splitzip-vllm on the sending side"),
    Status.TRUNCATED_BODY: "payload truncated: {available} bytes, header says {need}",
    Status.DST_DTYPE: "payload holds dtype code {dtype} but the destination has dtype code {dst_dtype}",
    Status.DST_COUNT: "payload holds {n_elems} elements but the destination has {dst_n}",
    Status.ESC_SUM: "escape table is corrupted: chunk counts sum to {aux}, header says {n_escapes}",
    Status.ESC_COUNT: "escape table is corrupted: a chunk claims more escapes than elements",
    Status.ESC_POS: "escape table is corrupted: an escape position lies outside its chunk",
    Status.ESC_ORDER: "escape table is corrupted: escape positions within a chunk are not strictly ascending",
    Status.CHECKSUM: ("payload checksum mismatch: the decoded data differs from what was encoded "
                      "(corrupted in transit or in memory)"),
    Status.EXP2L_VERSION: "EXP2L payloads need format version 2, got {version}",
    Status.SEC_N_CODES: "secondary codebook size {n_sec} outside 0.." + str(EXP2L_MAX_SECONDARY),
    Status.SEC_BYTES_GT_N: "secondary code section of {sec_bytes} bytes for only {n_elems} elements",
    Status.SEC_COUNT: "secondary code table is corrupted: a chunk claims more secondary codes than elements",
    Status.SEC_BYTES: "secondary code table is corrupted: chunk counts need {aux} bytes, header says {sec_bytes}",
    Status.SEC_MARKERS: ("secondary code table is corrupted: the marker codes of chunk {aux} do not match its "
                         "count"),
    Status.MODE_UNSUPPORTED: ("EXP2L payloads (mode 2) are not implemented by the {backend} codec backend yet; "
                              "decode them with the cpu or reference backend"),
}


def status_message(status: int, **fields) -> str:
    """The message of ``status``; fields it names but that are not given read ``?``."""
    try:
        template = STATUS_MESSAGES[Status(status)]
    except ValueError:
        return f"unknown splitzip decode status {status}"
    return template.format_map(defaultdict(lambda: "?", fields))


class PayloadError(ValueError):
    """A payload is corrupted, truncated, of another format version, or does not fit its destination.

    ``status`` is the :class:`Status` of the failed check (None for problems outside the status table)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = Status(status) if status is not None else None

    @classmethod
    def of(cls, status: int, **fields) -> "PayloadError":
        return cls(status_message(status, **fields), status)


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
class Exp2lLayout:
    """Byte offsets of the EXP2L sections (FORMAT.md §3a), relative to the body start."""
    n: int
    chunk_log2: int
    n_escapes: int
    sec_bytes: int
    n_chunks: int
    off_codes: int
    off_scounts: int
    off_sec: int
    off_counts: int
    off_pos: int
    off_exp: int
    body_bytes: int

    @staticmethod
    def compute(n: int, chunk_log2: int, n_escapes: int, sec_bytes: int) -> "Exp2lLayout":
        c = 1 << chunk_log2
        n_chunks = (n + c - 1) // c
        off_codes = align16(n)
        off_scounts = align16(off_codes + 24 * ((n + 63) // 64))
        off_sec = align16(off_scounts + 2 * n_chunks)
        off_counts = align16(off_sec + sec_bytes)
        off_pos = align16(off_counts + 2 * n_chunks)
        off_exp = align16(off_pos + 2 * n_escapes)
        return Exp2lLayout(n, chunk_log2, n_escapes, sec_bytes, n_chunks, off_codes, off_scounts, off_sec,
                           off_counts, off_pos, off_exp, off_exp + n_escapes)


def exp2l_ext(sec_codebook: bytes, sec_bytes: int) -> bytes:
    """The 24-byte ``ext`` field of an EXP2L header (FORMAT.md §3a)."""
    return (bytes(sec_codebook) + bytes(EXP2L_MAX_SECONDARY - len(sec_codebook)) + bytes([len(sec_codebook)])
            + struct.pack("<Q", sec_bytes))


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
    ext: bytes = bytes(EXT_BYTES)

    @property
    def n_sec_codes(self) -> int:
        return self.ext[EXT_OFF_N_SEC]

    @property
    def sec_codebook(self) -> bytes:
        return self.ext[:EXP2L_MAX_SECONDARY]

    @property
    def sec_bytes(self) -> int:
        return struct.unpack_from("<Q", self.ext, EXT_OFF_SEC_BYTES)[0]

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
                  bytes(self.ext)]
        fields[8] = zlib.crc32(_HEADER.pack(*fields)) & 0xFFFFFFFF
        return _HEADER.pack(*fields)


def tag_mismatch_message(version: int, tag: int, expected: int) -> str:
    """Why a payload of transfer ``tag`` (format ``version``) is refused where ``expected`` is (FORMAT.md §6a)."""
    return status_message(Status.TAG_V1 if version == VERSION_V1 else Status.TAG, tag_hex=f"0x{tag:016x}",
                          expected_hex=f"0x{expected:016x}")


def parse_header(buf: bytes | bytearray | memoryview, available: int | None = None,
                 tag: int | None = None) -> Header:
    """Parse and validate a header of version 1 or 2 (FORMAT.md §6 steps 1-3 for the header alone): the oracle of
    format.h ``validate_header``; raises :class:`PayloadError` with the failed check's ``status``.

    ``available`` is the payload buffer length; when given, truncation is detected. ``tag``: the transfer tag the
    caller expects (FORMAT.md §6a); None skips that check (reading a length, not decoding).
    """
    if len(buf) < HEADER_BYTES_V1:
        raise PayloadError.of(Status.TRUNCATED_HEADER, available=len(buf), need=HEADER_BYTES_V1)
    raw = bytes(buf[:HEADER_BYTES])
    magic, version = raw[:4], raw[4]
    if magic != MAGIC:
        raise PayloadError.of(Status.MAGIC, magic=magic)
    hb = header_bytes_of(version)
    if hb == 0:
        raise PayloadError.of(Status.VERSION, version=version)
    if len(raw) < hb:
        raise PayloadError.of(Status.TRUNCATED_HEADER, available=len(raw), need=hb)
    raw = raw[:hb]
    crc = struct.unpack_from("<I", raw, _OFF_CRC)[0]
    if zlib.crc32(raw[:_OFF_CRC] + bytes(4) + raw[_OFF_CRC + 4:]) & 0xFFFFFFFF != crc:
        raise PayloadError.of(Status.HEADER_CRC)
    if version == VERSION:
        (*fields, transfer_tag, ext) = _HEADER.unpack(raw)
    else:
        fields, transfer_tag, ext = list(_HEADER_V1.unpack(raw)), 0, bytes(EXT_BYTES)
    (_, _, dtype, mode, code_bits, n_codes, chunk_log2, reserved, _, codebook,
     n_elems, n_escapes, body_bytes, ca, cb) = fields
    hdr = Header(dtype, mode, code_bits, n_codes, chunk_log2, codebook, n_elems, n_escapes, body_bytes, ca, cb,
                 version, transfer_tag, ext)
    _check_fields(hdr, reserved)
    if mode != MODE_EXP2L and any(ext):
        raise PayloadError.of(Status.EXT)
    if tag is not None and transfer_tag != tag:
        raise PayloadError(tag_mismatch_message(version, transfer_tag, tag),
                           Status.TAG_V1 if version == VERSION_V1 else Status.TAG)
    if available is not None and available < hb + body_bytes:
        raise PayloadError.of(Status.TRUNCATED_BODY, available=available, need=hb + body_bytes)
    return hdr


def _check_fields(h: Header, reserved: int) -> None:
    """FORMAT.md §6 step 2: dtype, reserved field, mode and the mode's field combination."""
    if h.dtype not in _DTYPES:
        raise PayloadError.of(Status.DTYPE, dtype=h.dtype)
    if reserved != 0:
        raise PayloadError.of(Status.RESERVED)
    if h.mode == MODE_RAW:
        if h.code_bits or h.n_codes or h.chunk_log2 or h.n_escapes or any(h.codebook):
            raise PayloadError.of(Status.RAW_FIELDS)
        esize = element_size(h.dtype)
        if h.body_bytes != h.n_elems * esize:
            raise PayloadError.of(Status.RAW_BODY, body_bytes=h.body_bytes, n_elems=h.n_elems, esize=esize,
                                  need=h.n_elems * esize)
    elif h.mode in (MODE_EXP4, MODE_EXP2L):
        _check_coded(h)
    else:
        raise PayloadError.of(Status.MODE, mode=h.mode)


def check_destination(hdr: Header, dtype: int, n_elems: int) -> None:
    """FORMAT.md §6 step 3, the destination: its dtype code and element count must be the header's."""
    if hdr.dtype != dtype:
        raise PayloadError.of(Status.DST_DTYPE, dtype=hdr.dtype, dst_dtype=dtype)
    if hdr.n_elems != n_elems:
        raise PayloadError.of(Status.DST_COUNT, n_elems=hdr.n_elems, dst_n=n_elems)


def decode_error_message(status: int, aux: int, header: bytes, payload_len: int, dtype: int, n_elems: int,
                         tag: int = 0) -> str | None:
    """Message of the :class:`PayloadError` for the ``status`` a C++ / CUDA decoder reported (None for OK).

    ``header`` holds the payload's first ``min(96, payload_len)`` bytes, ``tag`` is the transfer tag the decode
    expected, ``aux`` the status's extra value (ESC_SUM: the chunk counts' sum). The message is the reference
    decoder's for the same payload, destination and tag: the fields come from re-validating the header here.
    """
    if status == Status.OK:
        return None
    try:
        hdr = parse_header(header, payload_len, tag)
        check_destination(hdr, dtype, n_elems)
    except PayloadError as e:
        if e.status == status:
            return str(e)
        return f"{status_message(status)} (status {status}; the header check here says: {e})"
    if status in HEADER_STATUSES or status in (Status.DST_DTYPE, Status.DST_COUNT):
        return f"{status_message(status)} (status {status}, but the header checks pass here)"
    return status_message(status, aux=aux, n_escapes=hdr.n_escapes, sec_bytes=hdr.sec_bytes, backend="cuda")


def _check_coded(h: Header) -> None:
    """FORMAT.md §6 step 2 for EXP4 and EXP2L headers."""
    two = h.mode == MODE_EXP2L
    name = "EXP2L" if two else "EXP4"
    if not exp4_allowed(h.dtype):
        raise PayloadError.of(Status.EXP4_DTYPE, dtype=h.dtype, mode_name=name)
    if two and h.version != VERSION:
        raise PayloadError.of(Status.EXP2L_VERSION, version=h.version)
    bits, max_codes = (EXP2L_CODE_BITS, EXP2L_MAX_PRIMARY) if two else (CODE_BITS, MAX_CODES)
    if h.code_bits != bits:
        raise PayloadError.of(Status.CODE_BITS, code_bits=h.code_bits, want=bits)
    if not 1 <= h.n_codes <= max_codes:
        raise PayloadError.of(Status.N_CODES, n_codes=h.n_codes, max_codes=max_codes)
    if not MIN_CHUNK_LOG2 <= h.chunk_log2 <= MAX_CHUNK_LOG2:
        raise PayloadError.of(Status.CHUNK_LOG2, chunk_log2=h.chunk_log2)
    if h.n_escapes > h.n_elems:
        raise PayloadError.of(Status.ESCAPES_GT_N, n_escapes=h.n_escapes, n_elems=h.n_elems)
    entries = list(h.codebook[:h.n_codes])
    stray = any(h.codebook[h.n_codes:])
    if two:
        if h.n_sec_codes > EXP2L_MAX_SECONDARY:
            raise PayloadError.of(Status.SEC_N_CODES, n_sec=h.n_sec_codes)
        entries += list(h.sec_codebook[:h.n_sec_codes])
        stray = stray or any(h.sec_codebook[h.n_sec_codes:])
    if stray or len(set(entries)) != len(entries):
        raise PayloadError.of(Status.CODEBOOK)
    if two:
        if h.sec_bytes > h.n_elems:
            raise PayloadError.of(Status.SEC_BYTES_GT_N, sec_bytes=h.sec_bytes, n_elems=h.n_elems)
        want = Exp2lLayout.compute(h.n_elems, h.chunk_log2, h.n_escapes, h.sec_bytes).body_bytes
    else:
        want = Exp4Layout.compute(h.n_elems, h.chunk_log2, h.n_escapes).body_bytes
    if h.body_bytes != want:
        raise PayloadError.of(Status.EXP4_BODY)


def payload_length(buf: bytes | bytearray | memoryview) -> int:
    """Total payload length read from a (validated) header."""
    return parse_header(buf).payload_bytes
