"""format.py (Python/Triton) and csrc/include/splitzip/format.h (C++/CUDA) define the same wire format."""
from __future__ import annotations

import random
import re
import zlib
from pathlib import Path

import pytest

from splitzip_vllm.codec import format as fmt

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "splitzip" / "format.h"


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
        "kModeRaw": fmt.MODE_RAW, "kModeExp4": fmt.MODE_EXP4, "kCodeBits": fmt.CODE_BITS,
        "kMaxCodes": fmt.MAX_CODES, "kMinChunkLog2": fmt.MIN_CHUNK_LOG2, "kMaxChunkLog2": fmt.MAX_CHUNK_LOG2,
        "kDefaultChunkLog2": fmt.DEFAULT_CHUNK_LOG2, "kSectionAlign": fmt.SECTION_ALIGN,
        "kMagicU32": int.from_bytes(fmt.MAGIC, "little"),
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
    py_offsets = {"kOffMagic": 0, "kOffVersion": 4, "kOffDtype": 5, "kOffMode": 6, "kOffCodeBits": 7,
                  "kOffNCodes": 8, "kOffChunkLog2": 9, "kOffReserved": 10, "kOffHeaderCrc": 12, "kOffCodebook": 16,
                  "kOffNElems": 32, "kOffNEscapes": 40, "kOffBodyBytes": 48, "kOffChecksumA": 56,
                  "kOffChecksumB": 60}
    assert offs == py_offsets
    assert fmt._HEADER.size == fmt.HEADER_BYTES


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
              "MIN_CHUNK_LOG2", "MAX_CHUNK_LOG2", "DEFAULT_CHUNK_LOG2", "SECTION_ALIGN"):
        assert c[k] == getattr(fmt, k), k
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
        cb = bytes(rng.sample(range(256), 5)) + bytes(11)
        h = fmt.Header(1, 1, 4, 5, cl2, cb, n, m, lay.body_bytes, rng.randrange(2**32), rng.randrange(2**32))
        assert ext.pack_header(h.dtype, h.mode, h.code_bits, h.n_codes, h.chunk_log2, h.codebook, h.n_elems,
                               h.n_escapes, h.body_bytes, h.checksum_a, h.checksum_b) == h.pack()
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        assert ext.crc32(data) == zlib.crc32(data) & 0xFFFFFFFF
