#!/usr/bin/env python
"""Check a running P/D deployment: outputs through the proxy equal a reference server's, KV really moved.

    python examples/check_pd.py --proxy http://127.0.0.1:8000 --reference http://127.0.0.1:8100 \
        --decode http://127.0.0.1:8200 [--lengths 37 128 256 300 1000 2000] [--model-name NAME]

The reference is any server that answers the whole request itself (e.g. the prefill server). Prints
``identical=N/N wire_bytes=... raw_bytes=... ratio=... transferred_tokens=...`` and exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitzip_vllm.testing.cluster import Server, complete, completion_body, make_prompts, token_ids  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--decode", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[37, 128, 256, 300, 1000, 2000])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--model-name", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    d = Server("decode", "", Path("."))
    d.port = int(a.decode.rsplit(":", 1)[1])
    before = d.metrics()
    ok = 0
    prompts = make_prompts(a.lengths, vocab=a.vocab, seed=1)
    for prompt in prompts:
        body = dict(completion_body(prompt, a.max_tokens), model=a.model_name)
        want, got = token_ids(complete(a.reference, body)), token_ids(complete(a.proxy, body))
        ok += want == got
        print(f"{len(prompt):6d} tokens: {'identical' if want == got else 'DIFFERENT'}")
    m = d.metrics()
    delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
    wire, raw = delta.get("vllm:splitzip_wire_bytes_total", 0), delta.get("vllm:splitzip_raw_bytes_total", 0)
    tokens = int(delta.get("vllm:prompt_tokens_by_source_total{external_kv_transfer}", 0))
    print(f"identical={ok}/{len(prompts)} wire_bytes={int(wire)} raw_bytes={int(raw)} "
          f"ratio={raw / wire if wire else 0:.4f} transferred_tokens={tokens} "
          f"failed={int(delta.get('vllm:splitzip_failed_transfers_total', 0))}")
    return 0 if ok == len(prompts) and tokens == sum(a.lengths) else 1


if __name__ == "__main__":
    sys.exit(main())
