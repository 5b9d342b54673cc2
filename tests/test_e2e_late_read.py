"""A decode READ after the prefill lease expired must never load another request's KV (issue: wrong tokens).

Sequence, for compressed payloads (send arena) and for raw/direct transfers (prefill's paged KV blocks):
  1. prefill request A with ``do_remote_decode``; keep its ``kv_transfer_params``;
  2. wait past the lease: prefill frees A's arena extent / KV blocks;
  3. prefill request B, which is placed on A's piece index / KV blocks (asserted from the params: the scenario
     is real, not assumed);
  4. send A with A's params to decode: the late read must be rejected -> ``recompute`` answers exactly the
     reference tokens, ``fail`` ends the request with an error;
  5. plain requests to decode for A and A + suffix are token-identical to the reference (no poisoned prefix
     cache), and B, read on time, is freed by prefill on read (not at its lease expiry).
"""
from __future__ import annotations

import time

import httpx
import pytest

from e2e_common import LOG_ROOT, require_e2e, start_all, tiny_model
from splitzip_vllm.testing.cluster import Server, complete, completion_body, kv_config, make_prompts, token_ids

pytestmark = pytest.mark.e2e
BLOCK = 128
LEASE = 5.0
CONNECTOR = "SplitZipConnector"
# The raw-mode prefill has 9 usable KV blocks, so a 1000-token B (8 blocks) must take some of A's freed blocks.
RAW_BLOCKS = ["--num-gpu-blocks-override", "10", "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def late_cluster():
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / "late-read"
    args = ["--block-size", str(BLOCK)]
    p_extra = {"kv_lease_duration": LEASE, "compression": "always"}
    d_extra = {"transfer_timeout": 10.0, "handshake_timeout": 3.0}
    p_comp = Server("prefill-compressed", model, logs, kv_config(CONNECTOR, "kv_producer", extra=p_extra), "0",
                    args=args)
    p_raw = Server("prefill-raw", model, logs,
                   kv_config(CONNECTOR, "kv_producer", extra=dict(p_extra, compression="never")), "0",
                   args=args + RAW_BLOCKS, max_model_len=1024)
    d_rec = Server("decode-recompute", model, logs, kv_config(CONNECTOR, "kv_consumer", "recompute", d_extra), "1",
                   args=args)
    d_fail = Server("decode-fail", model, logs, kv_config(CONNECTOR, "kv_consumer", "fail", d_extra), "1",
                    args=args)
    servers = [p_comp, p_raw, d_rec, d_fail]
    start_all(servers)
    yield {"comp": p_comp, "raw": p_raw, "rec": d_rec, "fail": d_fail}
    for s in servers:
        s.stop()


def _prefill(p: Server, prompt: list[int]) -> dict:
    r = httpx.post(f"{p.url}/v1/completions", timeout=120,
                   json=dict(completion_body(prompt), max_tokens=1, kv_transfer_params={"do_remote_decode": True}))
    r.raise_for_status()
    return r.json()["kv_transfer_params"]


def _decode(d: Server, prompt: list[int], params: dict | None, max_tokens: int = 24) -> httpx.Response:
    body = completion_body(prompt, max_tokens=max_tokens)
    if params is not None:
        body["kv_transfer_params"] = params
    return httpx.post(f"{d.url}/v1/completions", json=body, timeout=120)


def _assert_failed(resp: httpx.Response) -> None:
    if resp.status_code == 200:
        choice = resp.json()["choices"][0]
        assert choice["finish_reason"] not in ("length", "stop"), choice
        assert not choice.get("token_ids"), "a rejected KV load with policy fail must not produce tokens"
    else:
        assert resp.status_code >= 400


def _reused(mode: str, a: dict, b: dict) -> bool:
    """Does B sit where A's late read will look (same piece-index address / a shared KV block)?"""
    if mode == "comp":
        ma, mb = a["splitzip"]["manifests"][0], b["splitzip"]["manifests"][0]
        return ma["mode"] == mb["mode"] == "splitzip" and ma["index_addr"] == mb["index_addr"]
    return bool(set(a["remote_block_ids"][0]) & set(b["remote_block_ids"][0]))


def _settled(p: Server, timeout: float = 20) -> dict[str, float]:
    """Prefill metrics once every prepared request was freed (read or expired)."""
    deadline = time.monotonic() + timeout
    while True:
        m = p.metrics()
        prepared = m.get("vllm:splitzip_encoded_requests_total", 0)
        freed = m.get("vllm:splitzip_freed_requests_total", 0)
        if prepared == freed or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


@pytest.mark.parametrize("mode", ["comp", "raw"])
@pytest.mark.parametrize("policy", ["rec", "fail"])
def test_late_read_is_rejected_and_never_poisons_decode(late_cluster, mode, policy):
    p, d, ref_server = late_cluster[mode], late_cluster[policy], late_cluster["comp"]
    seed = {"comp": 11, "raw": 12}[mode] * 10 + {"rec": 1, "fail": 2}[policy]
    b_len = 140 if mode == "comp" else 1000
    a, b, suffix = make_prompts([140, b_len, 60], seed=seed)
    ref_a = token_ids(complete(ref_server.url, completion_body(a)))
    ref_a_suffix = token_ids(complete(ref_server.url, completion_body(a + suffix)))
    ref_b = token_ids(complete(ref_server.url, completion_body(b)))
    _settled(p)
    before_p, before_d = p.metrics(), d.metrics()

    params_a = _prefill(p, a)
    time.sleep(LEASE + 2.5)
    params_b = _prefill(p, b)
    assert _reused(mode, params_a, params_b), "B must reuse A's arena extent / KV blocks for this test to mean anything"

    late = _decode(d, a, params_a)
    if policy == "rec":
        assert token_ids(late) == ref_a, "late read: recompute must give the single-server tokens"
    else:
        _assert_failed(late)
    after_d = d.metrics()
    assert after_d["vllm:splitzip_failed_transfers_total"] == before_d.get("vllm:splitzip_failed_transfers_total", 0) + 1
    assert after_d.get("vllm:splitzip_rejected_transfers_total", 0) == \
        before_d.get("vllm:splitzip_rejected_transfers_total", 0) + 1

    # B, read on time, arrives intact and is freed on read (not by its lease)
    t_read = time.monotonic()
    assert token_ids(_decode(d, b, params_b)) == ref_b
    m = _settled(p, timeout=LEASE - 1)
    assert time.monotonic() - t_read < LEASE, "B was not freed on read"
    assert m["vllm:splitzip_expired_requests_total"] == before_p.get("vllm:splitzip_expired_requests_total", 0) + 1
    assert m["vllm:splitzip_encoded_requests_total"] == m["vllm:splitzip_freed_requests_total"]

    # decode's prefix cache holds no unverified block
    assert token_ids(_decode(d, a, None)) == ref_a
    assert token_ids(_decode(d, a + suffix, None)) == ref_a_suffix
    log = d.log_path.read_text(errors="replace")
    assert "freed or reused by prefill" in log, "decode log does not say why the late read was rejected"
