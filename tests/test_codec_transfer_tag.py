"""Transfer binding (FORMAT.md §6a) on every backend runnable here: a payload carries its encoder's transfer tag,
a decoder refuses a payload of another transfer before writing anything, format-v1 payloads (no tag) decode only
with tag 0, and a non-zero ``ext`` area is refused.

The v1 payloads under ``tests/data/format_v1/`` were written by the format-v1 reference encoder (commit 95245e0)
from the data that ``_v1_data()`` rebuilds; ``to_v1()`` (tests/_codec_util.py) makes more from v2 payloads.
CUDA-emulation and Triton (interpreter) runs of the same checks live in test_codec_cuda_emu.py and
test_codec_triton.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from splitzip_vllm.codec import PayloadError, decode, encode, reference
from splitzip_vllm.codec.format import HEADER_BYTES, HEADER_BYTES_V1, dtype_code, encode_capacity, parse_header

from _codec_util import (BF16, Canary, all_specs, api_name, assert_bitwise_equal, backend, backend_params,
                         header_fields, realistic_bf16, to_tensor, to_v1, top_codebook, with_fields)

BACKENDS = backend_params()
V1_DIR = Path(__file__).resolve().parent / "data" / "format_v1"
N = 5000
X = realistic_bf16(N, seed=41, outlier_rate=0.01)
CB = top_codebook(X, 14)
TAGS = (1, 0x0123_4567_89AB_CDEF, 2**63, 2**64 - 1)


def mismatch(tag: int, expected: int) -> str:
    return (f"payload belongs to another transfer: its transfer tag is 0x{tag:016x}, expected 0x{expected:016x} "
            f"(another request, layer or an older allocation: a read after the prefill's lease expired?)")


def v1_refused(expected: int) -> str:
    return (f"format v1 payloads carry no transfer tag (implicit tag 0x{0:016x}), but this decode expects "
            f"transfer tag 0x{expected:016x}: upgrade splitzip-vllm on the sending side")


def encode_with(spec: str, device: str, x: torch.Tensor, cb, tag: int, chunk_log2: int = 12) -> bytes:
    out = torch.full((encode_capacity(x.numel(), x.element_size()) + 16,), 0xEE, dtype=torch.uint8, device=device)
    with backend(spec, device) as be:
        be.encode_into([x.to(device)], dtype_code(x.dtype), cb, chunk_log2, out, tag)
    hdr = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes())
    return out[:hdr.payload_bytes].cpu().numpy().tobytes()


def decode_with(spec: str, device: str, payload: bytes, n: int, dtype: torch.dtype, tag: int) -> Canary:
    can = Canary([n // 3, 0, n - n // 3], dtype, device)
    with backend(spec, device) as be:
        be.decode_into(to_tensor(payload).to(device), can.regions, dtype_code(dtype), tag)
    return can


def expect_refused(spec: str, device: str, payload: bytes, n: int, dtype: torch.dtype, tag: int, msg: str) -> None:
    can = Canary([n // 3, 0, n - n // 3], dtype, device)
    with backend(spec, device) as be, pytest.raises(PayloadError, match=re.escape(msg)):
        be.decode_into(to_tensor(payload).to(device), can.regions, dtype_code(dtype), tag)
    assert can.untouched(), "a refused decode wrote into its destination"


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("mode", ["exp4", "raw"])
def test_other_transfer_refused_before_any_write(spec, device, mode):
    cb = CB if mode == "exp4" else None
    for tag in TAGS:
        p = encode_with(spec, device, X, cb, tag)
        assert header_fields(p)["transfer_tag"] == tag and header_fields(p)["mode"] == (mode == "exp4")
        for expected in (0, tag ^ 1, tag ^ (1 << 63)):
            expect_refused(spec, device, p, N, BF16, expected, mismatch(tag, expected))
    # an unbound (tag 0) payload is refused where a tag is expected
    p0 = encode_with(spec, device, X, cb, 0)
    expect_refused(spec, device, p0, N, BF16, 7, mismatch(0, 7))


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_same_tag_decodes_bitwise(spec, device):
    for tag in (0,) + TAGS:
        for cb in (CB, None):
            p = encode_with(spec, device, X, cb, tag)
            can = decode_with(spec, device, p, N, BF16, tag)
            can.check()
            assert_bitwise_equal(can.data(), X)
    # through the public api
    name = api_name(spec)
    p = encode(X.to(device), CB, backend=name, tag=TAGS[1])
    assert_bitwise_equal(decode(p, backend=name, tag=TAGS[1]), X)
    with pytest.raises(PayloadError, match="payload belongs to another transfer"):
        decode(p, backend=name)  # default tag 0
    assert_bitwise_equal(decode(encode(X.to(device), CB, backend=name), backend=name), X)


def test_cross_backend_tagged_payloads_byte_identical():
    for tag in TAGS:
        for cb in (CB, None):
            want = reference.encode([X], 1, cb, 12, tag).numpy().tobytes()
            assert len(want) == HEADER_BYTES + header_fields(want)["body_bytes"]
            for spec, device in all_specs():
                got = encode_with(spec, device, X, cb, tag)
                assert got == want, f"{spec}@{device} tag {tag:#x} differs from the reference"


# ---------------------------------------------------------------------------------------------------------------
# format v1
# ---------------------------------------------------------------------------------------------------------------
def _v1_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The data of the checked-in v1 payloads (a formula, no RNG): 600 bf16 values, 4 of them escapes."""
    b = [((i * 37) % 128) | ((118 + (i * 7) % 8) << 7) | ((i % 3 == 0) << 15) for i in range(600)]
    for i in (5, 77, 300, 599):
        b[i] = (b[i] & 0x807F) | (200 << 7)
    x = torch.tensor(b, dtype=torch.int32).to(torch.int16).view(BF16)
    return x, x[:40].view(torch.float16)


