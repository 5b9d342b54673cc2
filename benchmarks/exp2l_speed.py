#!/usr/bin/env python3
"""EXP2L vs EXP4 vs memcpy on one core, interleaved (issue 10 acceptance on a shared machine).

Each round times memcpy, then EXP2L and EXP4 encode/decode of the same MiniLM eval piece(s), back to back; the
figure per round is codec GB/s / memcpy GB/s of that round, reported as the median over rounds (so a load change
on a shared host moves both sides of a ratio alike). Payload sizes: one piece of 192 KiB and one of 3 MiB (a
256-token request's layer K, and one MiniLM layer's K over 16 requests), codebook calibrated on the calib split.

    python benchmarks/exp2l_speed.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _gbps(fn, nbytes: int, min_s: float = 0.02) -> float:
    fn()
    reps, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t = time.perf_counter() - t0
        if t >= min_s:
            return nbytes * reps / t / 1e9
        reps *= 2


def main(argv=None) -> int:
    import torch
    from safetensors.torch import load_file

    from splitzip_vllm.codec import calibrate, get_backend
    from splitzip_vllm.codec.format import encode_capacity

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "minilm_kv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cb, _ = calibrate(load_file(str(args.data_dir / "calib.safetensors")).values())
    ev = load_file(str(args.data_dir / "eval.safetensors"))
    be = get_backend("cpu")
    out = {}
    for size in (192 << 10, 3 << 20):
        x = ev["layer3.k"].reshape(-1)[:size // 2].contiguous()
        dst, cpy = torch.empty_like(x), torch.empty_like(x)
        res = {}
        for name, book in (("exp2l", cb), ("exp4", cb.exp4())):
            buf = torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8)
            n = be.encode_len([x], 1, book, 12, buf)
            pay = buf[:n].clone()
            be.decode_into(pay, [dst], 1)
            assert torch.equal(dst.view(torch.int16), x.view(torch.int16))
            res[name] = (book, buf, pay, x.numel() * 2 / n, int(pay[6]))
        rows = {k: [] for k in ("memcpy", "exp2l_enc", "exp2l_dec", "exp4_enc", "exp4_dec")}
        for _ in range(args.rounds):
            m = _gbps(lambda: cpy.copy_(x), size)
            rows["memcpy"].append(m)
            for name, (book, buf, pay, _, _) in res.items():
                rows[f"{name}_enc"].append(_gbps(lambda: be.encode_len([x], 1, book, 12, buf), size) / m)
                rows[f"{name}_dec"].append(_gbps(lambda: be.decode_into(pay, [dst], 1), size) / m)
        out[size] = {"memcpy_gbps_median": statistics.median(rows["memcpy"]),
                     **{k: statistics.median(v) for k, v in rows.items() if k != "memcpy"},
                     "ratio_exp2l": res["exp2l"][3], "mode_exp2l": res["exp2l"][4],
                     "ratio_exp4": res["exp4"][3], "mode_exp4": res["exp4"][4]}
        o = out[size]
        print(f"{size >> 10:>5} KiB  memcpy {o['memcpy_gbps_median']:6.2f} GB/s | x memcpy (median of "
              f"{args.rounds} rounds): EXP2L enc {o['exp2l_enc']:.2f} dec {o['exp2l_dec']:.2f} (ratio "
              f"{o['ratio_exp2l']:.4f}) | EXP4 enc {o['exp4_enc']:.2f} dec {o['exp4_dec']:.2f} (ratio "
              f"{o['ratio_exp4']:.4f})")
    print(json.dumps({str(k): v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
