"""EXP2L on the triton backend with the GPU tile sizes, under the Triton interpreter.

tests/test_codec_exp2l.py runs the whole EXP2L matrix on triton with the interpreter's tile sizes, where a tile
holds one or several whole chunks. The compiled (GPU) tiles are smaller than most chunks: a chunk's markers,
escapes and secondary code bytes then come from several programs (a sec byte can take its two codes from two
tiles), which is what these cases pin down, byte-identical to the reference and with the reference's verdicts.
Like tests/test_codec_triton.py, this file reruns itself in a ``TRITON_INTERPRET=1`` child when triton was not
imported interpreted.
"""
from __future__ import annotations

import random

import pytest
import torch
from _codec_util import (BF16, Canary, assert_bitwise_equal, backend_specs, channel_kv_bf16, header_fields,
                         random_bits, run_under_interpreter, to_tensor, top_codebook)
from test_codec_exp2l import BASES, _mutate, _verdict

from splitzip_vllm.codec import Codebook, PayloadError, get_backend, reference
from splitzip_vllm.codec.backends import triton_backend as TB
from splitzip_vllm.codec.format import encode_capacity

IN_PROCESS = "triton" in backend_specs("cpu")


@pytest.fixture(autouse=True)
def _gpu_tiles(request, monkeypatch):
    if request.function is test_run_under_interpreter:
        return
    if not IN_PROCESS:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported; covered by test_run_under_interpreter")
    monkeypatch.setattr(TB, "TILES", dict(TB.GPU_TILES))


def test_run_under_interpreter():
    if IN_PROCESS:
        pytest.skip("running in-process already")
    run_under_interpreter(__file__)


def roundtrip(regions, cb: Codebook, cl2: int, sizes=None) -> dict:
    """Triton payload == reference payload (nothing written past encode_capacity); it decodes into ``sizes``."""
    n = sum(r.numel() for r in regions)
    cap = encode_capacity(n, 2)
    buf = torch.full((cap + 97,), 0xC3, dtype=torch.uint8)
    be = get_backend("triton", "cpu")
    be.encode_into(regions, 1, cb, cl2, buf[:cap])
    assert bool((buf[cap:] == 0xC3).all()), "encoder wrote past encode_capacity"
    ref = reference.encode(regions, 1, cb, cl2)
    assert torch.equal(buf[:ref.numel()], ref)
    full = torch.cat([r.reshape(-1) for r in regions])
    can = Canary(sizes or [n], BF16)
    be.decode_into(ref, can.regions, 1)
    can.check()
    assert_bitwise_equal(can.data(), full)
    return header_fields(ref.numpy().tobytes())


CB22 = top_codebook(channel_kv_bf16(8192, seed=99), 22, two_level=True)


@pytest.mark.parametrize("cl2", [8, 12, 15])
def test_sizes(cl2):
    for n in (1, 63, 64, 65, 2047, 2048, 2049, 4097, 9000, 40001):
        if cl2 == 8 and n > 9000:
            continue
        x = channel_kv_bf16(n, seed=n + cl2, outliers=0.01)
        h = roundtrip([x], CB22, cl2, [n // 3, 0, n - n // 3])
        if n >= 2048:
            assert h["mode"] == 2, n


def test_sec_byte_from_two_tiles():
    """Chunk 0 (4096 elements, two 2048-element tiles): tile 0 holds 3 markers, so the chunk's second sec byte
    packs tile 0's last secondary code and tile 1's first; escapes in both tiles and in the next chunk."""
    cb = Codebook((127, 1, 2, 3, 4, 5, 6, 128, 129), two_level=True)   # 2.0 and 4.0 are secondary codes 0, 1
    x = torch.full((8192,), 1.5, dtype=BF16)
    for i, v in ((5, 2.0), (100, 1e30), (2047, 4.0), (2048, 4.0), (3000, -1e-30), (4095, 2.0), (4096, 1e30)):
        x[i] = v
    h = roundtrip([x], cb, 12, [2048, 2049, 4095])
    assert h["mode"] == 2 and h["n_escapes"] == 3


@pytest.mark.parametrize("layout", ["uneven", "blocks"])
def test_multi_region(layout):
    sizes = [3, 0, 1, 300, 257, 1000, 0, 2500, 4000] if layout == "uneven" else [1024] * 12
    full = channel_kv_bf16(sum(sizes), seed=len(sizes), outliers=0.01)
    if layout == "uneven":   # views at odd offsets of one buffer
        regions = list(torch.split(torch.cat([torch.zeros(1, dtype=BF16), full])[1:], sizes))
    else:
        regions = [t.clone() for t in torch.split(full, sizes)]
    assert roundtrip(regions, top_codebook(full, 22, two_level=True), 10, sizes[::-1])["mode"] == 2


def test_mode_choice_on_device():
    """The device-side choice of FORMAT.md §5 lands on each mode (bytes equal to the reference's)."""
    kv = channel_kv_bf16(9000, seed=4)
    uni = ((torch.randint(112, 128, (9000,), generator=torch.Generator().manual_seed(1)) << 7) | 5)
    cases = ((random_bits(9000, seed=1), top_codebook(kv, 22, two_level=True), 0),
             (uni.to(torch.int16).view(BF16), Codebook(tuple(range(112, 128))), 1),
             (kv, top_codebook(kv, 22, two_level=True), 2))
    for x, cb, mode in cases:
        assert roundtrip([x], cb, 12)["mode"] == mode


def test_corrupted_payloads_agree_with_reference():
    """Corrupted payloads get the reference's verdict; one refused before the checksum step writes nothing."""
    rng = random.Random(99)
    be = get_backend("triton", "cpu")
    for it in range(80):
        base, x = BASES[rng.randrange(len(BASES))]
        mutated = bytes(_mutate(rng, base))
        can = Canary([x.numel()], BF16)
        try:
            be.decode_into(to_tensor(mutated), can.regions, 1)
            got = "ok"
        except PayloadError as e:
            got = str(e)
        can.check()
        assert got == _verdict("reference", mutated, x.numel()), it
        if got != "ok" and "checksum" not in got:
            assert can.untouched(), (it, got)
