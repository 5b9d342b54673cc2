"""The same 1P1D harness with vLLM's stock NixlConnector: the raw-transfer baseline our benchmarks compare to."""
from __future__ import annotations

import pytest

from e2e_common import pd_pair
from splitzip_vllm.testing.cluster import complete, completion_body, make_prompts, token_ids

pytestmark = pytest.mark.e2e
LENGTHS = [37, 128, 256, 300, 1000, 2000]


@pytest.fixture(scope="module")
def nixl_pair():
    with pd_pair("nixl", "NixlConnector", ["--block-size", "128"]) as pair:
        yield pair


def test_nixl_connector_outputs_identical(nixl_pair):
    p, d, proxy = nixl_pair
    prompts = make_prompts(LENGTHS, seed=1)
    for prompt in prompts:
        ref = token_ids(complete(p.url, completion_body(prompt)))
        assert token_ids(complete(proxy.url, completion_body(prompt))) == ref
    m = d.metrics()
    assert m["vllm:prompt_tokens_by_source_total{external_kv_transfer}"] == sum(LENGTHS)
    assert m["vllm:prompt_tokens_by_source_total{local_compute}"] == 0
    assert m.get("vllm:nixl_num_failed_transfers_total", 0) == 0
    # raw pages: 4 layers x blocks x 64 KiB
    assert m["vllm:nixl_bytes_transferred_sum"] == sum(-(-n // 128) for n in LENGTHS) * 4 * 65536
