"""Producer -> consumer on GPU-resident paged KV caches, through the in-process fake transport (device copies):
every GPU layout vLLM hands the connector, compressed (cuda codec, else triton, else the PyTorch reference on the
GPU) and raw, homogeneous and heterogeneous TP, prefix hits inside a piece; pages must arrive byte-exact and no
other block of decode's cache may change.

Layouts (``N`` blocks, ``B`` tokens per block, ``H`` KV heads, ``D`` head size):

* ``flash``          ``[2, N, B, H, D]`` allocated as is (NHD: a piece's rows are strided);
* ``flash-hnd``      allocated ``[2, N, H, B, D]`` and permuted to ``[2, N, B, H, D]`` (a piece is contiguous);
* ``flashinfer``     ``[N, 2, B, H, D]``;
* ``flashinfer-hnd`` allocated ``[N, 2, H, B, D]`` and permuted.

The CPU layout (``[N, H, B, 2*D]``) is covered by tests/test_connector_flow.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available: the GPU connector flow needs a GPU (the CPU flow is "
                "tests/test_connector_flow.py)", allow_module_level=True)

import flow_harness  # noqa: E402
from fake_transport import Fabric  # noqa: E402
from flow_harness import remote  # noqa: E402
from splitzip_vllm.codec import get_backend  # noqa: E402
from splitzip_vllm.connector.metadata import RecvRequest  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
LAYERS, BLOCK, HEAD, HEADS = 3, 16, 128, 4
KiB, MiB = 1 << 10, 1 << 20
LAYOUTS = ("flash", "flash-hnd", "flashinfer", "flashinfer-hnd")


def _codec():
    """The GPU codec backend to test with: cuda, else triton (compiled), else the reference on the GPU."""
    for name in ("cuda", "triton", "reference"):
        try:
            return get_backend(name, DEV)
        except Exception:   # not built / not importable / interpreted triton: try the next one
            continue
    pytest.skip("no codec backend runs on the GPU")


def _kv(layout: str, n_blocks: int, heads: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        if layout == "flash":
            shape, perm = (2, n_blocks, BLOCK, heads, HEAD), None
        elif layout == "flash-hnd":
            shape, perm = (2, n_blocks, heads, BLOCK, HEAD), (0, 1, 3, 2, 4)
        elif layout == "flashinfer":
            shape, perm = (n_blocks, 2, BLOCK, heads, HEAD), None
        else:
            shape, perm = (n_blocks, 2, heads, BLOCK, HEAD), (0, 1, 3, 2, 4)
        t = (torch.randn(shape, generator=g, device=DEV) * 0.05).to(torch.bfloat16)
        out[f"l{i}"] = t.permute(*perm) if perm else t
    torch.cuda.synchronize()
    return out


def _flow(layout: str, backend) -> flow_harness.Flow:
    return flow_harness.Flow(layers=LAYERS, block=BLOCK, head=HEAD, heads=HEADS,
                             kv=lambda n_blocks, heads, seed: _kv(layout, n_blocks, heads, seed), mem_type="VRAM",
                             backend=backend, device_id=DEV.index or 0, prefill_blocks=32, decode_blocks=48,
                             arena=1 * MiB, recv=1 * MiB, timeout_s=20.0, limit_s=60.0, sync_cuda=True)


def Prefill(fabric, rank, tp, layout, *, backend, **options):   # noqa: N802 (stands for the harness class)
    p = flow_harness.Prefill(_flow(layout, backend), fabric, rank, tp, **options)
    assert p.layout.kind == layout.split("-")[0] and p.layout.device.type == "cuda"
    return p


def Decode(fabric, rank, tp, layout, prefills, *, backend, **options):   # noqa: N802
    return flow_harness.Decode(_flow(layout, backend), fabric, rank, tp, prefills, **options)


run = flow_harness.run


def _piece(layer, block, head) -> torch.Tensor:
    """Piece (block, head) of a layer as raw 16-bit patterns, in piece order."""
    return torch.cat([v.reshape(-1).view(torch.int16) for v in layer.piece(block, head)])


def assert_pages_exact(prefills, d, p_blocks, d_blocks, skip=0):
    """Decode's blocks hold prefill's KV bit for bit for the heads it serves; every other block is untouched."""
    hp, hd = HEADS // prefills[0].tp, HEADS // d.tp
    for li, layer in enumerate(d.layout.layers):
        for dh in range(hd):
            gh = d.rank * hd + dh
            p = prefills[gh // hp]
            for pb, db in zip(p_blocks[skip:], d_blocks):
                src = _piece(p.layout.layers[li], pb, gh % hp)
                dst = _piece(layer, db, dh)
                assert torch.equal(src, dst), f"layer {li} head {dh} block {db} differs from prefill block {pb}"
        others = [b for b in range(d.layout.num_blocks) if b not in set(d_blocks)]
        now, before = layer.tensor, d.before[li]
        dim = 1 if d.layout.kind == "flash" else 0
        idx = torch.tensor(others, device=DEV)
        assert torch.equal(now.index_select(dim, idx).view(torch.int16), before.index_select(dim, idx).view(
            torch.int16)), f"layer {li}: a block decode did not ask for was written"


def _close(*sides):
    for s in sides:
        s.close()


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_pages_arrive_exact_in_every_layout(layout, compress):
    backend = _codec()
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, layout, backend=backend, compress=compress)
    p_blocks = [3, 7, 1, 9, 12, 2, 20, 31]
    m = prefill.publish("r1", p_blocks)
    assert m.mode == ("splitzip" if compress else "direct"), m
    d = Decode(fabric, 0, 1, layout, [prefill], backend=backend)
    d_blocks = [5, 6, 10, 11, 40, 30, 0, 47]
    try:
        d.consumer.start("req", RecvRequest(d_blocks, 0, remote([m], p_blocks, 1)))
        assert run([prefill], [d]) == {0: ({"req"}, set())}
        assert_pages_exact([prefill], d, p_blocks, d_blocks)
        wire, raw = d.stats.data["wire_bytes"], d.stats.data["raw_bytes"]
        assert raw == len(d_blocks) * d.layout.block_bytes
        if compress:
            assert wire <= 0.85 * raw, (wire, raw)
        else:
            assert wire == raw, (wire, raw)
        assert prefill.stats.data["num_freed"] == 1 and prefill.producer.arena_used_bytes == 0
        assert d.consumer.recv_used_bytes == 0
    finally:
        _close(d, prefill)


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (4, 2)])
def test_gpu_heterogeneous_tp(p_tp, d_tp, compress):
    backend = _codec()
    fabric = Fabric()
    prefills = [Prefill(fabric, r, p_tp, "flash-hnd", backend=backend, compress=compress) for r in range(p_tp)]
    p_blocks = [4, 8, 15, 16, 23]
    ms = [p.publish("r1", p_blocks) for p in prefills]
    decodes = [Decode(fabric, r, d_tp, "flash-hnd", prefills, backend=backend) for r in range(d_tp)]
    d_blocks = [1, 2, 3, 44, 45]
    try:
        for d in decodes:
            d.consumer.start("req", RecvRequest(d_blocks, 0, remote(ms, p_blocks, p_tp)))
        res = run(prefills, decodes)
        assert res == {d.rank: ({"req"}, set()) for d in decodes}, res
        for d in decodes:
            assert_pages_exact(prefills, d, p_blocks, d_blocks)
        for p in prefills:
            assert p.stats.data["num_freed"] == 1 and p.producer.arena_used_bytes == 0
    finally:
        _close(*decodes, *prefills)


@pytest.mark.parametrize("layout", ["flash", "flashinfer-hnd"])
def test_gpu_small_staging_and_prefix_hit_inside_a_piece(layout):
    """Pieces of 2 blocks, 3 blocks cached on decode (the second piece is half cached: decoded into scratch),
    send arena and receive buffer of a few pieces: the request streams through and only missing blocks change."""
    backend = _codec()
    fabric = Fabric()
    bpp = 2
    prefill = Prefill(fabric, 0, 1, layout, backend=backend, arena=160 * KiB, bpp=bpp)
    p_blocks = list(range(2, 26))                       # 24 blocks
    m = prefill.publish("r1", p_blocks)
    d = Decode(fabric, 0, 1, layout, [prefill], backend=backend, recv=96 * KiB)
    skip = 3
    d_blocks = list(range(20, 20 + len(p_blocks) - skip))
    try:
        d.consumer.start("req", RecvRequest(d_blocks, skip, remote([m], p_blocks, 1, bpp=bpp)))
        assert run([prefill], [d]) == {0: ({"req"}, set())}
        assert_pages_exact([prefill], d, p_blocks, d_blocks, skip=skip)
        assert prefill.stats.data["arena_alloc_bytes"] == prefill.stats.data["arena_free_bytes"] > 160 * KiB
        assert prefill.producer.arena_used_bytes == 0 and d.consumer.recv_used_bytes == 0
    finally:
        _close(d, prefill)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_layerwise_encode_waits_for_each_layers_writes(layout):
    """Layer-wise (docs/LAYERWISE.md): the encoder's side stream must wait for the event recorded when a layer was
    saved. Each "forward" layer here is a slow kernel, then a write of the whole layer on the current stream: an
    encoder not ordered after it would read the old KV, and decode's pages would differ from prefill's."""
    backend = _codec()
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, layout, backend=backend)
    d = Decode(fabric, 0, 1, layout, [prefill], backend=backend)
    p_blocks, d_blocks = [3, 7, 1, 9], [5, 6, 10, 11]
    try:
        d.consumer.start("req", RecvRequest(d_blocks, 0, flow_harness.layerwise_remote("t-gpu", 1)))
        prefill.publish("r1", p_blocks, transfer_id="t-gpu")
        for li, layer in enumerate(prefill.layout.layers):
            torch.cuda._sleep(20_000_000)
            layer.tensor.mul_(-1)
            prefill.producer.layer_saved([li])
        prefill.producer.step_saved()
        assert run([prefill], [d], rid_finished=("r1",)) == {0: ({"req"}, set())}
        assert_pages_exact([prefill], d, p_blocks, d_blocks)
        assert prefill.stats.data["num_freed"] == 1
    finally:
        _close(d, prefill)
