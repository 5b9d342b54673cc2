#!/usr/bin/env python
"""1P1D disaggregated serving on one CPU machine with SplitZipConnector (what `make demo` runs).

Builds a tiny random-weight Llama locally (no hub), starts a prefill server (core 0), a decode server (core 1),
a plain single server for reference (core 0) and the P/D proxy, sends prompts through the proxy, compares every
decode output with the single server's, and prints one summary line:

    identical=N/N wire_bytes=... raw_bytes=... ratio=... transferred_tokens=...

Options: --prompts N, --max-tokens N, --keep (leave servers running), --connector NixlConnector (baseline).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitzip_vllm.testing.cluster import (REPO, Proxy, Server, complete, completion_body, kv_config,  # noqa: E402
                                           make_prompts, token_ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "out" / "tiny-llama"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--connector", default="SplitZipConnector")
    ap.add_argument("--logs", default=str(REPO / "out" / "demo-logs"))
    a = ap.parse_args()

    import subprocess
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), a.model], check=True)
    logs = Path(a.logs)
    args = ["--block-size", "128"]
    # Loopback shared memory is faster than the CPU codec, so "auto" would (rightly) send raw here; the demo
    # forces compression to show it. On a bandwidth-limited link keep the default "auto".
    extra = {"compression": "always"} if a.connector == "SplitZipConnector" else None
    p = Server("prefill", a.model, logs, kv_config(a.connector, "kv_producer", extra=extra), "0", args=args)
    d = Server("decode", a.model, logs, kv_config(a.connector, "kv_consumer"), "1", args=args)
    ref = Server("single", a.model, logs, None, "0", args=args)
    servers = [p, d, ref]
    proxy = None
    try:
        print(f"[demo] starting prefill :{p.port}, decode :{d.port}, single :{ref.port} (logs in {logs})", flush=True)
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        proxy = Proxy([p.url], [d.url], logs).start()
        print(f"[demo] proxy on {proxy.url}; sending {a.prompts} prompts", flush=True)
        lengths = [20 + (i * 997) % 1500 for i in range(a.prompts)]
        prompts = make_prompts(lengths, seed=3)
        before = d.metrics()
        identical = 0
        for n, prompt in zip(lengths, prompts):
            want = token_ids(complete(ref.url, completion_body(prompt, a.max_tokens)))
            got = token_ids(complete(proxy.url, completion_body(prompt, a.max_tokens)))
            identical += got == want
            print(f"[demo] prompt {n:5d} tokens: {'identical' if got == want else 'DIFFERENT'}", flush=True)
        m = d.metrics()
        delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
        if a.connector == "SplitZipConnector":
            wire, raw = delta["vllm:splitzip_wire_bytes_total"], delta["vllm:splitzip_raw_bytes_total"]
        else:
            wire = raw = delta.get("vllm:nixl_bytes_transferred_sum", 0)
        tokens = int(delta.get("vllm:prompt_tokens_by_source_total{external_kv_transfer}", 0))
        ratio = raw / wire if wire else 0.0
        print(f"identical={identical}/{len(prompts)} wire_bytes={int(wire)} raw_bytes={int(raw)} "
              f"ratio={ratio:.4f} transferred_tokens={tokens}", flush=True)
        return 0 if identical == len(prompts) and tokens > 0 else 1
    finally:
        if proxy is not None:
            proxy.stop()
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
