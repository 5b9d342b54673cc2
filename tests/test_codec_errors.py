"""Corrupted, truncated and mismatched payloads raise PayloadError naming the problem (FORMAT.md §6), on every
backend, and a fuzz test: decoders either raise PayloadError or return the original bits, never crash, never
read past the payload buffer and never write outside their destination."""
from __future__ import annotations

import ctypes
import mmap
import random
import struct

import pytest
import torch

from splitzip_vllm.codec import Codebook, PayloadError, encode
from splitzip_vllm.codec.format import HEADER_BYTES, Exp4Layout, dtype_code

from _codec_util import (BF16, HDR, Canary, assert_bitwise_equal, backend, backend_params, bits, header_fields,
                         realistic_bf16, reseal, to_tensor, to_v1, top_codebook, with_fields)

BACKENDS = backend_params()


# ---------------------------------------------------------------------------------------------------------------
# fixtures: good payloads (made by the reference backend, so every backend is judged on the same bytes)
# ---------------------------------------------------------------------------------------------------------------
N = 3000
CL2 = 8  # 12 chunks, the last one partial (3000 = 11*256 + 184)


def _exp4_payload() -> tuple[bytes, torch.Tensor, Codebook]:
    x = realistic_bf16(N, seed=7, outlier_rate=0.02)
    cb = top_codebook(x, 12)
    p = encode(x, cb, chunk_log2=CL2, backend="reference")
    h = header_fields(p.numpy().tobytes())
    assert h["mode"] == 1 and h["n_escapes"] > 20
    return p.numpy().tobytes(), x, cb


EXP4, X, CB = _exp4_payload()
RAW = encode(X, None, backend="reference").numpy().tobytes()
LAY = Exp4Layout.compute(N, CL2, header_fields(EXP4)["n_escapes"])


def decode_with(spec: str, device: str, payload: bytes | bytearray, sizes=(N,), dtype=BF16) -> Canary:
    """Decode through the backend object itself (no Python-side header check first) into canary regions."""
    can = Canary(list(sizes), dtype, device)
    with backend(spec, device) as be:
        be.decode_into(to_tensor(payload).to(device), can.regions, dtype_code(dtype))
    return can


def expect_error(spec, device, payload, match, sizes=(N,), dtype=BF16) -> None:
    can = None
    with pytest.raises(PayloadError, match=match):
        can = decode_with(spec, device, payload, sizes, dtype)
    assert can is None


def body_off(section: str) -> int:
    return HEADER_BYTES + {"sm": 0, "codes": LAY.off_codes, "counts": LAY.off_counts, "pos": LAY.off_pos,
                           "exp": LAY.off_exp}[section]


def build_exp4(n: int, cl2: int, cb: bytes, counts: list[int], pos: list[int], exps: list[int],
               sm_fill: int = 0x3C, code_fill: int = 0) -> bytearray:
    """Hand-made EXP4 payload (checksum left 0: only used for errors detected before the checksum)."""
    m = len(pos)
    lay = Exp4Layout.compute(n, cl2, m)
    assert len(counts) == lay.n_chunks
    body = bytearray(lay.body_bytes)
    body[:n] = bytes([sm_fill]) * n
    body[lay.off_codes:lay.off_codes + (n + 1) // 2] = bytes([code_fill]) * ((n + 1) // 2)
    body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks] = struct.pack(f"<{lay.n_chunks}H", *counts)
    body[lay.off_pos:lay.off_pos + 2 * m] = struct.pack(f"<{m}H", *pos)
    body[lay.off_exp:lay.off_exp + m] = bytes(exps)
    hdr = HDR.pack(b"SZKV", 2, 1, 1, 4, len(cb), cl2, 0, 0, cb + bytes(16 - len(cb)), n, m, lay.body_bytes, 0, 0,
                   0, bytes(24))
    return reseal(bytearray(hdr) + body)


# ---------------------------------------------------------------------------------------------------------------
# sanity: the good payloads decode everywhere
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,device", BACKENDS)
def test_good_payloads_decode(spec, device):
    for p in (EXP4, RAW, EXP4 + b"\x99" * 40):  # trailing bytes after the payload are ignored
        can = decode_with(spec, device, p, sizes=(1000, 0, 2000))
        can.check()
        assert_bitwise_equal(can.data(), X)


