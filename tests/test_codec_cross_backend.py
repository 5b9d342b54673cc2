"""Every backend writes the reference backend's payload byte for byte, and decodes every other backend's."""
from __future__ import annotations

import itertools

import pytest
import torch

from splitzip_vllm.codec import Codebook, decode, encode
from splitzip_vllm.codec.format import HEADER_BYTES

from _codec_util import (BF16, CUDA, all_specs, api_name, assert_bitwise_equal, backend, backend_params,
                         header_fields, random_bits, realistic_bf16, top_codebook)

BACKENDS = backend_params()


def _case(name: str):
    """(regions, codebook, chunk_log2) for a named data case."""
    if name == "random_bits_top16":  # uniformly random bits: top-16 codebook covers ~1/16 -> RAW
        x = random_bits(20011, seed=1)
        return [x], top_codebook(x), 12
    if name == "random_bits_nocb":
        return [random_bits(5000, seed=2)], None, 12
    if name == "randn_small_scale":
        x = (torch.randn(60000, generator=torch.Generator().manual_seed(3)) * 0.02).to(BF16)
        return [x], top_codebook(x), 12
    if name == "real_like_outliers":
        x = realistic_bf16(70001, seed=4, scale=0.1, outlier_rate=0.003)
        return [x], top_codebook(x), 12
    if name == "real_like_chunk8":
        x = realistic_bf16(30000, seed=5, outlier_rate=0.01)
        return [x], top_codebook(x), 8
    if name == "real_like_chunk15":
        x = realistic_bf16(100000, seed=6, outlier_rate=0.001)
        return [x], top_codebook(x), 15
    if name == "small_codebook":
        x = realistic_bf16(20000, seed=7, scale=1.0)
        return [x], top_codebook(x, 6), 10
    if name == "multi_region":
        sizes = [1, 4096, 0, 333, 12000, 7, 2048]
        x = realistic_bf16(sum(sizes), seed=8)
        return list(torch.split(x, sizes)), top_codebook(x), 11
    if name == "kv_blocks":  # 16-token blocks of (16, 2 heads, 64 dims): 2048 elements, chunk 4096
        blocks = [realistic_bf16(16 * 2 * 64, seed=100 + i, scale=0.5) for i in range(9)]
        return blocks, top_codebook(torch.cat(blocks)), 12
    if name == "fp16_raw":
        x = torch.randn(3333, generator=torch.Generator().manual_seed(9)).half()
        return [x], Codebook((15,), two_level=False), 12
    if name == "fp32_raw":
        x = torch.randn(1234, generator=torch.Generator().manual_seed(10))
        return [x], None, 12
    raise KeyError(name)


CASES = ["random_bits_top16", "random_bits_nocb", "randn_small_scale", "real_like_outliers", "real_like_chunk8",
         "real_like_chunk15", "small_codebook", "multi_region", "kv_blocks", "fp16_raw", "fp32_raw"]
_REF_CACHE: dict[str, torch.Tensor] = {}


def reference_payload(case: str) -> torch.Tensor:
    if case not in _REF_CACHE:
        regions, cb, cl2 = _case(case)
        _REF_CACHE[case] = encode(regions, cb, chunk_log2=cl2, backend="reference").clone()
    return _REF_CACHE[case]


def encode_with(spec: str, device: str, regions, cb, cl2) -> torch.Tensor:
    with backend(spec, device):
        return encode([r.to(device) for r in regions], cb, chunk_log2=cl2, backend=api_name(spec)).cpu()


