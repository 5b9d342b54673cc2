"""The same 1P1D harness with vLLM's stock NixlConnector: the raw-transfer baseline our benchmarks compare to."""
from __future__ import annotations

import pytest

from e2e_common import LOG_ROOT, require_e2e, start_all, tiny_model
from splitzip_vllm.testing.cluster import Proxy, Server, complete, completion_body, kv_config, make_prompts, token_ids

pytestmark = pytest.mark.e2e
LENGTHS = [37, 128, 256, 300, 1000, 2000]


@pytest.fixture(scope="module")
def nixl_pair():
    require_e2e()
    model = tiny_model()
    logs = LOG_ROOT / "nixl"
    args = ["--block-size", "128"]
    p = Server("prefill", model, logs, kv_config("NixlConnector", "kv_producer"), "0", args=args)
    d = Server("decode", model, logs, kv_config("NixlConnector", "kv_consumer"), "1", args=args)
    start_all([p, d])
    proxy = Proxy([p.url], [d.url], logs).start()
    yield p, d, proxy
    proxy.stop()
    p.stop()
    d.stop()


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
