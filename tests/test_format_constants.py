"""docs/FORMAT.md, format.py (Python/Triton) and csrc/include/splitzip/format.h (C++/CUDA) define the same wire
format: constants, header field offsets and sizes (version 2's transfer_tag and ext included), header packing."""
from __future__ import annotations

import dataclasses
import random
import re
import struct
import zlib
from pathlib import Path

import pytest

from splitzip_vllm.codec import format as fmt

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "splitzip" / "format.h"
SPEC = ROOT / "docs" / "FORMAT.md"

# header fields in wire order: FORMAT.md §1 name, format.h kOff constant
FIELDS = [("magic", "kOffMagic"), ("version", "kOffVersion"), ("dtype", "kOffDtype"), ("mode", "kOffMode"),
          ("code_bits", "kOffCodeBits"), ("n_codes", "kOffNCodes"), ("chunk_log2", "kOffChunkLog2"),
          ("reserved", "kOffReserved"), ("header_crc32", "kOffHeaderCrc"), ("codebook", "kOffCodebook"),
          ("n_elems", "kOffNElems"), ("n_escapes", "kOffNEscapes"), ("body_bytes", "kOffBodyBytes"),
          ("checksum_a", "kOffChecksumA"), ("checksum_b", "kOffChecksumB"), ("transfer_tag", "kOffTransferTag"),
          ("ext", "kOffExt")]


def _python_layout() -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of format.py's version-2 header struct."""
    codes = re.findall(r"(\d*)([a-zA-Z])", fmt._HEADER.format.lstrip("<"))
    assert len(codes) == len(FIELDS)
    out, off = {}, 0
    for (name, _), (count, code) in zip(FIELDS, codes):
        size = struct.calcsize("<" + count + code)
        out[name] = (off, size)
        off += size
    assert off == fmt.HEADER_BYTES
    return out