# ---------------------------------------------------------------------------------------------------------------
# header (FORMAT.md §6 steps 1-2)
# ---------------------------------------------------------------------------------------------------------------
HEADER_CASES = {
    "short0": (b"", "payload truncated"),
    "short1": (EXP4[:1], "payload truncated"),
    "short63": (EXP4[:63], "payload truncated: 63 bytes, the header alone needs 64"),
    "short95": (EXP4[:95], "payload truncated: 95 bytes, the header alone needs 96"),
    "magic": (b"SZKX" + EXP4[4:], "not a splitzip payload"),
    "magic_zero": (bytes(64), "not a splitzip payload"),
    "version3": (with_fields(EXP4, version=3), "unsupported splitzip format version 3; this build reads versions 1 "
                                               "and 2"),
    "version0": (with_fields(EXP4, version=0), "unsupported splitzip format version 0"),
    "crc_field": (bytes(with_fields(EXP4, seal=False, crc=header_fields(EXP4)["crc"] ^ 1)), "header CRC"),
    "crc_unsealed_field": (bytes(with_fields(EXP4, seal=False, n_elems=N + 1)), "header CRC"),
    "crc_checksum_bits": (bytes(with_fields(EXP4, seal=False, checksum_b=1)), "header CRC"),
    "dtype_unknown": (with_fields(EXP4, dtype=9), "unknown dtype code 9"),
    "reserved": (with_fields(EXP4, reserved=1), "non-zero reserved"),
    "mode": (with_fields(EXP4, mode=3), "unknown payload mode 3"),
    "mode_exp2l_fields": (with_fields(EXP4, mode=2), "unsupported code width 4 bits"),
    "ext_first": (with_fields(EXP4, ext=b"\x01" + bytes(23)), "non-zero ext field"),
    "ext_last": (with_fields(RAW, ext=bytes(23) + b"\x80"), "non-zero ext field"),
    "crc_ext": (bytes(with_fields(EXP4, seal=False, ext=bytes(23) + b"\x80")), "header CRC"),  # CRC covers 96 bytes
    "tag": (with_fields(EXP4, transfer_tag=5), "payload belongs to another transfer: its transfer tag is "
                                               "0x0000000000000005, expected 0x0000000000000000"),
    "crc_tag": (bytes(with_fields(EXP4, seal=False, transfer_tag=1 << 63)), "header CRC"),
    "raw_code_bits": (with_fields(RAW, code_bits=4), "RAW payload header has coding fields set"),
    "raw_n_codes": (with_fields(RAW, n_codes=3), "RAW payload header has coding fields set"),
    "raw_chunk": (with_fields(RAW, chunk_log2=12), "RAW payload header has coding fields set"),
    "raw_escapes": (with_fields(RAW, n_escapes=1), "RAW payload header has coding fields set"),
    "raw_codebook": (with_fields(RAW, codebook=b"\x01" + bytes(15)), "RAW payload header has coding fields set"),
    "raw_body_len": (with_fields(RAW, body_bytes=2 * N - 2), f"RAW payload body is {2 * N - 2} bytes"),
    "raw_body_len_huge": (with_fields(RAW, body_bytes=2**64 - 2), "RAW payload body is"),
    "exp4_fp16": (with_fields(EXP4, dtype=2), "EXP4 coding is not defined for dtype code 2"),
    "code_bits": (with_fields(EXP4, code_bits=8), "unsupported code width 8"),
    "n_codes0": (with_fields(EXP4, n_codes=0), "codebook size 0 outside 1..16"),
    "n_codes17": (with_fields(EXP4, n_codes=17), "codebook size 17 outside 1..16"),
    "chunk7": (with_fields(EXP4, chunk_log2=7), "chunk_log2 7 outside 8..15"),
    "chunk16": (with_fields(EXP4, chunk_log2=16), "chunk_log2 16 outside 8..15"),
    "escapes_gt_n": (with_fields(EXP4, n_escapes=N + 1), f"{N + 1} escapes for only {N} elements"),
    "codebook_dup": (with_fields(EXP4, codebook=bytes([CB.exponents[0]]) * 2 + CB.table16()[2:]),
                     "codebook is malformed"),
    "codebook_stray": (with_fields(EXP4, codebook=CB.table16()[:15] + b"\x07"), "codebook is malformed"),
    "body_len": (with_fields(EXP4, body_bytes=len(EXP4) - HEADER_BYTES - 1), "body length does not match"),
    "escapes_vs_body": (with_fields(EXP4, n_escapes=header_fields(EXP4)["n_escapes"] + 1),
                        "body length does not match"),
    "huge_n": (with_fields(EXP4, n_elems=2**62, body_bytes=Exp4Layout.compute(2**62, CL2, 0).body_bytes,
                           n_escapes=0), f"payload truncated: {len(EXP4)} bytes, header says"),
    "huge_raw_n": (with_fields(RAW, n_elems=2**61, body_bytes=2**62), f"payload truncated: {len(RAW)} bytes, header says"),
    "overflow_raw_n": (with_fields(RAW, n_elems=2**63 + 4), f"need {2**64 + 8}"),
    "overflow_exp4_n": (with_fields(EXP4, n_elems=2**64 - 1), "body length does not match"),
}


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_errors(spec, device, case):
    payload, match = HEADER_CASES[case]
    expect_error(spec, device, payload, match)