def _v1_fixtures() -> list[tuple[str, bytes, torch.Tensor]]:
    x, f = _v1_data()
    return [("file_exp4", (V1_DIR / "exp4_bf16_600.bin").read_bytes(), x),
            ("file_raw", (V1_DIR / "raw_fp16_40.bin").read_bytes(), f),
            ("to_v1_exp4", bytes(to_v1(reference.encode([X], 1, CB, 8))), X),
            ("to_v1_raw", bytes(to_v1(reference.encode([X], 1, None, 12))), X)]


def test_v1_fixtures_are_v1():
    for name, p, x in _v1_fixtures():
        h = parse_header(p, len(p), tag=0)
        assert (h.version, h.header_bytes, h.transfer_tag) == (1, HEADER_BYTES_V1, 0), name
        assert len(p) == HEADER_BYTES_V1 + h.body_bytes and h.n_elems == x.numel(), name
    assert header_fields(_v1_fixtures()[0][1])["mode"] == 1


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_v1_decodes_with_tag0_only(spec, device):
    for name, p, x in _v1_fixtures():
        can = decode_with(spec, device, p, x.numel(), x.dtype, 0)
        can.check()
        assert_bitwise_equal(can.data(), x)
        for expected in (1, 2**64 - 1):
            expect_refused(spec, device, p, x.numel(), x.dtype, expected, v1_refused(expected))
        # v1 checks still apply: its CRC covers 64 bytes, its body starts at 64
        bad = bytearray(p)
        bad[40] ^= 1
        expect_refused(spec, device, bytes(bad), x.numel(), x.dtype, 0, "header CRC mismatch")
        expect_refused(spec, device, p[:-1], x.numel(), x.dtype, 0, "payload truncated")


# ---------------------------------------------------------------------------------------------------------------
# ext and argument checks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,device", BACKENDS)
def test_nonzero_ext_refused(spec, device):
    for cb in (CB, None):
        p = reference.encode([X], 1, cb, 12, TAGS[0]).numpy().tobytes()
        for i in (0, 11, 23):
            ext = bytearray(24)
            ext[i] = 0x40
            bad = bytes(with_fields(p, ext=bytes(ext)))
            expect_refused(spec, device, bad, N, BF16, TAGS[0],
                           "payload header has non-zero ext field (reserved for later modes)")


@pytest.mark.parametrize("tag", [-1, 2**64, 1.0, True])
def test_bad_tag_arguments(tag):
    with pytest.raises(ValueError, match="transfer tag"):
        encode(X, CB, backend="reference", tag=tag)
    p = encode(X, CB, backend="reference")
    with pytest.raises(ValueError, match="transfer tag"):
        decode(p, backend="reference", tag=tag)


def test_parse_header_tag_none_skips_the_check():
    p = reference.encode([X], 1, CB, 12, TAGS[1]).numpy().tobytes()
    assert parse_header(p).transfer_tag == TAGS[1]
    assert parse_header(p, len(p), tag=TAGS[1]).payload_bytes == len(p)
    with pytest.raises(PayloadError, match=re.escape(mismatch(TAGS[1], 0))):
        parse_header(p, len(p), tag=0)
