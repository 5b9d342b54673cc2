"""Round trips on every backend: all BF16 bit patterns, sizes, chunk sizes, layouts, RAW fallback, dtypes."""
from __future__ import annotations

import pytest
import torch

from splitzip_vllm.codec import Codebook, UnsupportedDtypeError, decode, encode
from splitzip_vllm.codec.format import HEADER_BYTES, MODE_EXP4, MODE_RAW, Exp4Layout, dtype_code, parse_header

from _codec_util import (BF16, all_bf16_patterns, api_name, assert_bitwise_equal, backend, backend_params, bits,
                         count_escapes, expected_payload_len, header_fields, realistic_bf16, top_codebook)

BACKENDS = backend_params()


def roundtrip(spec: str, device: str, data, cb: Codebook | None, chunk_log2: int = 12, out=None):
    """Encode then decode on one backend; returns (payload on CPU, decoded flat tensor on CPU)."""
    with backend(spec, device):
        name = api_name(spec)
        if isinstance(data, torch.Tensor):
            dev_data = data.to(device)
        else:
            dev_data = [d.to(device) for d in data]
        payload = encode(dev_data, cb, chunk_log2=chunk_log2, backend=name)
        assert payload.device.type == torch.device(device).type
        if out is None:
            dec = decode(payload, backend=name)
            return payload.cpu(), dec.reshape(-1).cpu()
        out = [o.to(device) for o in out]
        decode(payload, out, backend=name)
        return payload.cpu(), torch.cat([o.reshape(-1).cpu() for o in out])


def mode_of(payload: torch.Tensor) -> int:
    return parse_header(payload[:HEADER_BYTES].numpy().tobytes(), payload.numel()).mode


def with_filler(patterns: torch.Tensor, cb: Codebook, n_filler: int, seed: int = 0) -> torch.Tensor:
    """``patterns`` mixed (at random positions) with elements whose exponents are all in ``cb``."""
    g = torch.Generator().manual_seed(seed)
    ex = torch.tensor(cb.exponents, dtype=torch.int32)[torch.randint(0, cb.n_codes, (n_filler,), generator=g)]
    sm = torch.randint(0, 256, (n_filler,), generator=g, dtype=torch.int32)
    x = ((sm & 0x80) << 8) | (ex << 7) | (sm & 0x7F)
    filler = x.to(torch.int16).view(BF16)
    allx = torch.cat([patterns, filler])
    return allx[torch.randperm(allx.numel(), generator=g)]


