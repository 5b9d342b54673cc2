"""Layer-wise transfers (docs/LAYERWISE.md) on the in-process fake transport: decode starts before prefill has
published, finds the manifest in prefill's mailbox, and reads each layer's pieces only after the forward pass
reported that layer written; every failure path ends the load cleanly. Real codec, real paged-KV tensors."""
from __future__ import annotations

import time

import pytest
import torch

from fake_transport import Fabric
from flow_harness import layerwise_remote
from splitzip_vllm.connector.binding import transfer_tag
from splitzip_vllm.connector.contracts import Manifest
from splitzip_vllm.connector.mailbox import (ENTRY_BYTES, MAILBOX_PIECE, PROBE, Mailbox, MailboxFullError,
                                             MailboxRefusedError, find_entry, first_slot, probe_range)
from splitzip_vllm.connector.metadata import RecvRequest
from test_connector_flow import LAYERS, Decode, Prefill, assert_heads_equal, run


def _poll(prefills, decodes, rounds=30):
    """Step both sides a while; returns what each decode reported."""
    out = {d.rank: (set(), set()) for d in decodes}
    for _ in range(rounds):
        for p in prefills:
            p.poll()
        for d in decodes:
            done, failed = d.consumer.poll()
            out[d.rank][0].update(done)
            out[d.rank][1].update(failed)
        time.sleep(0.004)
    return out


def _layers_received(d, blocks) -> set[int]:
    """Layers of decode's cache that already hold something other than what they held before the load."""
    return {l for l in range(LAYERS)
            if not torch.equal(d.layout.layers[l].tensor[blocks].view(torch.int16),
                               d.before[l][blocks].view(torch.int16))}


def test_decode_reads_each_layer_only_after_the_forward_pass_wrote_it():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    d = Decode(fabric, 0, 1, [prefill])
    p_blocks, d_blocks = [3, 7, 1, 9], [5, 6, 10, 11]
    # decode first: the proxy sent both requests at once and prefill has not scheduled its request yet
    d.consumer.start("dec", RecvRequest(d_blocks, 0, layerwise_remote("t-1", 1)))
    assert _poll([prefill], [d]) == {0: (set(), set())}
    prefill.publish("pre", p_blocks, transfer_id="t-1")      # start_load_kv of prefill's last chunk
    assert _poll([prefill], [d]) == {0: (set(), set())}      # no layer written yet: nothing to read
    assert _layers_received(d, d_blocks) == set()
    prefill.producer.layer_saved([0])                          # the forward pass wrote layer 0
    assert _poll([prefill], [d], rounds=60) == {0: (set(), set())}
    assert _layers_received(d, d_blocks) == {0}               # layer 0 moved while the others "compute"
    prefill.producer.layer_saved([1])
    prefill.producer.step_saved()                             # wait_for_save: every layer written
    res = run([prefill], [d], rid_finished=("pre",))
    assert res[0] == ({"dec"}, set())
    assert_heads_equal([prefill], d, p_blocks, d_blocks)
    payload = d.stats.data["wire_bytes"] - d.stats.data["index_read_bytes"]   # mailbox and index polls apart
    assert payload <= 0.8 * d.stats.data["raw_bytes"]
    # decode's notices name the transfer id; prefill maps them to its request and frees it, mailbox included
    assert prefill.stats.data["num_freed"] == 1 and prefill.producer.arena_used_bytes == 0
    assert not prefill.producer.mailbox.buffer.any()


@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 2)])
def test_layerwise_tp_pairs(p_tp, d_tp):
    fabric = Fabric()
    prefills = [Prefill(fabric, r, p_tp) for r in range(p_tp)]
    decodes = [Decode(fabric, r, d_tp, prefills) for r in range(d_tp)]
    p_blocks, d_blocks = [3, 7, 1], [5, 6, 10]
    for d in decodes:
        d.consumer.start("dec", RecvRequest(d_blocks, 0, layerwise_remote("t-2", p_tp)))
    for p in prefills:
        p.publish("pre", p_blocks, transfer_id="t-2")
        p.producer.step_saved()
    res = run(prefills, decodes, rid_finished=("pre",))
    assert all(res[d.rank] == ({"dec"}, set()) for d in decodes), res
    for d in decodes:
        assert_heads_equal(prefills, d, p_blocks, d_blocks)
    assert all(p.stats.data["num_freed"] == 1 for p in prefills)


