#!/usr/bin/env python3
"""Transfer benchmark: raw NIXL READ vs SplitZip (encode -> READ of the payload -> decode) over a rate-limited link.

Two processes, each one NIXL agent (UCX backend, ``UCX_TLS=tcp``), live in two network namespaces (``szb-a``:
the *target*, owner of the KV, i.e. the prefill side; ``szb-b``: the *initiator*, the decode side) joined by a
veth pair (``szb-va`` 10.231.0.1/30 <-> ``szb-vb`` 10.231.0.2/30). Both veth ends are shaped with ``tc tbf`` at
each link rate (the data of a READ flows target -> initiator, i.e. out of ``szb-va``); "unlimited" removes the
qdisc. The namespaces have no other interface than ``lo``, and UCX is restricted to TCP on the veth device, so
every byte crosses the shaped link: the benchmark checks the veth byte counters and the achieved raw rate
against the limit. UCX's TCP segment size is raised from 8 KiB to 256 KiB by default (``--ucx-env``): with the
stock size UCX itself tops out near 5 Gbit/s on a 2-core machine, below the 10 Gbit/s being emulated.

Per link rate and transfer size (MiB of *uncompressed* BF16 KV), after a warm-up, ``--repeat`` times:

* raw: the initiator READs the raw KV bytes from the target (timed on the initiator, start -> DONE);
* SplitZip: the target encodes (timed), the initiator READs exactly the payload bytes (timed) and decodes them
  (timed) into a separate buffer; the result is checked bitwise against the original (so is every raw READ).

Effective throughput = uncompressed bytes / seconds (SplitZip: encode + transfer + decode, serial, as the
connector does it). The medians are fed to ``CompressionPolicy("auto")`` (splitzip_vllm/connector/policy.py),
whose decision is compared with what was faster.

Codec on one core: each process is pinned to its own core (``os.sched_setaffinity``), ``torch.set_num_threads(1)``.

Data: the real all-MiniLM-L6-v2 K/V eval split (``data/minilm_kv/eval.safetensors``) coded with a codebook
calibrated on the disjoint calib split, tiled to the transfer size; synthetic KV-like data if those files are
missing (``--data synthetic`` forces it).

Needs root (``ip netns``, ``tc``). Cleans up its namespaces at start and at exit.

    sudo .venv/bin/python benchmarks/transfer_bench.py            # 1, 2.5, 10 Gbit/s, unlimited; 4/32/256 MiB
    sudo .venv/bin/python benchmarks/transfer_bench.py --quick    # 4/32 MiB, fewer repetitions (< 2 min)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
NS_T, NS_I = "szb-a", "szb-b"          # target (data owner / prefill), initiator (reader / decode)
DEV_T, DEV_I = "szb-va", "szb-vb"
ADDR_T, ADDR_I = "10.231.0.1", "10.231.0.2"
PREFIX = 30
DEFAULT_RATES = ["1", "2.5", "10", "unlimited"]   # Gbit/s
# UCX's TCP transport moves RMA data in segments of UCX_TCP_{TX,RX}_SEG_SIZE (stock: 8 KiB); with the stock size
# a 2-core machine tops out near 5 Gbit/s through the veth, so a "10 Gbit/s" link would never be the bottleneck.
# 256 KiB segments reach ~13 Gbit/s here. ``--ucx-env`` with no value runs stock UCX.
DEFAULT_UCX_ENV = ["UCX_TCP_TX_SEG_SIZE=256k", "UCX_TCP_RX_SEG_SIZE=256k"]
BURST_MIN, BURST_S = 128 * 1024, 0.25e-3           # tbf bucket: max(128 KiB, 0.25 ms at the rate)


# ==============================================================================================================
# small helpers

def rate_bits(rate: str) -> float | None:
    return None if rate == "unlimited" else float(rate) * 1e9


def rate_label(rate: str) -> str:
    return "unlimited" if rate == "unlimited" else f"{rate} Gbit/s"


def sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()}")
    return r


def nsx(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(["ip", "netns", "exec", ns, *cmd], check=check)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ==============================================================================================================
# data (both roles build the same tensor: the initiator keeps it as the reference for the bitwise check)

def synthetic_base(nbytes: int = 36 * MiB, width: int = 1024, seed: int = 1234):
    """KV-like bf16: Gaussian with log-normal per-channel scales and 8 outlier channels (as codec_bench)."""
    import torch

    def draw(n_tok: int, gen, scale):
        return (torch.randn(n_tok, width, generator=gen) * scale).to(torch.bfloat16).reshape(-1)

    g = torch.Generator().manual_seed(seed)
    scale = 0.3 * torch.exp(0.6 * torch.randn(width, generator=g))
    scale[torch.randperm(width, generator=g)[:8]] *= 16.0
    calib = draw(2048, torch.Generator().manual_seed(seed + 1), scale)
    data = draw(nbytes // (2 * width), torch.Generator().manual_seed(seed + 2), scale)
    return data, [calib], ("synthetic bf16: Gaussian, log-normal per-channel scales + 8 outlier channels; codebook "
                           "from an independent draw (MiniLM K/V files not found)")


def load_dataset(kind: str, data_dir: Path):
    """(flat bf16 eval tensor, calibration tensors, description)."""
    import torch
    calib, ev = data_dir / "calib.safetensors", data_dir / "eval.safetensors"
    if kind == "synthetic" or (kind == "auto" and not (calib.is_file() and ev.is_file())):
        return synthetic_base()
    if not (calib.is_file() and ev.is_file()):
        raise SystemExit(f"--data minilm: {calib} / {ev} missing; run scripts/dump_minilm_kv.py")
    from splitzip_vllm.benchutil import load_bf16_tensors
    base = torch.cat([t.reshape(-1) for _, t in load_bf16_tensors([ev])])
    cal = [t.reshape(-1) for _, t in load_bf16_tensors([calib])]
    return base, cal, (f"all-MiniLM-L6-v2 K/V eval split ({base.numel() * 2 / MiB:.1f} MiB, tiled to each "
                       f"size); codebook calibrated on the disjoint calib split")


def tiled(base, nbytes: int):
    import torch
    n = nbytes // 2
    reps = -(-n // base.numel())
    out = torch.empty(n, dtype=torch.bfloat16)
    pos = 0
    for _ in range(reps):
        k = min(base.numel(), n - pos)
        out[pos:pos + k].copy_(base[:k])
        pos += k
    return out


# ==============================================================================================================
# child processes (run inside the namespaces). Protocol: one JSON object per line, orchestrator -> stdin,
# child -> a private dup of the original stdout (anything else printed to stdout goes to stderr).

def child_main(args) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        os.sched_setaffinity(0, {args.core})
    except OSError as e:
        print(f"[{args.role}] cannot pin to core {args.core}: {e}", file=sys.stderr)
    import torch
    torch.set_num_threads(1)
    from splitzip_vllm.codec import calibrate, decode, encode, encode_capacity, get_backend
    from splitzip_vllm.transport.nixl_agent import NixlTransport

    try:
        max_bytes = args.max_bytes
        max_n = max_bytes // 2
        base, cal, desc = load_dataset(args.data, args.data_dir)
        data = tiled(base, max_bytes)              # target: the KV; initiator: the reference copy
        data_u8 = data.view(torch.uint8)
        backend = get_backend(args.backend)
        tr = NixlTransport(f"szb-{args.role}", backends=["UCX"])
        info = {"event": "ready", "role": args.role, "pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "backend": backend.name, "dataset": desc,
                "base_bytes": base.numel() * 2, "ucx_tls": os.environ.get("UCX_TLS"),
                "ucx_net_devices": os.environ.get("UCX_NET_DEVICES"),
                "ucx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("UCX_")}}
        if args.role == "target":
            cb, hist = calibrate(cal)
            cap = encode_capacity(max_n, 2)
            enc_buf = torch.zeros(cap, dtype=torch.uint8)
            tr.register([(data.data_ptr(), max_bytes), (enc_buf.data_ptr(), cap)], "DRAM")
            info.update(codebook=list(cb.exponents), calib_coverage=hist.coverage(cb),
                        data_addr=data.data_ptr(), enc_addr=enc_buf.data_ptr(), enc_cap=cap)
        else:
            cap = encode_capacity(max_n, 2)
            raw_recv = torch.zeros(max_bytes, dtype=torch.uint8)
            comp_recv = torch.zeros(cap, dtype=torch.uint8)
            dec_out = torch.zeros(max_n, dtype=torch.bfloat16)
            tr.register([(raw_recv.data_ptr(), max_bytes), (comp_recv.data_ptr(), cap)], "DRAM")
        info["metadata"] = base64.b64encode(tr.metadata()).decode()
        send(info)

        peer = None
        remote = {}
        poll_sleep = args.poll_sleep_us / 1e6

        def timed_read(dst_addr: int, src_addr: int, nbytes: int) -> tuple[float, float | None]:
            t0 = time.perf_counter()
            h = tr.read(peer, [(dst_addr, nbytes)], "DRAM", [(src_addr, nbytes)], "DRAM", b"")
            while True:
                st = tr.poll(h)
                if st == "DONE":
                    break
                if st == "ERR":
                    tr.release(h)
                    raise RuntimeError("NIXL READ failed (state ERR)")
                if time.perf_counter() - t0 > args.xfer_timeout:
                    raise RuntimeError(f"NIXL READ of {nbytes} bytes did not finish in {args.xfer_timeout} s")
                if poll_sleep:
                    time.sleep(poll_sleep)
            t1 = time.perf_counter()
            tel = tr.telemetry(h)
            tr.release(h)
            return t1 - t0, (tel.seconds if tel else None)

        for line in sys.stdin:
            msg = json.loads(line)
            cmd = msg["cmd"]
            try:
                if cmd == "quit":
                    send({"ok": True})
                    break
                elif cmd == "peer":                       # initiator: load the target's agent metadata
                    peer = tr.add_peer(base64.b64decode(msg["metadata"]))
                    remote = msg
                    send({"ok": True, "peer": peer.decode() if isinstance(peer, bytes) else str(peer)})
                elif cmd == "encode":                     # target
                    n = msg["size"] // 2
                    x = data[:n]
                    t0 = time.perf_counter()
                    book = cb.exp4() if msg.get("mode") == "exp4" else cb   # default: the codebook's best mode
                    payload = encode(x, book, chunk_log2=args.chunk_log2, backend=backend.name, out=enc_buf)
                    t1 = time.perf_counter()
                    send({"ok": True, "encode_s": t1 - t0, "payload_bytes": int(payload.numel())})
                elif cmd == "read_raw":                   # initiator
                    size = msg["size"]
                    raw_recv[:size].fill_(0)
                    dt, tel = timed_read(raw_recv.data_ptr(), remote["data_addr"], size)
                    ok = bool(torch.equal(raw_recv[:size], data_u8[:size]))
                    send({"ok": True, "xfer_s": dt, "telemetry_s": tel, "verified": ok})
                elif cmd == "read_sz":                    # initiator
                    size, plen = msg["size"], msg["payload_bytes"]
                    n = size // 2
                    comp_recv[:plen].fill_(0)
                    dec_out[:n].fill_(0)
                    dt, tel = timed_read(comp_recv.data_ptr(), remote["enc_addr"], plen)
                    t0 = time.perf_counter()
                    decode(comp_recv[:plen], out=dec_out[:n], backend=backend.name)
                    t1 = time.perf_counter()
                    ok = bool(torch.equal(dec_out[:n].view(torch.int16), data[:n].view(torch.int16)))
                    send({"ok": True, "xfer_s": dt, "telemetry_s": tel, "decode_s": t1 - t0, "verified": ok})
                else:
                    send({"ok": False, "error": f"unknown command {cmd!r}"})
            except Exception as e:  # report, keep serving
                import traceback
                traceback.print_exc()
                send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        tr.close()
    except Exception as e:
        import traceback
        traceback.print_exc()
        send({"event": "fatal", "error": f"{type(e).__name__}: {e}"})
        sys.exit(1)


# ==============================================================================================================
# orchestrator (root namespace)

class Child:
    def __init__(self, role: str, ns: str, dev: str, core: int, args, log_path: Path):
        env = dict(os.environ)
        env.update(UCX_TLS="tcp", UCX_NET_DEVICES=dev, UCX_WARN_UNUSED_ENV_VARS="n", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        env.pop("SPLITZIP_BACKEND", None)
        for kv in args.ucx_env:
            k, _, v = kv.partition("=")
            env[k] = v
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), "--role", role,
               "--core", str(core), "--max-bytes", str(max(args.sizes)), "--data", args.data,
               "--data-dir", str(args.data_dir), "--backend", args.backend, "--chunk-log2", str(args.chunk_log2),
               "--xfer-timeout", str(args.xfer_timeout), "--poll-sleep-us", str(args.poll_sleep_us)]
        self.role = role
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env, cwd=str(ROOT))
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def recv(self, timeout: float) -> dict:
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.role}: no answer within {timeout:.0f} s; log: {self.log_path}\n"
                               + self.log_tail()) from None
        if line is None:
            raise RuntimeError(f"{self.role} exited (rc={self.proc.wait()}); log {self.log_path}:\n"
                               + self.log_tail())
        msg = json.loads(line)
        if msg.get("event") == "fatal" or msg.get("ok") is False:
            raise RuntimeError(f"{self.role}: {msg.get('error')}; log {self.log_path}:\n" + self.log_tail())
        return msg

    def call(self, msg: dict, timeout: float = 120.0) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.recv(timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            self.log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()   # our own child (ip netns exec execs python in place: same pid)
            self.proc.wait(timeout=10)
        self.log.close()


def netns_cleanup() -> None:
    for ns in (NS_T, NS_I):
        sh(["ip", "netns", "del", ns], check=False)
    sh(["ip", "link", "del", DEV_T], check=False)   # only if a half-made veth stayed in the root namespace


def netns_setup(mtu: int | None = None) -> None:
    netns_cleanup()
    sh(["ip", "netns", "add", NS_T])
    sh(["ip", "netns", "add", NS_I])
    sh(["ip", "link", "add", DEV_T, "type", "veth", "peer", "name", DEV_I])
    sh(["ip", "link", "set", DEV_T, "netns", NS_T])
    sh(["ip", "link", "set", DEV_I, "netns", NS_I])
    for ns, dev, addr in ((NS_T, DEV_T, ADDR_T), (NS_I, DEV_I, ADDR_I)):
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        if mtu:
            sh(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu)])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])


def set_rate(rate: str) -> str:
    """Shape both veth ends (the READ data leaves the target through DEV_T). Returns the qdisc as tc shows it."""
    shown = []
    for ns, dev in ((NS_T, DEV_T), (NS_I, DEV_I)):
        nsx(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        bits = rate_bits(rate)
        if bits is not None:
            # the bucket must hold a 64 KiB GSO super-packet; bigger buckets let short transfers beat the rate
            burst = max(BURST_MIN, int(bits / 8 * BURST_S))
            nsx(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bits)}bit", "burst",
                str(burst), "latency", "50ms")
        shown.append(f"{dev}: " + nsx(ns, "tc", "qdisc", "show", "dev", dev).stdout.strip())
    return "; ".join(shown)


def tx_bytes(ns: str, dev: str) -> int:
    out = sh(["ip", "-n", ns, "-s", "-j", "link", "show", dev]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def load_policy_class():
    """CompressionPolicy without importing the vLLM-facing connector package."""
    import importlib.util
    p = ROOT / "splitzip_vllm" / "connector" / "policy.py"
    spec = importlib.util.spec_from_file_location("_splitzip_policy", p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.CompressionPolicy


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in sh(["lscpu"]).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    import torch
    try:
        import importlib.metadata as md
        nixl_v = md.version("nixl")
    except Exception:
        nixl_v = "?"
    return {"host": socket.gethostname(), "cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "nixl": nixl_v, "kernel": platform.release()}


def orchestrate(args) -> int:
    if os.geteuid() != 0:
        raise SystemExit("transfer_bench needs root (ip netns, tc); run it with sudo")
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks (namespace cleanup)
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} (iproute2) not found")
    from tqdm import tqdm
    CompressionPolicy = load_policy_class()

    if args.wait_load:
        t_wait = time.time()
        while os.getloadavg()[0] >= args.wait_load:
            if time.time() - t_wait > args.wait_max:
                print(f"load average still {load_avg()} after {args.wait_max:.0f} s; running anyway", flush=True)
                break
            time.sleep(5)
        else:
            print(f"load average {load_avg()} < {args.wait_load} after {time.time() - t_wait:.0f} s of waiting",
                  flush=True)
    t_start = time.time()
    deadline = t_start + args.max_seconds
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    exe = sys.executable
    if exe.startswith(str(ROOT) + os.sep):
        exe = os.path.relpath(exe, ROOT)
    argv0 = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    results = {"machine": machine_info(), "command": " ".join([exe, argv0] + sys.argv[1:]),
               "rates_gbit": args.rates, "sizes": args.sizes, "repeat": args.repeat, "warmup": args.warmup,
               "chunk_log2": args.chunk_log2, "load_avg_start": load_avg(),
               "link": {"target": f"{NS_T}/{DEV_T} {ADDR_T}/{PREFIX}", "initiator": f"{NS_I}/{DEV_I} {ADDR_I}/{PREFIX}",
                        "shaping": "tc tbf on both veth ends (burst max(128 KiB, 0.25 ms at rate), latency 50 ms)",
                        "mtu": args.mtu or 1500,
                        "ucx": "UCX_TLS=tcp, UCX_NET_DEVICES=<veth>" + "".join(f", {kv}" for kv in args.ucx_env)},
               "rows": []}
    print(f"transfer_bench: rates {', '.join(rate_label(r) for r in args.rates)}; sizes "
          f"{', '.join(f'{s // MiB} MiB' for s in args.sizes)}; warm-up {args.warmup} + {args.repeat} reps; "
          f"load avg {results['load_avg_start']}", flush=True)
    children: list[Child] = []
    failed_checks: list[str] = []
    try:
        netns_setup(args.mtu)
        tgt = Child("target", NS_T, DEV_T, args.cores[0], args, log_dir / "transfer_target.log")
        children.append(tgt)
        ini = Child("initiator", NS_I, DEV_I, args.cores[1], args, log_dir / "transfer_initiator.log")
        children.append(ini)
        t_info = tgt.recv(timeout=180)
        i_info = ini.recv(timeout=180)
        for info in (t_info, i_info):
            print(f"  {info['role']}: pid {info['pid']} cores {info['affinity']} torch threads "
                  f"{info['torch_threads']} codec {info['backend']} "
                  + " ".join(f"{k}={v}" for k, v in info["ucx_env"].items()), flush=True)
        print(f"  data: {t_info['dataset']}", flush=True)
        results["dataset"] = t_info["dataset"]
        results["codec_backend"] = t_info["backend"]
        results["codebook"] = t_info["codebook"]
        results["calib_coverage"] = t_info["calib_coverage"]
        results["processes"] = {k: {f: v[f] for f in ("pid", "affinity", "torch_threads", "backend", "ucx_env")} for k, v in (("target", t_info),
                                                                                       ("initiator", i_info))}
        ini.call({"cmd": "peer", "metadata": t_info["metadata"], "data_addr": t_info["data_addr"],
                  "enc_addr": t_info["enc_addr"]})

        total = len(args.rates) * len(args.sizes) * (args.warmup + args.repeat)
        bar = tqdm(total=total, desc="transfer_bench", unit="rep", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0)
        for rate in args.rates:
            if time.time() > deadline:
                failed_checks.append(f"time budget --max-seconds {args.max_seconds:.0f} exceeded: stopped before "
                                     f"{rate_label(rate)} (partial results)")
                break
            qd = set_rate(rate)
            results.setdefault("qdiscs", {})[rate] = qd
            for size in args.sizes:
                if time.time() > deadline:
                    failed_checks.append(f"time budget --max-seconds {args.max_seconds:.0f} exceeded: stopped before "
                                         f"{rate_label(rate)} {size // MiB} MiB (partial results)")
                    break
                bar.set_postfix_str(f"{rate_label(rate)} {size // MiB} MiB")
                raw, enc, xfer, dec, tot, tel_raw, tel_sz, plen = [], [], [], [], [], [], [], None
                tot4, plen4 = [], None   # the same transfer coded EXP4 only (what v1 could do), side by side
                verified = True
                wire_expected = 0
                tx0 = tx_bytes(NS_T, DEV_T)
                for rep in range(args.warmup + args.repeat):
                    if rep > args.warmup and time.time() > deadline:
                        failed_checks.append(f"time budget exceeded: {rate_label(rate)} {size // MiB} MiB has only "
                                             f"{len(raw)} repetitions")
                        break
                    r = ini.call({"cmd": "read_raw", "size": size})
                    e = tgt.call({"cmd": "encode", "size": size})
                    s = ini.call({"cmd": "read_sz", "size": size, "payload_bytes": e["payload_bytes"]})
                    e4 = tgt.call({"cmd": "encode", "size": size, "mode": "exp4"})
                    s4 = ini.call({"cmd": "read_sz", "size": size, "payload_bytes": e4["payload_bytes"]})
                    verified &= r["verified"] and s["verified"] and s4["verified"]
                    wire_expected += size + e["payload_bytes"] + e4["payload_bytes"]
                    plen4 = e4["payload_bytes"]
                    plen = e["payload_bytes"]
                    if rep >= args.warmup:
                        raw.append(r["xfer_s"])
                        enc.append(e["encode_s"])
                        xfer.append(s["xfer_s"])
                        dec.append(s["decode_s"])
                        tot.append(e["encode_s"] + s["xfer_s"] + s["decode_s"])
                        tot4.append(e4["encode_s"] + s4["xfer_s"] + s4["decode_s"])
                        tel_raw.append(r["telemetry_s"])
                        tel_sz.append(s["telemetry_s"])
                    bar.update(1)
                tx1 = tx_bytes(NS_T, DEV_T)
                raw_s, sz_s = median(raw), median(tot)
                enc_s, xfer_s, dec_s = median(enc), median(xfer), median(dec)
                ratio = size / plen
                pol = CompressionPolicy("auto", expected_ratio=ratio)
                pol.observe_encode(size, plen, enc_s)
                pol.observe_transfer(plen, xfer_s, size, dec_s)
                choice = "compress" if pol.should_compress() else "raw"
                pol_raw = CompressionPolicy("auto", expected_ratio=ratio)   # same, link rate from the raw READ
                pol_raw.observe_encode(size, plen, enc_s)
                pol_raw.observe_transfer(size, raw_s, size, dec_s)
                choice_raw_link = "compress" if pol_raw.should_compress() else "raw"
                faster = "compress" if sz_s < raw_s else "raw"
                achieved_gbit = size * 8 / raw_s / 1e9
                lim = rate_bits(rate)
                row = {"rate": rate, "rate_gbit": None if lim is None else lim / 1e9, "size": size,
                       "payload_bytes": plen, "ratio": ratio, "verified": bool(verified),
                       "raw_s": raw_s, "raw_gbps": size / raw_s / 1e9, "raw_link_gbit": achieved_gbit,
                       "raw_s_all": raw, "sz_s": sz_s, "sz_gbps": size / sz_s / 1e9, "speedup": raw_s / sz_s,
                       "encode_s": enc_s, "xfer_s": xfer_s, "decode_s": dec_s,
                       "encode_gbps": size / enc_s / 1e9, "decode_gbps": size / dec_s / 1e9,
                       "sz_wire_gbit": plen * 8 / xfer_s / 1e9, "sz_s_all": tot, "encode_s_all": enc,
                       "xfer_s_all": xfer, "decode_s_all": dec,
                       "raw_telemetry_s": median([t for t in tel_raw if t]) if any(tel_raw) else None,
                       "sz_telemetry_s": median([t for t in tel_sz if t]) if any(tel_sz) else None,
                       "veth_tx_bytes": tx1 - tx0, "data_bytes_read": wire_expected,
                       "veth_tx_over_data": (tx1 - tx0) / wire_expected,
                       "policy": choice, "policy_describe": pol.describe(), "faster": faster,
                       "policy_right": choice == faster, "policy_with_raw_link": choice_raw_link,
                       "margin": abs(raw_s - sz_s) / min(raw_s, sz_s), "load_avg": load_avg(),
                       "exp4_payload_bytes": plen4, "exp4_ratio": size / plen4, "exp4_sz_s": median(tot4),
                       "exp4_sz_gbps": size / median(tot4) / 1e9, "speedup_over_exp4": median(tot4) / sz_s}
                # link checks: every byte must have crossed the veth; a shaped raw READ must not beat the limit
                if row["veth_tx_over_data"] < 0.98:
                    failed_checks.append(f"{rate_label(rate)} {size // MiB} MiB: veth carried only "
                                         f"{row['veth_tx_over_data']:.2f}x the bytes read (shortcut?)")
                if lim is not None and achieved_gbit > 1.05 * lim / 1e9 and size >= 16 * MiB:
                    failed_checks.append(f"{rate_label(rate)} {size // MiB} MiB: raw READ at {achieved_gbit:.2f} "
                                         f"Gbit/s exceeds the limit")
                if not verified:
                    failed_checks.append(f"{rate_label(rate)} {size // MiB} MiB: bitwise verification FAILED")
                results["rows"].append(row)
                bar.write(f"  {rate_label(rate):>11} {size // MiB:>4} MiB: raw {row['raw_gbps']:.3f} GB/s "
                          f"({achieved_gbit:.2f} Gbit/s on the wire"
                          + (f", {100 * achieved_gbit / (lim / 1e9):.0f} % of the limit" if lim else "")
                          + f"), splitzip {row['sz_gbps']:.3f} GB/s, x{row['speedup']:.2f} (ratio {ratio:.4f}; "
                          f"EXP4 only: {row['exp4_sz_gbps']:.3f} GB/s, ratio {row['exp4_ratio']:.4f}, this run "
                          f"x{row['speedup_over_exp4']:.3f} over it), veth tx/data "
                          f"{row['veth_tx_over_data']:.3f}, policy {choice} ({'right' if row['policy_right'] else 'WRONG'})")
        bar.close()
    finally:
        for c in children:
            c.stop()
        netns_cleanup()
    results["load_avg_end"] = load_avg()
    results["elapsed_s"] = time.time() - t_start
    results["checks_failed"] = failed_checks
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"transfer_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    print()
    print(table)
    print(f"\nJSON: {out}")
    if args.md:
        Path(args.md).write_text(format_markdown(results))
        print(f"markdown: {args.md}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out.parent / "transfer_gbps_vs_rate.png"
        plot(results, png)
        print(f"plot: {png}")
    if failed_checks:
        print("\nCHECKS FAILED:\n  " + "\n  ".join(failed_checks))
        return 1
    print("\nchecks: all transfers verified bitwise; veth byte counters cover every byte read; shaped raw READs "
          "stay under their limits")
    return 0


def format_table(res: dict) -> str:
    m = res["machine"]
    lines = [f"machine: {m['cpu']} ({m['nproc']} CPUs), kernel {m['kernel']}; torch {m['torch']}, nixl {m['nixl']}; "
             f"codec backend {res.get('codec_backend')} on 1 pinned core per side",
             f"data: {res.get('dataset')}",
             f"load average: start {res['load_avg_start']}, end {res.get('load_avg_end')}; "
             f"median of {res['repeat']} reps after {res['warmup']} warm-up; GB/s = uncompressed KV bytes / s "
             f"(1 GB = 1e9 B); splitzip time = encode + READ + decode (serial)",
             "",
             f"{'link':>11} {'size':>7} | {'raw s':>7} {'raw GB/s':>8} {'wire Gb/s':>9} | {'enc s':>6} "
             f"{'READ s':>7} {'dec s':>6} {'SZ s':>7} {'SZ GB/s':>7} | {'ratio':>6} {'speedup':>7} {'vs EXP4':>7} | "
             f"{'policy':>8} {'faster':>8} {'by':>5} {'ok':>3}  load"]
    lines.append("-" * len(lines[-1]))
    for r in res["rows"]:
        lines.append(f"{rate_label(r['rate']):>11} {str(r['size'] // MiB) + ' MiB':>7} | {r['raw_s']:>7.3f} "
                     f"{r['raw_gbps']:>8.3f} {r['raw_link_gbit']:>9.2f} | {r['encode_s']:>6.3f} {r['xfer_s']:>7.3f} "
                     f"{r['decode_s']:>6.3f} {r['sz_s']:>7.3f} {r['sz_gbps']:>7.3f} | {r['ratio']:>6.4f} "
                     f"{r['speedup']:>6.2f}x {r.get('speedup_over_exp4', float('nan')):>6.3f}x | "
                     f"{r['policy']:>8} {r['faster']:>8} {100 * r['margin']:>4.0f}% "
                     f"{'yes' if r['policy_right'] else 'NO':>3}  {r['load_avg'][0]:.1f}")
    lines.append("")
    lines.append("wire Gb/s: raw bytes*8 / raw READ s (must stay under the link limit). policy: CompressionPolicy"
                 "('auto') fed with the medians (encode, wire rate of the payload READ, decode, ratio); faster: the "
                 "measured winner, by: its margin; ok: policy == faster. vs EXP4: SplitZip time of the same transfer "
                 "coded EXP4 only / SplitZip time. Every transfer verified bitwise.")
    return "\n".join(lines)


def format_markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"Command: `{res['command']}`", "",
           f"Machine: {m['cpu']}, nproc {m['nproc']}, kernel {m['kernel']}, torch {m['torch']}, nixl {m['nixl']}; "
           f"codec backend `{res.get('codec_backend')}`, each process pinned to one core, 1 torch thread.", "",
           f"Link: veth pair between two network namespaces, `tc tbf` on both ends; {res['link']['ucx']}; "
           f"MTU {res['link']['mtu']}.", "",
           f"Data: {res.get('dataset')}.", "",
           f"Load average (1/5/15 min): start {res['load_avg_start']}, end {res.get('load_avg_end')}; "
           f"median of {res['repeat']} repetitions after {res['warmup']} warm-up; run took "
           f"{res.get('elapsed_s', 0):.0f} s.", "",
           "| link | size | raw READ s | raw GB/s | raw on wire Gbit/s | encode s | payload READ s | decode s "
           "| SplitZip s | SplitZip GB/s | ratio | speed-up | EXP4-only s | EXP4 ratio | over EXP4 | policy "
           "| faster (margin) | policy right | load (1 min) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in res["rows"]:
        out.append(f"| {rate_label(r['rate'])} | {r['size'] // MiB} MiB | {r['raw_s']:.4f} | {r['raw_gbps']:.3f} | "
                   f"{r['raw_link_gbit']:.2f} | {r['encode_s']:.4f} | {r['xfer_s']:.4f} | {r['decode_s']:.4f} | "
                   f"{r['sz_s']:.4f} | {r['sz_gbps']:.3f} | {r['ratio']:.4f} | {r['speedup']:.2f}x | "
                   + (f"{r['exp4_sz_s']:.4f} | {r['exp4_ratio']:.4f} | {r['speedup_over_exp4']:.3f}x | "
                      if "exp4_sz_s" in r else "- | - | - | ")
                   + f"{r['policy']} | "
                   f"{r['faster']} ({100 * r['margin']:.0f} %) | {'yes' if r['policy_right'] else 'no'} | {r['load_avg'][0]:.2f} |")
    out += ["", "GB/s = uncompressed KV bytes per second (1 GB = 1e9 B). SplitZip s = encode (target) + READ of "
            "the payload + decode (initiator), serial. Every transfer verified bitwise."]
    if res.get("checks_failed"):
        out += ["", "**Checks failed:** " + "; ".join(res["checks_failed"])]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = res["rates_gbit"]
    xs = list(range(len(rates)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, size in enumerate(res["sizes"]):
        rows = {r["rate"]: r for r in res["rows"] if r["size"] == size}
        pts = [(i, rows[rt]) for i, rt in enumerate(rates) if rt in rows]
        if not pts:
            continue
        c = colors[k % len(colors)]
        ax.plot([i for i, _ in pts], [r["raw_gbps"] for _, r in pts], "o-", color=c,
                label=f"raw READ, {size // MiB} MiB")
        ax.plot([i for i, _ in pts], [r["sz_gbps"] for _, r in pts], "s--", color=c,
                label=f"SplitZip e2e, {size // MiB} MiB")
    lim = [(i, float(rt) / 8) for i, rt in enumerate(rates) if rt != "unlimited"]
    if lim:
        ax.plot([i for i, _ in lim], [v for _, v in lim], ":", color="gray", marker="_", markersize=22,
                label="link limit = raw ceiling")
    ax.set_xticks(xs, [("unlimited" if r == "unlimited" else r) for r in rates])
    ax.set_xlabel("link rate (Gbit/s, tc tbf on a veth pair; UCX over TCP)")
    ax.set_ylabel("effective GB/s of uncompressed KV")
    ax.set_yscale("log")
    m = res["machine"]
    ax.set_title(f"NIXL READ: raw vs SplitZip (encode+READ+decode, 1 core each)\n{m['cpu']}, "
                 f"load {res['load_avg_start'][0]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==============================================================================================================

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=None, help="link rates in Gbit/s, or 'unlimited' "
                    f"(default {' '.join(DEFAULT_RATES)})")
    ap.add_argument("--sizes-mib", nargs="+", type=float, default=None,
                    help="MiB of uncompressed KV per transfer (default 4 32 256; --quick 4 32)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 and 32 MiB, 3 repetitions (< 2 min)")
    ap.add_argument("--data", choices=("auto", "minilm", "synthetic"), default="auto",
                    help="auto: MiniLM K/V if data/minilm_kv has it, else synthetic")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "minilm_kv")
    ap.add_argument("--backend", default="auto", help="codec backend (auto = best on CPU)")
    ap.add_argument("--chunk-log2", type=int, default=12)
    ap.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("TARGET", "INITIATOR"),
                    help="cores to pin the target and the initiator to")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/transfer_<host>.json)")
    ap.add_argument("--plot", default=None, help="PNG path (default next to the JSON: transfer_gbps_vs_rate.png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--log-dir", default="/tmp/szb_logs", help="child process logs")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop (with an error) after this long (default 570; --quick 115)")
    ap.add_argument("--xfer-timeout", type=float, default=60.0)
    ap.add_argument("--mtu", type=int, default=None, help="veth MTU (default: the kernel's, 1500)")
    ap.add_argument("--ucx-env", nargs="*", default=list(DEFAULT_UCX_ENV), metavar="KEY=VALUE",
                    help="extra environment for both NIXL/UCX processes (default: "
                    f"{' '.join(DEFAULT_UCX_ENV)}; give the flag with no value for stock UCX)")
    ap.add_argument("--poll-sleep-us", type=float, default=0.0,
                    help="sleep between polls of a READ's state (default 0: busy poll)")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="first wait (up to --wait-max s) until the 1-minute load average is below L")
    ap.add_argument("--wait-max", type=float, default=1800.0)
    ap.add_argument("--md", default=None, help="also write the table as Markdown to this file")
    # internal (child processes)
    ap.add_argument("--role", choices=("target", "initiator"), help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rates = args.rates or list(DEFAULT_RATES)
    for r in args.rates:
        if r != "unlimited":
            float(r)
    sizes = args.sizes_mib or ([4, 32] if args.quick else [4, 32, 256])
    args.sizes = [int(s * MiB) // 2 * 2 for s in sizes]
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.max_seconds = args.max_seconds or (115 if args.quick else 570)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.role:
        child_main(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