# ---------------------------------------------------------------------------------------------------------------
# all 65,536 bit patterns
# ---------------------------------------------------------------------------------------------------------------
CODEBOOKS = {
    "full16": Codebook((127, 126, 125, 128, 124, 0, 255, 123, 129, 122, 121, 130, 120, 1, 254, 119), two_level=False),
    "five": Codebook((0, 255, 127, 126, 1), two_level=False),
    "one": Codebook((126,), two_level=False),
}


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("cb_name", list(CODEBOOKS))
def test_all_bf16_patterns_exp4(spec, device, cb_name):
    cb = CODEBOOKS[cb_name]
    pats = all_bf16_patterns()
    # 61440+ escaped patterns need enough coded filler for EXP4 to beat RAW
    x = with_filler(pats, cb, 458752, seed=len(cb_name))
    assert torch.equal(torch.unique(bits(x).to(torch.int32) & 0xFFFF), torch.arange(65536, dtype=torch.int32))
    payload, y = roundtrip(spec, device, x, cb, chunk_log2=12)
    assert mode_of(payload) == MODE_EXP4
    exp_len, _ = expected_payload_len(x, cb, 12)
    assert payload.numel() == exp_len
    h = header_fields(payload.numpy().tobytes())
    assert h["n_escapes"] == count_escapes(x, cb) == 65536 - 256 * cb.n_codes
    assert h["codebook"] == cb.table16()
    assert_bitwise_equal(y, x)


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_all_bf16_patterns_raw(spec, device):
    pats = all_bf16_patterns()
    for cb in (CODEBOOKS["full16"], None):
        payload, y = roundtrip(spec, device, pats, cb)
        assert mode_of(payload) == MODE_RAW
        assert payload.numel() == HEADER_BYTES + 2 * 65536
        assert_bitwise_equal(y, pats)
        # RAW body is the original bytes
        assert torch.equal(payload[HEADER_BYTES:], pats.view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# sizes and chunk sizes
# ---------------------------------------------------------------------------------------------------------------
SIZES = [0, 1, 2, 3, 31, 64, 100, 255, 256, 257, 1000, 4095, 4096, 4097, 12305, 40000]


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("chunk_log2", [8, 12, 15])
def test_sizes(spec, device, chunk_log2):
    for n in SIZES:
        x = realistic_bf16(n, seed=n, outlier_rate=0.01)
        cb = top_codebook(x) if n else Codebook((127,), two_level=False)
        payload, y = roundtrip(spec, device, x, cb, chunk_log2=chunk_log2)
        exp_len, exp_mode = expected_payload_len(x, cb, chunk_log2)
        assert payload.numel() == exp_len, n
        assert mode_of(payload) == exp_mode, n
        if n >= 1000:
            assert exp_mode == MODE_EXP4
        if n == 0:
            assert payload.numel() == HEADER_BYTES and y.numel() == 0
        h = header_fields(payload.numpy().tobytes())
        assert h["n_elems"] == n
        assert h["chunk_log2"] == (chunk_log2 if exp_mode == MODE_EXP4 else 0)
        assert_bitwise_equal(y, x)


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_checksum_fields(spec, device):
    """Header checksum = FORMAT.md §4 sums, computed here independently with int64 arithmetic."""
    for x, cb in ((realistic_bf16(9001, seed=3), None), (realistic_bf16(9001, seed=3), "top")):
        cb = top_codebook(x) if cb == "top" else cb
        payload, _ = roundtrip(spec, device, x, cb)
        b = x.view(torch.uint8).to(torch.int64)
        a = int(b.sum()) % 2**32
        w = torch.arange(1, b.numel() + 1, dtype=torch.int64)
        bb = int((w * b).sum()) % 2**32
        h = header_fields(payload.numpy().tobytes())
        assert (h["checksum_a"], h["checksum_b"]) == (a, bb)


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_escape_threshold_exact(spec, device):
    """EXP4 exactly while body < raw bytes; one more escape flips the payload to RAW (FORMAT.md §5.1)."""
    n, cl2 = 4096, 12
    m_max = max(m for m in range(n) if Exp4Layout.compute(n, cl2, m).body_bytes < 2 * n)
    cb = Codebook((127,), two_level=False)
    base = torch.full((n,), 1.5, dtype=BF16)  # exponent 127
    for m, mode in ((m_max, MODE_EXP4), (m_max + 1, MODE_RAW)):
        x = base.clone()
        pos = torch.randperm(n, generator=torch.Generator().manual_seed(m))[:m]
        x[pos] = 3.0  # exponent 128: escaped
        payload, y = roundtrip(spec, device, x, cb, chunk_log2=cl2)
        assert mode_of(payload) == mode
        assert payload.numel() == (HEADER_BYTES + Exp4Layout.compute(n, cl2, m).body_bytes if mode else
                                   HEADER_BYTES + 2 * n)
        assert_bitwise_equal(y, x)


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_all_escape_is_raw(spec, device):
    x = realistic_bf16(20000, seed=5)
    present = set(torch.unique(bits(x).to(torch.int32) >> 7 & 0xFF).tolist())
    absent = [e for e in range(256) if e not in present][:16]
    cb = Codebook(tuple(absent), two_level=False)
    assert count_escapes(x, cb) == x.numel()
    payload, y = roundtrip(spec, device, x, cb)
    assert mode_of(payload) == MODE_RAW
    assert payload.numel() == HEADER_BYTES + 2 * x.numel()
    h = header_fields(payload.numpy().tobytes())
    assert (h["code_bits"], h["n_codes"], h["chunk_log2"], h["n_escapes"], h["codebook"]) == (0, 0, 0, 0, bytes(16))
    assert_bitwise_equal(y, x)


# ---------------------------------------------------------------------------------------------------------------
# layouts: non-contiguous inputs, several regions
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,device", BACKENDS)
def test_noncontiguous_inputs(spec, device):
    base = realistic_bf16(64 * 301, seed=11).reshape(64, 301)
    cases = {
        "transposed": base.t(),
        "strided": base.reshape(-1)[::3],
        "column_slice": base[:, 5:200],
        "permuted3d": base[:, :300].reshape(8, 8, 300).permute(2, 0, 1),
        "expanded": base[0].reshape(1, -1).expand(7, -1),
    }
    for name, x in cases.items():
        assert not x.is_contiguous(), name
        cb = top_codebook(x)
        payload, y = roundtrip(spec, device, x, cb, chunk_log2=10)
        ref_payload, _ = roundtrip("reference", "cpu", x.contiguous(), cb, chunk_log2=10)
        assert torch.equal(payload, ref_payload), name
        assert_bitwise_equal(y, x.contiguous())


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("chunk_log2", [10, 12])
def test_multi_region(spec, device, chunk_log2):
    sizes = [0, 1, 4095, 257, 8192, 3, 0, 5000, 130, 4096]
    full = realistic_bf16(sum(sizes), seed=17, outlier_rate=0.01)
    cb = top_codebook(full)
    regions = list(torch.split(full, sizes))
    # destinations split differently from the sources
    dst_sizes = [7000, 0, 1, 9000, sum(sizes) - 16001]
    out = [torch.empty(s, dtype=BF16) for s in dst_sizes]
    payload, y = roundtrip(spec, device, regions, cb, chunk_log2=chunk_log2, out=out)
    single, _ = roundtrip(spec, device, full, cb, chunk_log2=chunk_log2)
    assert torch.equal(payload, single), "region split changed the payload"
    assert payload.numel() == expected_payload_len(full, cb, chunk_log2)[0]
    assert_bitwise_equal(y, full)


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_paged_blocks(spec, device):
    """Many small equal regions (KV blocks smaller than a chunk): every chunk straddles regions."""
    blocks = [realistic_bf16(16 * 2 * 40, seed=i) for i in range(23)]  # 1280 elements < 4096-element chunks
    cb = top_codebook(torch.cat(blocks))
    out = [torch.empty_like(b) for b in blocks]
    payload, y = roundtrip(spec, device, blocks, cb, chunk_log2=12, out=out)
    assert mode_of(payload) == MODE_EXP4
    assert_bitwise_equal(y, torch.cat(blocks))


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_decode_into_noncontiguous_destination(spec, device):
    x = realistic_bf16(40 * 50, seed=23)
    cb = top_codebook(x)
    with backend(spec, device):
        payload = encode(x.to(device), cb, chunk_log2=8, backend=api_name(spec))
        dst = torch.zeros(50, 40, dtype=BF16, device=device).t()  # shape (40, 50), non-contiguous
        decode(payload, dst, backend=api_name(spec))
    assert_bitwise_equal(dst.contiguous(), x.reshape(40, 50))


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------
RAW_DTYPES = [torch.float16, torch.float32, torch.uint8] + [
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("dtype", RAW_DTYPES, ids=str)
def test_other_dtypes_are_raw(spec, device, dtype):
    g = torch.Generator().manual_seed(1)
    n = 3001
    size = torch.empty(0, dtype=dtype).element_size()
    x = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.int32).to(torch.uint8).view(dtype)
    for cb in (None, Codebook((127, 126, 0), two_level=False)):
        payload, y = roundtrip(spec, device, x, cb)
        assert mode_of(payload) == MODE_RAW
        assert payload.numel() == HEADER_BYTES + n * size
        h = header_fields(payload.numpy().tobytes())
        assert h["dtype"] == dtype_code(dtype)
        assert y.dtype == dtype
        assert_bitwise_equal(y, x)


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.complex64, torch.bool], ids=str)
def test_unsupported_dtype(spec, device, dtype):
    x = torch.zeros(16, dtype=dtype, device=device)
    with backend(spec, device):
        with pytest.raises(UnsupportedDtypeError, match="cannot carry dtype"):
            encode(x, None, backend=api_name(spec))
        payload = encode(torch.zeros(16, dtype=BF16, device=device), None, backend=api_name(spec))
        with pytest.raises(UnsupportedDtypeError, match="cannot carry dtype"):
            decode(payload, torch.zeros(16, dtype=dtype, device=device), backend=api_name(spec))


@pytest.mark.parametrize("spec,device", BACKENDS)
def test_encode_into_given_buffer(spec, device):
    x = realistic_bf16(5000, seed=2)
    cb = top_codebook(x)
    from splitzip_vllm.codec.format import encode_capacity
    with backend(spec, device):
        out = torch.full((encode_capacity(5000, 2) + 100,), 0xEE, dtype=torch.uint8, device=device)
        p = encode(x.to(device), cb, backend=api_name(spec), out=out)
        assert p.data_ptr() == out.data_ptr()
        with pytest.raises(ValueError, match="at least"):
            encode(x.to(device), cb, backend=api_name(spec), out=out[:encode_capacity(5000, 2) - 1])
    ref = encode(x, cb, backend="reference")
    assert torch.equal(p.cpu(), ref)
