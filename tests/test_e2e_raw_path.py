"""KV caches without SplitZip coding (FP16 here) move uncompressed through the same connector path."""
from __future__ import annotations

import pytest

from e2e_common import pd_pair
from splitzip_vllm.testing.cluster import complete, completion_body, make_prompts, token_ids

pytestmark = pytest.mark.e2e
LENGTHS = [37, 300, 1000]
CONNECTOR = "SplitZipConnector"


@pytest.fixture(scope="module")
def fp16_pair():
    with pd_pair("fp16", CONNECTOR, ["--block-size", "128", "--dtype", "float16"],
                 extra_p={"compression": "always"}) as pair:
        yield pair


def test_fp16_kv_moves_raw_and_outputs_match(fp16_pair):
    p, d, proxy = fp16_pair
    for prompt in make_prompts(LENGTHS, seed=5):
        ref = token_ids(complete(p.url, completion_body(prompt)))
        assert token_ids(complete(proxy.url, completion_body(prompt))) == ref
    m, pm = d.metrics(), p.metrics()
    assert m["vllm:prompt_tokens_by_source_total{external_kv_transfer}"] == sum(LENGTHS)
    assert m["vllm:prompt_tokens_by_source_total{local_compute}"] == 0
    assert m["vllm:splitzip_failed_transfers_total"] == 0
    raw = sum(-(-n // 128) for n in LENGTHS) * 4 * 2 * 128 * 128 * 2
    assert m["vllm:splitzip_wire_bytes_total"] == m["vllm:splitzip_raw_bytes_total"] == raw
    assert pm["vllm:splitzip_direct_requests_total"] == len(LENGTHS)
    assert "has no SplitZip coding" in p.log_path.read_text()