@pytest.mark.parametrize("spec,device", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_payload_bytes_equal_reference(spec, device, case):
    regions, cb, cl2 = _case(case)
    ref = reference_payload(case)
    got = encode_with(spec, device, regions, cb, cl2)
    assert got.numel() == ref.numel(), f"payload length {got.numel()} != reference {ref.numel()}"
    if not torch.equal(got, ref):
        diff = (got != ref).nonzero().reshape(-1)
        i = int(diff[0])
        where = "header" if i < HEADER_BYTES else f"body byte {i - HEADER_BYTES}"
        raise AssertionError(f"{diff.numel()} bytes differ from the reference payload, first in the {where}: "
                             f"{int(got[i])} != {int(ref[i])}; header {header_fields(ref.numpy().tobytes())}")
    # mode sanity per case
    mode = header_fields(ref.numpy().tobytes())["mode"]
    assert mode == (0 if case in ("random_bits_top16", "random_bits_nocb", "fp16_raw", "fp32_raw") else 1)


_PAIR_CASES = ["real_like_outliers", "multi_region", "random_bits_top16", "fp16_raw"]


def _pairs():
    specs = all_specs()
    out = []
    for (enc_spec, enc_dev), (dec_spec, dec_dev) in itertools.product(specs, specs):
        out.append(pytest.param(enc_spec, enc_dev, dec_spec, dec_dev,
                                id=f"{enc_spec}@{enc_dev}->{dec_spec}@{dec_dev}"))
    if not CUDA:
        out.append(pytest.param("cuda", "cuda", "cuda", "cuda", id="cuda->cuda",
                                marks=pytest.mark.skip(reason="CUDA unavailable")))
    return out


@pytest.mark.parametrize("enc_spec,enc_dev,dec_spec,dec_dev", _pairs())
def test_decode_matrix(enc_spec, enc_dev, dec_spec, dec_dev):
    for case in _PAIR_CASES:
        regions, cb, cl2 = _case(case)
        payload = encode_with(enc_spec, enc_dev, regions, cb, cl2)
        full = torch.cat([r.reshape(-1) for r in regions])
        # decode into regions split differently from the encoder's
        n = full.numel()
        sizes = [n // 3, 0, n - n // 3 - n // 5, n // 5]
        with backend(dec_spec, dec_dev):
            out = [torch.empty(s, dtype=full.dtype, device=dec_dev) for s in sizes]
            decode(payload.to(dec_dev), out, backend=api_name(dec_spec))
        assert_bitwise_equal(torch.cat([o.cpu() for o in out]), full)


@pytest.mark.parametrize("spec,device", [p for p in BACKENDS if p.values[0] in ("cpu", "cpu-scalar")])
def test_cpu_unaligned_and_large(spec, device):
    """C++ paths: region pointers at odd offsets, ~1M elements, both kernels equal to the reference."""
    big = realistic_bf16(1_000_003 + 64, seed=42, outlier_rate=0.004)
    for off in (0, 1, 3, 31):
        x = big[off:off + 1_000_003]
        cb = top_codebook(x)
        got = encode_with(spec, device, [x], cb, 12)
        key = ("unaligned", off)
        if key not in _BIG_REF:
            _BIG_REF[key] = encode(x, cb, chunk_log2=12, backend="reference").clone()
        ref = _BIG_REF[key]
        assert got.numel() == ref.numel(), (off, got.numel(), ref.numel())
        assert torch.equal(got, ref), f"offset {off}: {int((got != ref).sum())} bytes differ from the reference"
        dst_buf = torch.empty(x.numel() + 40, dtype=BF16)
        dst = dst_buf[off + 1:off + 1 + x.numel()]
        with backend(spec, device):
            decode(got, dst, backend="cpu")
        assert_bitwise_equal(dst, x)


_BIG_REF: dict = {}


# ---------------------------------------------------------------------------------------------------------------
# property test (hypothesis): random region layouts, chunk sizes, codebooks and escape rates
# ---------------------------------------------------------------------------------------------------------------
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

_FAST = [p for p in BACKENDS if p.values[0] in ("cpu", "cpu-scalar")]

if st is not None:
    @st.composite
    def _layouts(draw):
        sizes = draw(st.lists(st.integers(0, 3000), min_size=1, max_size=5))
        seed = draw(st.integers(0, 2**31 - 1))
        scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
        rate = draw(st.sampled_from([0.0, 0.001, 0.02, 0.2]))
        k = draw(st.integers(1, 16))
        cl2 = draw(st.integers(8, 15))
        return sizes, seed, scale, rate, k, cl2

    @pytest.mark.parametrize("spec,device", _FAST)
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(layout=_layouts())
    def test_property_matches_reference(spec, device, layout):
        sizes, seed, scale, rate, k, cl2 = layout
        full = realistic_bf16(sum(sizes), seed=seed, scale=scale, outlier_rate=rate)
        cb = top_codebook(full, k) if full.numel() else Codebook((127,), two_level=False)
        regions = list(torch.split(full, sizes))
        got = encode_with(spec, device, regions, cb, cl2)
        ref = encode(full, cb, chunk_log2=cl2, backend="reference")
        assert got.numel() == ref.numel()
        assert torch.equal(got, ref)
        out = [torch.empty(s, dtype=BF16) for s in reversed(sizes)]
        with backend(spec, device):
            decode(got, out, backend="cpu")
        assert_bitwise_equal(torch.cat(out), full)