# ---------------------------------------------------------------------------------------------------------------
# truncation and destination mismatch (step 3)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,device", BACKENDS)
def test_truncated_everywhere(spec, device):
    lengths = sorted(set(list(range(0, 70)) + list(range(64, len(EXP4), 97)) + [len(EXP4) - 1, len(EXP4) - 2]))
    for L in lengths:
        expect_error(spec, device, EXP4[:L], "payload truncated")
    for L in (0, 63, 64, 65, 64 + N, len(RAW) - 1):
        expect_error(spec, device, RAW[:L], "payload truncated")


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_destination_mismatch(spec, device):
    expect_error(spec, device, EXP4, f"payload holds {N} elements but the destination has {N - 1}", sizes=(N - 1,))
    expect_error(spec, device, EXP4, f"payload holds {N} elements but the destination has {N + 1}",
                 sizes=(N, 1))
    expect_error(spec, device, EXP4, "payload holds dtype code 1 but the destination has dtype code 2",
                 dtype=torch.float16)
    expect_error(spec, device, RAW, "payload holds dtype code 1 but the destination has dtype code 0",
                 sizes=(2 * N,), dtype=torch.uint8)
    f32 = encode(torch.zeros(N // 2, dtype=torch.float32), None, backend="reference").numpy().tobytes()
    expect_error(spec, device, f32, "payload holds dtype code 3 but the destination has dtype code 1")


# ---------------------------------------------------------------------------------------------------------------
# escape tables (step 4) and checksum (step 5)
# ---------------------------------------------------------------------------------------------------------------
def _patch(payload: bytes, off: int, data: bytes) -> bytearray:
    b = bytearray(payload)
    b[off:off + len(data)] = data
    return b


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_escape_table_errors(spec, device):
    counts = list(struct.unpack_from(f"<{LAY.n_chunks}H", EXP4, body_off("counts")))
    m = sum(counts)
    # chunk counts that do not sum to n_escapes
    bumped = counts[:]
    bumped[3] += 1
    p = _patch(EXP4, body_off("counts"), struct.pack(f"<{len(bumped)}H", *bumped))
    expect_error(spec, device, p, f"chunk counts sum to {m + 1}, header says {m}")
    p = _patch(EXP4, body_off("counts"), struct.pack("<H", 0xFFFF))
    expect_error(spec, device, p, "chunk counts sum to")
    # a chunk claiming more escapes than it has elements (sum kept equal to n_escapes)
    p = build_exp4(512, 8, b"\x7f", [257, 0], list(range(256)) + [0], [1] * 257)
    expect_error(spec, device, p, "a chunk claims more escapes than elements", sizes=(512,))
    p = build_exp4(300, 8, b"\x7f", [0, 45], list(range(45)), [1] * 45)  # last chunk holds 44 elements
    expect_error(spec, device, p, "a chunk claims more escapes than elements", sizes=(300,))
    # escape positions outside their chunk
    p = build_exp4(512, 8, b"\x7f", [1, 1], [256, 3], [1, 1])
    expect_error(spec, device, p, "escape position lies outside its chunk", sizes=(512,))
    p = build_exp4(300, 8, b"\x7f", [1, 1], [5, 44], [1, 1])
    expect_error(spec, device, p, "escape position lies outside its chunk", sizes=(300,))
    p = build_exp4(300, 8, b"\x7f", [0, 1], [0xFFFF], [1])
    expect_error(spec, device, p, "escape position lies outside its chunk", sizes=(300,))
    # in the real payload: the last chunk (184 elements) gets a position of 184
    last_first = sum(counts[:-1])
    assert counts[-1] > 0
    p = _patch(EXP4, body_off("pos") + 2 * last_first, struct.pack("<H", 184))
    expect_error(spec, device, p, "escape position lies outside its chunk")


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_escape_positions_strictly_increase(spec, device):
    """Duplicate or descending escape positions within a chunk are refused by every decoder (FORMAT.md §6 step 4):
    no element is patched twice; a position outside its chunk is the lower status and wins."""
    order = "escape positions within a chunk are not strictly ascending"
    expect_error(spec, device, build_exp4(512, 8, b"\x7f", [2, 0], [5, 5], [1, 2]), order, sizes=(512,))
    expect_error(spec, device, build_exp4(512, 8, b"\x7f", [0, 3], [1, 9, 3], [1, 2, 3]), order, sizes=(512,))
    expect_error(spec, device, build_exp4(512, 8, b"\x7f", [2, 1], [5, 5, 256], [1, 1, 1]),
                 "escape position lies outside its chunk", sizes=(512,))
    # positions are compared within a chunk only: a smaller position in the next chunk is fine (checksum 0 here)
    expect_error(spec, device, build_exp4(512, 8, b"\x7f", [1, 1], [200, 3], [1, 1]), "checksum mismatch",
                 sizes=(512,))
    # in the real payload: the second escape of a chunk repeats the first one's position
    counts = list(struct.unpack_from(f"<{LAY.n_chunks}H", EXP4, body_off("counts")))
    c = next(i for i, k in enumerate(counts) if k >= 2)
    k0 = sum(counts[:c])
    first = struct.unpack_from("<H", EXP4, body_off("pos") + 2 * k0)[0]
    expect_error(spec, device, _patch(EXP4, body_off("pos") + 2 * (k0 + 1), struct.pack("<H", first)), order)


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("where", ["sm0", "sm_last", "codes", "codes_last", "pos", "exp", "raw_body", "cksum_a",
                                   "cksum_b"])
def test_checksum_detects(spec, device, where):
    m = header_fields(EXP4)["n_escapes"]
    if where == "sm0":
        p = _patch(EXP4, body_off("sm"), bytes([EXP4[body_off("sm")] ^ 0x01]))
    elif where == "sm_last":
        p = _patch(EXP4, body_off("sm") + N - 1, bytes([EXP4[body_off("sm") + N - 1] ^ 0x80]))
    elif where == "codes":
        o = body_off("codes") + 100
        p = _patch(EXP4, o, bytes([EXP4[o] ^ 0x11]))
    elif where == "codes_last":
        o = body_off("codes") + (N + 1) // 2 - 1
        p = _patch(EXP4, o, bytes([EXP4[o] ^ 0x10]))
    elif where == "pos":
        # move the first escape to another position in its chunk (still in range, still before the next one)
        o = body_off("pos")
        old, nxt = struct.unpack_from("<HH", EXP4, o)
        assert old > 0 or nxt > 1
        p = _patch(EXP4, o, struct.pack("<H", old - 1 if old > 0 else old + 1))
    elif where == "exp":
        o = body_off("exp") + m - 1
        p = _patch(EXP4, o, bytes([EXP4[o] ^ 0x04]))
    elif where == "raw_body":
        p = _patch(RAW, HEADER_BYTES + 777, bytes([RAW[HEADER_BYTES + 777] ^ 0x40]))
    elif where == "cksum_a":
        p = with_fields(EXP4, checksum_a=header_fields(EXP4)["checksum_a"] + 1)
    else:
        p = with_fields(RAW, checksum_b=header_fields(RAW)["checksum_b"] ^ 0x100)
    expect_error(spec, device, p, "checksum mismatch")


# ---------------------------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------------------------
class GuardedPayload:
    """A payload buffer whose last byte sits right before a PROT_NONE page: reading past it faults."""

    PAGE = mmap.PAGESIZE

    def __init__(self, capacity: int):
        self.data_pages = (capacity + self.PAGE - 1) // self.PAGE + 1
        self.mm = mmap.mmap(-1, (self.data_pages + 1) * self.PAGE)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        addr = ctypes.addressof(self._anchor)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        rc = libc.mprotect(ctypes.c_void_p(addr + self.data_pages * self.PAGE), self.PAGE, 0)  # PROT_NONE
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        self.end = self.data_pages * self.PAGE

    def place(self, payload: bytes | bytearray) -> torch.Tensor:
        off = self.end - len(payload)
        self.mm[off:self.end] = bytes(payload)
        if not payload:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=len(payload), offset=off)


def _fuzz_bases():
    out = []
    for seed, n, cl2, rate in ((1, 3000, 8, 0.02), (2, 2049, 9, 0.005), (3, 700, 8, 0.05)):
        x = realistic_bf16(n, seed=seed, outlier_rate=rate)
        cb = top_codebook(x, 12 if seed != 3 else 5)
        p = encode(x, cb, chunk_log2=cl2, backend="reference").numpy().tobytes()
        out.append((p, x))
    x = realistic_bf16(500, seed=4)
    out.append((encode(x, None, backend="reference").numpy().tobytes(), x))
    f = torch.randn(300, generator=torch.Generator().manual_seed(5))
    out.append((encode(f, None, backend="reference").numpy().tobytes(), f))
    out.append((bytes(to_v1(out[0][0])), out[0][1]))  # format v1 (64-byte header, body at 64)
    assert header_fields(out[0][0])["mode"] == 1 and header_fields(out[2][0])["mode"] == 1
    return out


FUZZ_BASES = _fuzz_bases()
FUZZ_ITERS = {"cpu": 4000, "cpu-scalar": 1500, "reference": 500}
FUZZ_DEFAULT_ITERS = 400  # other backends; cuda gets more below, triton on CPU (interpreter mode) less
FUZZ_INTERPRETED_ITERS = 150


def _mutate(rng: random.Random, payload: bytes) -> bytearray:
    b = bytearray(payload)
    if len(b) < HEADER_BYTES:  # already truncated below a header: byte-level changes only
        if b and rng.random() < 0.5:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        else:
            b += bytes([rng.randrange(256)])
        return b
    h = header_fields(payload)
    hb = 64 if payload[4] == 1 else HEADER_BYTES  # the payload's own header length (version 1 or 2)
    kind = rng.randrange(10)
    if kind in (5, 6, 7) and (h["mode"] != 1 or h["n_escapes"] > h["n_elems"] or h["n_elems"] > 2**40 or not
                              8 <= h["chunk_log2"] <= 15 or
                              Exp4Layout.compute(h["n_elems"], h["chunk_log2"], h["n_escapes"]).body_bytes + hb >
                              len(b)):
        kind = 0  # the header no longer describes this buffer: targeted surgery makes no sense
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # random overwrites anywhere
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # truncation
        b = b[:rng.randrange(len(b))]
    elif kind == 3:  # header byte overwrite (transfer tag and ext too), re-sealed so the checks behind the CRC run
        i = rng.choice([k for k in range(4, hb) if not 12 <= k < 16])
        b[i] = rng.choice([0, 1, 2, 255, b[i] ^ 1, rng.randrange(256)])
        reseal(b)
    elif kind == 4:  # header counts, re-sealed, sometimes with body_bytes made consistent
        f = rng.choice(["n_elems", "n_escapes", "body_bytes"])
        d = rng.choice([-2, -1, 1, 2, 256, -256, 2**32, 2**63])
        fields = {f: (h[f] + d) % 2**64}
        if h["mode"] == 1 and f != "body_bytes" and rng.random() < 0.7:
            n = fields.get("n_elems", h["n_elems"])
            m = fields.get("n_escapes", h["n_escapes"])
            if m <= n < 2**40:
                fields["body_bytes"] = Exp4Layout.compute(n, h["chunk_log2"], m).body_bytes
        b = with_fields(b, **fields)
    elif kind == 5 and h["mode"] == 1:  # targeted body section overwrite
        lay = Exp4Layout.compute(h["n_elems"], h["chunk_log2"], h["n_escapes"])
        lo, hi = rng.choice([(0, lay.off_codes), (lay.off_codes, lay.off_counts), (lay.off_counts, lay.off_pos),
                             (lay.off_pos, lay.off_exp), (lay.off_exp, lay.body_bytes)])
        if hi > lo:
            i = hb + rng.randrange(lo, hi)
            b[i] = rng.choice([0, 0xFF, b[i] ^ 0x01, rng.randrange(256)])
    elif kind == 6 and h["mode"] == 1:  # escape table games keeping the counts sum
        lay = Exp4Layout.compute(h["n_elems"], h["chunk_log2"], h["n_escapes"])
        o = hb + lay.off_counts
        counts = list(struct.unpack_from(f"<{lay.n_chunks}H", b, o))
        i, j = rng.randrange(len(counts)), rng.randrange(len(counts))
        if rng.random() < 0.5:
            counts[i], counts[j] = counts[j], counts[i]
        else:
            t = rng.randint(0, counts[i])
            counts[i] -= t
            counts[j] += t
        struct.pack_into(f"<{lay.n_chunks}H", b, o, *counts)
    elif kind == 7 and h["mode"] == 1 and h["n_escapes"]:  # escape position / exponent
        lay = Exp4Layout.compute(h["n_elems"], h["chunk_log2"], h["n_escapes"])
        k = rng.randrange(h["n_escapes"])
        if rng.random() < 0.5:
            struct.pack_into("<H", b, hb + lay.off_pos + 2 * k, rng.choice([0, 1, 255, 256, 4095, 0xFFFF,
                                                                              rng.randrange(65536)]))
        else:
            b[hb + lay.off_exp + k] = rng.randrange(256)
    elif kind == 8:  # trailing garbage (must still decode)
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # combination: header field + body byte
        b = _mutate(rng, bytes(_mutate(rng, payload)))
    return b


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_fuzz(spec, device):
    iters = FUZZ_ITERS.get(spec, 2000 if device == "cuda" else
                           FUZZ_INTERPRETED_ITERS if spec == "triton" else FUZZ_DEFAULT_ITERS)
    rng = random.Random(12345)
    guard = GuardedPayload(max(len(p) for p, _ in FUZZ_BASES) + 4096) if device == "cpu" else None
    outcomes = {"error": 0, "ok": 0}
    messages: dict[str, int] = {}
    with backend(spec, device) as be:
        for it in range(iters):
            base, x = FUZZ_BASES[rng.randrange(len(FUZZ_BASES))]
            mutated = _mutate(rng, base)
            n = x.numel()
            cut = sorted(rng.sample(range(n + 1), 2)) if rng.random() < 0.5 else [n, n]
            sizes = [cut[0], cut[1] - cut[0], n - cut[1]]
            can = Canary(sizes, x.dtype, device)
            payload = guard.place(mutated) if guard is not None else to_tensor(mutated).to(device)
            try:
                be.decode_into(payload, can.regions, dtype_code(x.dtype))
            except PayloadError as e:
                outcomes["error"] += 1
                key = str(e).split(":")[0][:60]
                messages[key] = messages.get(key, 0) + 1
            else:
                outcomes["ok"] += 1
                got = can.data()
                if not torch.equal(bits(got), bits(x)):
                    raise AssertionError(f"iteration {it}: decode accepted a corrupted payload and returned "
                                         f"different data (mutation of {len(base)}-byte payload)")
            can.check()
    assert outcomes["error"] > iters // 3, outcomes
    assert outcomes["ok"] > iters // 50, outcomes
    # the fuzzer reached the deep checks, not only the header CRC
    assert any("checksum" in k for k in messages), messages
    assert any("escape table" in k for k in messages), messages


@pytest.mark.parametrize("spec,device", [p for p in BACKENDS if p.values[1] == "cpu"])
def test_guard_page_catches_overread(spec, device):
    """Self-test of the fuzz harness: the guard page really sits right after the placed payload."""
    guard = GuardedPayload(8192)
    t = guard.place(EXP4)
    assert t.numel() == len(EXP4) and bytes(t.numpy()) == EXP4
    can = decode_with(spec, device, EXP4)
    assert_bitwise_equal(can.data(), X)
    with backend(spec, device) as be:
        can2 = Canary([N], BF16)
        be.decode_into(t, can2.regions, 1)  # decoding from the guarded buffer works
        assert_bitwise_equal(can2.data(), X)
