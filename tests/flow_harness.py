"""One producer -> consumer harness on the in-process fake transport, shared by the CPU flow tests
(tests/test_connector_flow.py) and the GPU flow tests (tests/test_connector_flow_gpu.py).

A :class:`Flow` says what differs between them: the model geometry, how a side's paged KV cache is built
(``kv(n_blocks, heads, seed)``), the memory type the transport registers it as (``"DRAM"``/``"VRAM"``), the codec
backend, the device id in the handshake, the defaults of sizes and timeouts, and whether :func:`run` synchronises
CUDA before returning. :class:`Prefill` and :class:`Decode` build a real KVLayout, a FakeTransport and a
Producer/Consumer (with Handshake / PeerBook) from it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import torch

from fake_transport import FakeTransport
from splitzip_vllm.codec.codebook import ExponentHistogram
from splitzip_vllm.connector.consumer import Consumer
from splitzip_vllm.connector.contracts import PROTOCOL_VERSION, Handshake, LayerSpec
from splitzip_vllm.connector.kv_layout import KVGeometry, KVLayout, PiecePlan
from splitzip_vllm.connector.metadata import RemoteInfo
from splitzip_vllm.connector.peers import PeerBook
from splitzip_vllm.connector.policy import CompressionPolicy
from splitzip_vllm.connector.producer import Producer
from splitzip_vllm.connector.stats import SplitZipStats

MiB = 1 << 20


@dataclass(frozen=True)
class Flow:
    """What one family of flow tests runs with."""
    layers: int
    block: int                     # tokens per block
    head: int                      # head size
    heads: int                     # total KV heads (split over TP ranks)
    kv: Callable[[int, int, int], dict[str, torch.Tensor]]   # (n_blocks, local heads, seed) -> {name: cache}
    mem_type: str                  # "DRAM" | "VRAM"
    backend: Any                   # codec backend object
    device_id: int = 0
    prefill_blocks: int = 24
    decode_blocks: int = 40
    arena: int = 4 * MiB           # prefill send arena
    recv: int = 4 * MiB            # decode receive buffer
    timeout_s: float = 5.0         # decode: a load without progress for this long fails
    limit_s: float = 20.0          # run(): give up after this long
    sync_cuda: bool = False        # run(): torch.cuda.synchronize() before returning


class Prefill:
    def __init__(self, flow: Flow, fabric, rank, tp, *, n_blocks=None, arena=None, compress=True, lease=30.0,
                 bpp=1):
        self.flow, self.rank, self.tp, self.bpp = flow, rank, tp, bpp
        heads = flow.heads // tp
        kv = flow.kv(n_blocks or flow.prefill_blocks, heads, 100 + rank)
        self.layout = KVLayout(kv, KVGeometry(flow.block, heads, flow.head))
        self.transport = FakeTransport(fabric, f"prefill{rank}")
        self.transport.register(self.layout.storages(), flow.mem_type)
        hist = ExponentHistogram()
        for l in self.layout.layers:
            hist.update(l.tensor)
        self.stats = SplitZipStats()
        self.producer = Producer(engine_id="P", tp_rank=rank, layout=self.layout, arena_bytes=arena or flow.arena,
                                 index_bytes_=MiB, lease_s=lease, backend=flow.backend,
                                 policy=CompressionPolicy("always" if compress else "never"), stats=self.stats,
                                 chunk_log2=12, codebook_source=lambda ids, cb=hist.top(): cb)
        for a, n, mem in self.producer.registrations():
            self.transport.register([(a, n)], mem)
        self.handshake = Handshake(
            protocol=PROTOCOL_VERSION, format_versions=(1, 2), engine_id="P", tp_rank=rank, tp_size=tp, model="m",
            model_fingerprint="f", kv_dtype="bfloat16", block_size=flow.block, total_kv_heads=flow.heads,
            head_size=flow.head, layout=self.layout.kind, piece_order=self.layout.piece_order, element_size=2,
            layers=[LayerSpec(*l.spec()) for l in self.layout.layers], agent_metadata=self.transport.metadata(),
            mem_type=flow.mem_type, device_id=flow.device_id, mailbox_addr=self.producer.mailbox.base)

    def publish(self, rid: str, block_ids: list[int], transfer_id: str = ""):
        plan = PiecePlan(self.flow.layers, self.flow.heads // self.tp, len(block_ids), self.bpp)
        return self.producer.publish(rid, block_ids, plan, transfer_id)

    def poll(self, finished=()):
        return self.producer.poll(set(finished), self.transport.notifications())

    def close(self):
        self.producer.close()


class Decode:
    def __init__(self, flow: Flow, fabric, rank, tp, prefills, *, n_blocks=None, recv=None, fetch=None,
                 timeout=None):
        self.flow, self.rank, self.tp = flow, rank, tp
        heads = flow.heads // tp
        self.layout = KVLayout(flow.kv(n_blocks or flow.decode_blocks, heads, 900 + rank),
                               KVGeometry(flow.block, heads, flow.head))
        self.transport = FakeTransport(fabric, f"decode{rank}")
        self.transport.register(self.layout.storages(), flow.mem_type)
        fetch = fetch or (lambda host, port, r, t: msgspec.msgpack.encode(prefills[r].handshake))
        self.peers = PeerBook(self.transport, lambda info, eid: None, 1.0, fetch)
        self.stats = SplitZipStats()
        self.consumer = Consumer(layout=self.layout, transport=self.transport, peers=self.peers, tp_rank=rank,
                                 tp_size=tp, total_heads=flow.heads, recv_bytes=recv or flow.recv,
                                 timeout_s=flow.timeout_s if timeout is None else timeout, backend=flow.backend,
                                 stats=self.stats)
        for a, n, mem in self.consumer.registrations():
            self.transport.register([(a, n)], mem)
        self.before = [l.tensor.clone() for l in self.layout.layers]   # to check untouched blocks

    def close(self):
        self.consumer.close()
        self.peers.close()


def remote(manifests, block_ids, tp, rid="r1", bpp=1):
    return RemoteInfo(engine_id="P", host="h", port=1, request_id=rid, tp_size=tp, block_ids=block_ids,
                      manifests=[m.to_dict() for m in manifests], blocks_per_piece=bpp)


def layerwise_remote(transfer_id: str, tp: int):
    """What decode knows of a layer-wise transfer: the proxy's id and the prefill engine, no manifests."""
    return RemoteInfo(engine_id="P", host="h", port=1, request_id=transfer_id, tp_size=tp, block_ids=[],
                      manifests=None, transfer_id=transfer_id)


def run(prefills, decodes, rid_finished=("r1",), limit_s=None):
    """Step every side until each decode reports its load finished (within ``limit_s``, default the flow's);
    returns {decode rank: (done, failed)}."""
    flow = (prefills or decodes)[0].flow
    out = {}
    first = True
    deadline = time.monotonic() + (flow.limit_s if limit_s is None else limit_s)
    while len(out) < len(decodes) and time.monotonic() < deadline:
        for p in prefills:
            p.poll(rid_finished if first else ())
        first = False
        for d in decodes:
            if d.rank in out:
                continue
            done, failed = d.consumer.poll()
            if done:
                out[d.rank] = (done, failed)
        time.sleep(0.001)
    for _ in range(5):       # deliver the last notices
        for p in prefills:
            p.poll()
        time.sleep(0.002)
    if flow.sync_cuda:
        torch.cuda.synchronize()
    return out