def test_a_transfer_prefill_never_publishes_times_out():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    d = Decode(fabric, 0, 1, [prefill], timeout=0.3)
    d.consumer.start("dec", RecvRequest([1, 2], 0, layerwise_remote("never", 1)))
    assert run([prefill], [d], rid_finished=(), limit_s=5)[0] == ({"dec"}, {"dec"})


def test_late_read_after_the_lease_finds_no_entry_and_fails():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1, lease=0.05)
    prefill.publish("pre", [1, 2], transfer_id="t-3")
    prefill.producer.step_saved()
    prefill.poll({"pre"})
    time.sleep(0.1)
    assert prefill.poll() == {"pre"}                           # lease expired: mailbox slot and index zeroed
    prefill.publish("other", [1, 2], transfer_id="t-4")      # another transfer reuses the memory
    prefill.producer.step_saved()
    d = Decode(fabric, 0, 1, [prefill], timeout=0.3)
    d.consumer.start("late", RecvRequest([3, 4], 0, layerwise_remote("t-3", 1)))
    assert run([prefill], [d], rid_finished=(), limit_s=5)[0] == ({"late"}, {"late"})
    assert torch.equal(d.layout.layers[0].tensor[[3, 4]], d.before[0][[3, 4]])   # nothing written


def test_kv_without_splitzip_coding_is_refused_through_the_mailbox():
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    prefill.producer.backend = None                            # e.g. an FP8 cache: only the direct path exists
    m = prefill.publish("pre", [1, 2], transfer_id="t-5")
    assert m.mode == "none"
    d = Decode(fabric, 0, 1, [prefill])
    d.consumer.start("dec", RecvRequest([3, 4], 0, layerwise_remote("t-5", 1)))
    t0 = time.monotonic()
    assert run([prefill], [d], rid_finished=())[0] == ({"dec"}, {"dec"})
    assert time.monotonic() - t0 < 2.0                         # at once, not after transfer_timeout


def test_mailbox_slots_probe_collide_and_bind_to_their_transfer():
    box = Mailbox()
    m = Manifest(mode="splitzip", rank=0, num_blocks=3, raw_bytes=99, nonce=7, index_addr=4096)
    slots = [box.post("same", transfer_tag("P", f"x{i}", 0, MAILBOX_PIECE, 0), m, 2) for i in range(PROBE)]
    assert slots == list(range(first_slot("same"), first_slot("same") + PROBE))
    with pytest.raises(MailboxFullError):
        box.post("same", 1, m, 2)
    start, size = probe_range("same")
    raw = box.buffer.numpy()[start:start + size].tobytes()
    found = find_entry(raw, transfer_tag("P", "x3", 0, MAILBOX_PIECE, 0), 0)
    assert found == (m, 2)
    assert find_entry(raw, transfer_tag("P", "x9", 0, MAILBOX_PIECE, 0), 0) is None
    torn = bytearray(raw)
    torn[3 * ENTRY_BYTES + 8] ^= 1                            # an entry read while prefill writes it
    assert find_entry(bytes(torn), transfer_tag("P", "x3", 0, MAILBOX_PIECE, 0), 0) is None
    box.clear(slots[3])
    assert find_entry(box.buffer.numpy()[start:start + size].tobytes(),
                      transfer_tag("P", "x3", 0, MAILBOX_PIECE, 0), 0) is None
    refused = Mailbox()
    refused.post("r", 5, None, 1)
    with pytest.raises(MailboxRefusedError):
        find_entry(refused.buffer.numpy()[slice(*_span("r"))].tobytes(), 5, 0)


def _span(transfer_id: str) -> tuple[int, int]:
    start, size = probe_range(transfer_id)
    return start, start + size



def test_cpu_layers_are_encoded_inline_by_save_kv_layer():
    """On a CPU KV cache the engine thread encodes a saved layer's pieces before save_kv_layer returns (the
    encoder thread would share the model's core); they are in the piece index at once."""
    fabric = Fabric()
    prefill = Prefill(fabric, 0, 1)
    prefill.publish("pre", [3, 7, 1], transfer_id="t-6")
    send = prefill.producer._sends["pre"]
    per_layer = send.plan.count // LAYERS
    prefill.producer.close()              # no encoder thread: whatever gets encoded now, the engine thread did
    prefill.producer.layer_saved([1], inline=True)
    assert {send.plan.coords(p)[0] for p in send.encoded} == {1}
    assert len(send.encoded) == per_layer and not prefill.producer._encoding   # done, nothing in flight
    prefill.producer.step_saved()
    assert prefill.stats.data["lw_encoded_in_forward"] == per_layer
    assert prefill.stats.data["lw_pieces"] == send.plan.count