def _spec_layout() -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of the FORMAT.md §1 header table."""
    if not SPEC.is_file():
        pytest.skip("docs/FORMAT.md is not shipped with this install")
    text = SPEC.read_text()
    sec = text[text.index("## 1."):text.index("## 2.")]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", sec, re.M)
    return {name: (int(off), int(size)) for off, size, name in rows}


def _header_text() -> str:
    if not HEADER.is_file():
        pytest.skip("csrc/include/splitzip/format.h is not shipped with this install")
    return HEADER.read_text()


def _constexpr_ints(text: str) -> dict[str, int]:
    out = {}
    for name, val in re.findall(r"constexpr\s+(?:int|uint8_t|uint32_t)\s+(k\w+)\s*=\s*(0x[0-9A-Fa-f]+u?|\d+)\s*;",
                                text):
        out[name] = int(val.rstrip("u"), 0)
    return out


def test_header_text_constants_match_python():
    c = _constexpr_ints(_header_text())
    expected = {
        "kVersion": fmt.VERSION, "kHeaderBytes": fmt.HEADER_BYTES, "kCapacitySlack": fmt.CAPACITY_SLACK,
        "kVersionV1": fmt.VERSION_V1, "kHeaderBytesV1": fmt.HEADER_BYTES_V1, "kExtBytes": fmt.EXT_BYTES,
        "kModeRaw": fmt.MODE_RAW, "kModeExp4": fmt.MODE_EXP4, "kCodeBits": fmt.CODE_BITS,
        "kMaxCodes": fmt.MAX_CODES, "kMinChunkLog2": fmt.MIN_CHUNK_LOG2, "kMaxChunkLog2": fmt.MAX_CHUNK_LOG2,
        "kDefaultChunkLog2": fmt.DEFAULT_CHUNK_LOG2, "kSectionAlign": fmt.SECTION_ALIGN,
        "kMagicU32": int.from_bytes(fmt.MAGIC, "little"),
        "kModeExp2l": fmt.MODE_EXP2L, "kExp2lCodeBits": fmt.EXP2L_CODE_BITS,
        "kExp2lMaxPrimary": fmt.EXP2L_MAX_PRIMARY, "kExp2lMaxSecondary": fmt.EXP2L_MAX_SECONDARY,
        "kExp2lMarker": fmt.EXP2L_MARKER, "kExp2lSecEscape": fmt.EXP2L_SEC_ESCAPE,
        "kExtOffNSec": fmt.EXT_OFF_N_SEC, "kExtOffSecBytes": fmt.EXT_OFF_SEC_BYTES,
    }
    for k, v in expected.items():
        assert c.get(k) == v, f"{k}: format.h has {c.get(k)}, format.py has {v}"
    magic = re.search(r"kMagic\[4\]\s*=\s*\{([^}]*)\}", _header_text()).group(1)
    assert bytes(int(t.strip(), 0) for t in magic.split(",")) == fmt.MAGIC
    # dtype codes and element sizes
    dtype_codes = {k: v for k, v in c.items() if k.startswith("kDtype")}
    names = {"kDtypeUint8": "uint8", "kDtypeBFloat16": "bfloat16", "kDtypeFloat16": "float16",
             "kDtypeFloat32": "float32", "kDtypeFloat8E4M3FN": "float8_e4m3fn", "kDtypeFloat8E5M2": "float8_e5m2"}
    import torch
    for cname, tname in names.items():
        code = dtype_codes[cname]
        if hasattr(torch, tname):
            assert fmt.dtype_code(getattr(torch, tname)) == code, cname
    # header field offsets agree with the Python struct layout
    offs = {k: v for k, v in c.items() if k.startswith("kOff")}
    py = _python_layout()
    assert offs == {k: py[name][0] for name, k in FIELDS}
    assert fmt._HEADER.size == fmt.HEADER_BYTES and fmt._HEADER_V1.size == fmt.HEADER_BYTES_V1
    assert py["transfer_tag"][0] == fmt.HEADER_BYTES_V1  # version 2 appends to version 1's 64 bytes


def test_spec_header_table_matches_python():
    spec, py = _spec_layout(), _python_layout()
    assert spec == py, "FORMAT.md §1 table differs from format.py's header struct"
    assert py["ext"][1] == fmt.EXT_BYTES
    text = SPEC.read_text()
    assert f"# SplitZip-KV wire format, version {fmt.VERSION}" in text
    assert (f"`header_bytes` is **{fmt.HEADER_BYTES}** for version {fmt.VERSION} and **{fmt.HEADER_BYTES_V1}** for "
            f"version {fmt.VERSION_V1}") in " ".join(text.split())
    assert f"{fmt.HEADER_BYTES} + n*element_size + {fmt.CAPACITY_SLACK}" in text
    assert fmt.encode_capacity(10, 2) == fmt.HEADER_BYTES + 20 + fmt.CAPACITY_SLACK
    assert "## 6a. Transfer binding" in text


def test_spec_exp2l_matches_python():
    """FORMAT.md §3a: the ext table, code widths and marker/escape codes agree with format.py."""
    text = SPEC.read_text() if SPEC.is_file() else pytest.skip("docs/FORMAT.md is not shipped with this install")
    sec = text[text.index("## 3a."):text.index("## 4.")]
    rows = re.findall(r"^\|\s*(\d+) \((\d+)\)\s*\|\s*(\d+)\s*\|\s*`(\w+)`", sec, re.M)
    ext = {name: (int(off), int(hoff), int(size)) for off, hoff, size, name in rows}
    assert ext == {"sec_codebook": (0, 72, fmt.EXP2L_MAX_SECONDARY), "n_sec_codes": (fmt.EXT_OFF_N_SEC, 87, 1),
                   "sec_bytes": (fmt.EXT_OFF_SEC_BYTES, 88, 8)}
    assert sum(size for _, _, size in ext.values()) == fmt.EXT_BYTES
    assert all(off + 72 == hoff for off, hoff, _ in ext.values())
    assert f"`code_bits = {fmt.EXP2L_CODE_BITS}`" in sec and f"primary code `{fmt.EXP2L_MARKER}`" in sec
    assert f"secondary code `{fmt.EXP2L_SEC_ESCAPE}`" in sec and f"`mode` | `0` = RAW" in text
    assert "`2` = EXP2L" in text and fmt.MODE_EXP2L == 2
    assert fmt.MAX_CODEBOOK == fmt.EXP2L_MAX_PRIMARY + fmt.EXP2L_MAX_SECONDARY == 22


def _ext():
    try:
        import torch  # noqa: F401  (loads libtorch for the extension)
        from splitzip_vllm import _C_cpu  # type: ignore[attr-defined]
    except ImportError:
        pytest.skip("C++ extension not built")
    return _C_cpu


def test_extension_constants_match_python():
    c = _ext().format_constants()
    assert c["MAGIC"] == fmt.MAGIC
    for k in ("VERSION", "HEADER_BYTES", "CAPACITY_SLACK", "MODE_RAW", "MODE_EXP4", "CODE_BITS", "MAX_CODES",
              "MIN_CHUNK_LOG2", "MAX_CHUNK_LOG2", "DEFAULT_CHUNK_LOG2", "SECTION_ALIGN", "VERSION_V1",
              "HEADER_BYTES_V1", "EXT_BYTES", "MODE_EXP2L", "EXP2L_CODE_BITS", "EXP2L_MAX_PRIMARY",
              "EXP2L_MAX_SECONDARY", "EXP2L_MARKER", "EXP2L_SEC_ESCAPE", "MAX_CODEBOOK", "EXT_OFF_N_SEC",
              "EXT_OFF_SEC_BYTES"):
        assert c[k] == getattr(fmt, k), k
    py = _python_layout()
    assert (c["OFF_TRANSFER_TAG"], c["OFF_EXT"]) == (py["transfer_tag"][0], py["ext"][0])
    # format.h knows codes 0..5; format.py registers 4 and 5 only when torch has the float8 dtypes
    assert sorted(c["ELEMENT_SIZES"]) == [0, 1, 2, 3, 4, 5]
    assert set(fmt._DTYPES) <= set(c["ELEMENT_SIZES"])
    for code in fmt._DTYPES:
        assert c["ELEMENT_SIZES"][code] == fmt.element_size(code), code
        assert c["EXP4_ALLOWED"][code] == fmt.exp4_allowed(code), code


def test_extension_header_pack_layout_crc_match_python():
    ext = _ext()
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([0, 1, 15, 16, 17, 255, 4096, 4097, rng.randrange(1 << 40)])
        cl2 = rng.randrange(8, 16)
        m = rng.randrange(n + 1) if n < 1 << 20 else rng.randrange(1 << 20)
        lay = fmt.Exp4Layout.compute(n, cl2, m)
        assert ext.exp4_layout(n, cl2, m) == (lay.n_chunks, lay.off_codes, lay.off_counts, lay.off_pos, lay.off_exp,
                                              lay.body_bytes)
        sb = rng.randrange(n + 1) if n < 1 << 20 else rng.randrange(1 << 20)
        l2 = fmt.Exp2lLayout.compute(n, cl2, m, sb)
        assert ext.exp2l_layout(n, cl2, m, sb) == (l2.n_chunks, l2.off_codes, l2.off_scounts, l2.off_sec,
                                                   l2.off_counts, l2.off_pos, l2.off_exp, l2.body_bytes)
        cb = bytes(rng.sample(range(256), 5)) + bytes(11)
        tag = rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
        h = fmt.Header(1, 1, 4, 5, cl2, cb, n, m, lay.body_bytes, rng.randrange(2**32), rng.randrange(2**32),
                       transfer_tag=tag)
        args = (h.dtype, h.mode, h.code_bits, h.n_codes, h.chunk_log2, h.codebook, h.n_elems, h.n_escapes,
                h.body_bytes, h.checksum_a, h.checksum_b)
        packed = ext.pack_header(*args, tag=tag)
        assert packed == h.pack() and len(packed) == fmt.HEADER_BYTES
        assert fmt.parse_header(packed, tag=tag) == h
        # version 1: 64 bytes, no tag; format.py reads it with the implicit tag 0
        v1 = ext.pack_header(*args, tag=tag, version=fmt.VERSION_V1)
        assert len(v1) == fmt.HEADER_BYTES_V1 and v1[4] == 1
        assert v1[:12] == packed[:4] + b"\x01" + packed[5:12] and v1[16:] == packed[16:64]
        assert fmt.parse_header(v1, tag=0) == dataclasses.replace(h, version=1, transfer_tag=0)
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        assert ext.crc32(data) == zlib.crc32(data) & 0xFFFFFFFF


def test_status_enum_matches_python():
    """format.h enum SzStatus and format.py Status number the checks alike; every status has one message."""
    text = _header_text()
    body = text[text.index("enum SzStatus {"):]
    body = body[:body.index("};")]
    c_codes = {name: int(v) for name, v in re.findall(r"SZ_(?:ERR_)?(\w+)\s*=\s*(\d+)", body)}
    assert c_codes.pop("NUM_STATUS") == len(fmt.Status)
    assert c_codes == {s.name: int(s) for s in fmt.Status}
    assert set(fmt.STATUS_MESSAGES) == set(fmt.Status) - {fmt.Status.OK}
    assert fmt.status_message(len(fmt.Status)) == f"unknown splitzip decode status {len(fmt.Status)}"
    assert _constexpr_ints(text)["kLutEscape"] == fmt.LUT_ESCAPE


def _random_exp2l_fields(rng: random.Random, n: int, cl2: int):
    """(code_bits, n_codes, codebook, n_escapes, body_bytes, ext) of a mostly valid EXP2L header (FORMAT.md §3a)."""
    code_bits = 3 if rng.random() < 0.9 else rng.randrange(9)
    n_codes = rng.randrange(1, 8) if rng.random() < 0.9 else rng.randrange(12)
    n_sec = rng.randrange(16) if rng.random() < 0.9 else rng.randrange(14, 40)
    exps = rng.sample(range(256), 31)
    cb = bytearray(exps[i] if i < n_codes else 0 for i in range(16))
    sec = bytearray(exps[16 + i] if i < min(n_sec, 15) else 0 for i in range(15))
    r = rng.random()
    if r < 0.05:
        sec[0] = cb[0]  # duplicate across the tables
    elif r < 0.1:
        sec[14] = rng.randrange(1, 256)  # stray secondary entry
    m = rng.randrange(n + 1) if n < 1 << 40 else rng.randrange(1 << 40)
    sb = rng.randrange(n + 1) if n < 1 << 40 else rng.randrange(1 << 40)
    if rng.random() < 0.05:
        sb = n + 1
    body = fmt.Exp2lLayout.compute(n, cl2, m, sb).body_bytes if 8 <= cl2 <= 15 else rng.randrange(1 << 64)
    ext = bytes(sec) + bytes([n_sec % 256]) + struct.pack("<Q", sb)
    return code_bits, n_codes, bytes(cb), m, body, ext


def _random_header(rng: random.Random) -> tuple[bytes, int, int]:
    """(header bytes, payload length, expected tag): a mostly plausible header of version 1 or 2, often
    corrupted (bit flips, resealed field changes, truncations, other tags)."""
    v1 = rng.random() < 0.25
    dtype, mode = rng.randrange(7), rng.randrange(4)  # 2 = EXP2L, 3 = unknown
    n = rng.randrange(100000) if rng.random() < 0.9 else rng.randrange(1 << 64) >> rng.randrange(64)
    code_bits = n_codes = cl2 = m = 0
    cb = bytes(16)
    esize = {0: 1, 1: 2, 2: 2, 3: 4, 4: 1, 5: 1}.get(dtype, 1)
    body = n * esize
    if mode == 1 or rng.random() < 0.2:
        code_bits = 4 if rng.random() < 0.9 else rng.randrange(9)
        n_codes = rng.randrange(1, 17) if rng.random() < 0.9 else rng.randrange(20)
        cl2 = rng.randrange(8, 16) if rng.random() < 0.9 else rng.randrange(20)
        cb = bytearray(100 + i if i < n_codes else 0 for i in range(16))
        if rng.random() < 0.1:
            cb[rng.randrange(16)] = rng.randrange(256)
        cb = bytes(cb)
        m = rng.randrange(n + 1) if n < 1 << 40 else rng.randrange(1 << 40)
        if rng.random() < 0.05:
            m = n + 1
        body = fmt.Exp4Layout.compute(n, cl2, m).body_bytes if 8 <= cl2 <= 15 else rng.randrange(1 << 64)
    ext = bytes(fmt.EXT_BYTES)
    if mode == 2 and rng.random() < 0.8:
        cl2 = rng.randrange(8, 16) if rng.random() < 0.95 else rng.randrange(20)
        code_bits, n_codes, cb, m, body, ext = _random_exp2l_fields(rng, n, cl2)
    if rng.random() < 0.05:
        body += 1
    tag = 0 if v1 or rng.random() < 0.3 else rng.randrange(1 << 64)
    fields = [fmt.MAGIC, 1 if v1 else 2, dtype, mode, code_bits, n_codes, cl2, 0, 0, cb, n, m, body % (1 << 64),
              rng.randrange(1 << 32), rng.randrange(1 << 32)]
    if rng.random() < 0.03:
        fields[7] = rng.randrange(1, 100)  # reserved
    raw = bytearray(fmt._HEADER_V1.pack(*fields) if v1 else fmt._HEADER.pack(*fields, tag, ext))
    if not v1 and rng.random() < 0.03:
        raw[72 + rng.randrange(24)] = rng.randrange(1, 256)
    seal = lambda: struct.pack_into("<I", raw, 12, zlib.crc32(bytes(raw[:12]) + bytes(4) + bytes(raw[16:])))  # noqa
    seal()
    kind = rng.randrange(8)
    if kind == 1:
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == 2:
        raw[4] = rng.choice([rng.randrange(256), 3 - raw[4]])
        raw = raw + bytes(96 - len(raw)) if raw[4] == 2 else raw[:64] if raw[4] == 1 else raw
        seal()
    elif kind == 3:
        raw[rng.randrange(4)] ^= 0x20
    elif kind == 4:
        raw[5 + rng.randrange(5)] = rng.randrange(256)
        seal()
    available = len(raw) + body
    if kind == 5:
        available = rng.randrange(len(raw))
    elif kind == 6 and 0 < body < 1 << 62:
        available = len(raw) + rng.randrange(body)
    available = min(available, (1 << 64) - 1)
    expected = tag if rng.random() < 0.85 else rng.choice([0, rng.randrange(1 << 64)])
    return bytes(raw[:min(available, len(raw))]), available, expected


def test_validator_agrees_with_python():
    """format.h validate_header (bitwise and table CRC, as the CPU and CUDA decoders run it) gives the status of
    the Python oracle format.parse_header on random and corrupted headers of versions 1 and 2."""
    ext = _ext()
    rng = random.Random(7)
    seen = set()
    for _ in range(20000):
        raw, available, tag = _random_header(rng)
        try:
            fmt.parse_header(raw, available, tag)
            want = fmt.Status.OK
        except fmt.PayloadError as e:
            want = e.status
        seen.add(want)
        for use_table in (False, True):
            got = ext.validate_header(raw, available, tag, use_table)
            assert got == want, (raw.hex(), available, tag, got, want)
    assert seen == set(fmt.HEADER_STATUSES) | {fmt.Status.OK}, set(fmt.HEADER_STATUSES) - seen
