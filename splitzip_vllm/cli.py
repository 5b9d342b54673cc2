"""``splitzip-vllm`` command line: calibrate a codebook, verify lossless round trips, benchmark backends.

    splitzip-vllm calibrate kv_calib.safetensors -o codebook.json
    splitzip-vllm roundtrip kv_eval.safetensors --codebook codebook.json --json
    splitzip-vllm bench kv_eval.safetensors --codebook codebook.json --repeat 5

Input files are ``.safetensors`` or ``.pt`` (a tensor, or a dict/list of tensors); every non-empty bfloat16
tensor in them is used (other dtypes are skipped with a warning). Each tensor is one payload, as the connector
sends one layer's KV blocks of one request as one payload.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__

EXIT_ERROR = 2
EXIT_MISMATCH = 1


def _err(msg: str) -> None:
    print(f"splitzip-vllm: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    _err(f"warning: {msg}")


def _tqdm(it, **kw):
    from tqdm import tqdm
    return tqdm(it, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True, **kw)


def _pct(x: float) -> str:
    return f"{100 * x:.4f} %"


def _nbytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        from .benchutil import CliError
        raise CliError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        from .benchutil import CliError
        raise CliError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .benchutil import CliError
        raise CliError("--device cuda requested but torch sees no CUDA device here")
    return dev


def _histogram(tensors, desc: str):
    from .codec import ExponentHistogram
    h = ExponentHistogram()
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    with _tqdm(tensors, desc=desc, unit="tensor") as bar:
        done = 0
        for _, t in bar:
            h.update(t)
            done += t.numel() * t.element_size()
            bar.set_postfix_str(f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB")
    return h


def _codebook_stats(h, cb, chunk_log2: int) -> dict:
    from .benchutil import entropy_bound_ratio
    cov = h.coverage(cb)
    ent = h.entropy_bits()
    per_mode = {m: h.expected_ratio_mode(cb, m, chunk_log2) for m in ("raw", "exp4", "exp2l")}
    return {"coverage": cov, "expected_ratio": h.expected_ratio(cb, chunk_log2), "entropy_bits": ent,
            "entropy_bound_ratio": entropy_bound_ratio(ent), "samples": h.total,
            "expected_ratio_exp4": per_mode["exp4"], "expected_ratio_exp2l": per_mode["exp2l"],
            "coverage_exp4": h.coverage(cb.exp4())}


# --------------------------------------------------------------------------------------------------------------
# calibrate

def cmd_calibrate(args) -> int:
    from .benchutil import CliError, load_bf16_tensors
    from .codec.format import MAX_CODEBOOK
    if args.model:
        if args.files:
            raise CliError("give either FILES or --model, not both")
        from .model_kv import dump_model_kv
        dump_dir = args.dump_dir or str(Path(args.output).with_suffix("")) + "-kv"
        prompts = None
        if args.prompts:
            try:
                prompts = [ln for ln in Path(args.prompts).read_text().split("\n\n") if ln.strip()]
            except OSError as e:
                raise CliError(f"cannot read --prompts file: {e}") from None
        print(f"running {args.model} with vLLM (prefill side of SplitZipConnector) to capture its paged KV "
              f"into {dump_dir} ...", flush=True)
        if not Path(args.model).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CliError(f"--model {args.model}: no such model directory (HF_HUB_OFFLINE=1, so no hub download)")
        try:
            args.files = dump_model_kv(args.model, dump_dir, prompts=prompts, n_prompts=args.num_prompts,
                                       max_model_len=args.max_model_len)
        except Exception as e:  # vLLM start-up errors are many and varied; report them in one line
            raise CliError(f"could not run --model {args.model} with vLLM: {type(e).__name__}: {e}") from None
        if not args.files:
            raise CliError("vLLM produced no KV dumps (see its log above)")
    if not args.files:
        raise CliError("calibrate needs input FILES (or --model)")
    if not 1 <= args.top <= MAX_CODEBOOK:
        raise CliError(f"--top must be in 1..{MAX_CODEBOOK}, got {args.top}")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliError(f"output folder {out.parent} does not exist")
    tensors = load_bf16_tensors(args.files, warn=_warn)
    h = _histogram(tensors, "calibrate")
    cb = h.top(args.top)
    if args.exp4_only:
        cb = cb.exp4()
    st = _codebook_stats(h, cb, args.chunk_log2)
    try:
        cb.save(out, coverage=st["coverage"], expected_ratio=st["expected_ratio"],
                expected_ratio_exp4=st["expected_ratio_exp4"], expected_ratio_exp2l=st["expected_ratio_exp2l"],
                entropy_bits=st["entropy_bits"], samples=st["samples"], chunk_log2=args.chunk_log2,
                sources=[Path(f).name for f in args.files])
    except OSError as e:
        raise CliError(f"cannot write {out}: {e}") from None
    print(f"calibrated on {len(tensors)} tensor(s) from {len(args.files)} file(s): {st['samples']:,} bfloat16 "
          "values")
    print(f"codebook ({cb.n_codes} exponents, most frequent first): {' '.join(map(str, cb.exponents))}")
    print(f"top-{cb.n_codes} coverage:   {_pct(st['coverage'])}  (escape rate {_pct(1 - st['coverage'])})")
    print(f"exponent entropy:   {st['entropy_bits']:.4f} bits/value  (entropy-bound ratio "
          f"{st['entropy_bound_ratio']:.4f})")
    print(f"expected ratio:     {st['expected_ratio']:.4f}  (all values in one payload, chunk_log2="
          f"{args.chunk_log2}; modes {', '.join(cb.modes)})")
    print(f"  per mode:         EXP4 {st['expected_ratio_exp4']:.4f} (top-16 coverage {_pct(st['coverage_exp4'])}, "
          f"ceiling 1.3333)   EXP2L {st['expected_ratio_exp2l']:.4f}"
          + ("" if cb.two_level else " (disabled: --exp4-only)"))
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# roundtrip

def _read_codebook(spec: str):
    """The codebook of a ``--codebook`` file argument (``None`` for ``auto``/``none``), read before any data."""
    from .codec import Codebook, CodebookError
    if spec in ("auto", "none"):
        return None
    try:
        return Codebook.load(spec)
    except CodebookError as e:
        msg = str(e)
        raise CodebookError(msg if spec in msg else f"{spec}: {msg}") from None


def _load_codebook(spec: str, tensors, preloaded=None):
    """(codebook or None, description, histogram of the data)."""
    h = _histogram(tensors, "histogram")
    if spec == "none":
        return None, "none (RAW payloads)", h
    if spec == "auto":
        return h.top(), "auto (calibrated on the same files)", h
    return preloaded if preloaded is not None else _read_codebook(spec), spec, h


_MODE_NAMES = {0: "RAW", 1: "EXP4", 2: "EXP2L"}


def cmd_roundtrip(args) -> int:
    import torch

    from .benchutil import entropy_bound_ratio, load_bf16_tensors
    from .codec import PayloadError, decode, encode, get_backend, parse_header
    from .codec.format import HEADER_BYTES

    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    device = _resolve_device(args.device)
    backend = get_backend(args.backend, device).name
    cb_file = _read_codebook(args.codebook)
    tensors = load_bf16_tensors(args.files, warn=_warn)
    cb, cb_desc, h = _load_codebook(args.codebook, tensors, cb_file)
    if args.codebook == "auto":
        say("codebook: auto: calibrated on the same files that are compressed (optimistic; pass a codebook "
            "calibrated on other data for a fair figure)")
    rows = []
    raw_total = comp_total = n_total = esc_total = 0
    enc_s = dec_s = 0.0
    all_ok = True
    for name, t in _tqdm(tensors, desc="roundtrip", unit="tensor"):
        x = t.reshape(-1).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        payload = encode(x, cb, chunk_log2=args.chunk_log2, backend=backend)
        sync()
        t1 = time.perf_counter()
        hdr = parse_header(payload[:HEADER_BYTES].cpu().numpy().tobytes(), payload.numel())
        error = None
        try:
            y = decode(payload, backend=backend)
            sync()
            ok = bool(torch.equal(y.view(torch.int16), x.view(torch.int16)))
        except PayloadError as e:
            ok, error = False, str(e)
        t2 = time.perf_counter()
        enc_s += t1 - t0
        dec_s += t2 - t1
        raw = x.numel() * 2
        row = {"name": name, "shape": list(t.shape), "elements": x.numel(), "raw_bytes": raw,
               "compressed_bytes": hdr.payload_bytes, "ratio": raw / hdr.payload_bytes,
               "mode": _MODE_NAMES.get(hdr.mode, str(hdr.mode)), "escapes": hdr.n_escapes,
               "escape_rate": hdr.n_escapes / x.numel(), "bitwise": ok}
        if error:
            row["error"] = error
        rows.append(row)
        raw_total += raw
        comp_total += hdr.payload_bytes
        n_total += x.numel()
        esc_total += hdr.n_escapes
        all_ok &= ok
    ent = h.entropy_bits()
    summary = {
        "ratio": raw_total / comp_total, "bitwise": all_ok, "backend": backend, "device": str(device),
        "raw_bytes": raw_total, "compressed_bytes": comp_total, "elements": n_total, "escapes": esc_total,
        "escape_rate": esc_total / n_total, "tensors": len(rows),
        "raw_payloads": sum(r["mode"] == "RAW" for r in rows), "chunk_log2": args.chunk_log2,
        "modes": {m: sum(r["mode"] == m for r in rows) for m in dict.fromkeys(r["mode"] for r in rows)},
        "codebook": args.codebook, "exponents": list(cb.exponents) if cb else [],
        "coverage": h.coverage(cb) if cb else 0.0, "entropy_bits": ent,
        "entropy_bound_ratio": entropy_bound_ratio(ent), "encode_gbps": raw_total / enc_s / 1e9 if enc_s else None,
        "decode_gbps": raw_total / dec_s / 1e9 if dec_s else None, "files": [str(f) for f in args.files],
    }
    if args.verbose or args.json:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            say(f"  {r['name']:<{width}}  {r['mode']:<5} {_nbytes(r['raw_bytes']):>11} -> "
                f"{_nbytes(r['compressed_bytes']):>11}  ratio {r['ratio']:.4f}  escapes {r['escapes']:>8,} "
                f"({_pct(r['escape_rate'])})  {'ok' if r['bitwise'] else 'MISMATCH ' + r.get('error', '')}")
    say(f"backend {backend} on {device}; codebook {cb_desc}"
        + (f": {' '.join(map(str, cb.exponents))}" if cb else ""))
    say(f"{len(rows)} tensor(s), {n_total:,} values: {_nbytes(raw_total)} -> {_nbytes(comp_total)}")
    say(f"ratio {summary['ratio']:.4f}   escape rate {_pct(summary['escape_rate'])}   exponent entropy "
        f"{ent:.4f} bits (entropy-bound ratio {summary['entropy_bound_ratio']:.4f})")
    say(f"bitwise lossless: {'yes' if all_ok else 'NO'}"
        + ("" if all_ok else f" ({sum(not r['bitwise'] for r in rows)} tensor(s) differ)"))
    if args.json:
        summary["per_tensor"] = rows
        print(json.dumps(summary))
    return 0 if all_ok else EXIT_MISMATCH


# --------------------------------------------------------------------------------------------------------------
# bench

def cmd_bench(args) -> int:
    import torch

    from .benchutil import CliError, SplitZipMethod, baseline_methods, load_bf16_tensors, measure
    from .codec import BACKEND_NAMES, available_backends

    torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    cb_file = _read_codebook(args.codebook)
    tensors = load_bf16_tensors(args.files, warn=_warn)
    xs = [t.reshape(-1).to(device) for _, t in tensors]
    cb, cb_desc, _ = _load_codebook(args.codebook, tensors, cb_file)
    avail = available_backends(device)
    names = args.backends or ([*avail, "memcpy"] + (["zstd", "zipnn"] if device.type == "cpu" else []))
    methods = []
    for n in names:
        if n in BACKEND_NAMES:
            if n not in avail:
                raise CliError(f"backend {n!r} is not available on {device} (available: {', '.join(avail)})")
            methods.append(SplitZipMethod(n, cb, args.chunk_log2))
        elif n not in ("memcpy", "zstd", "zipnn"):
            raise CliError(f"unknown method {n!r}; choose from {' '.join(BACKEND_NAMES)} memcpy zstd zipnn")
        else:
            if n in ("zstd", "zipnn") and device.type != "cpu":
                raise CliError(f"{n} runs on the CPU only; use --device cpu")
            methods.extend(baseline_methods([n], threads=args.threads))
    raw = sum(x.numel() * 2 for x in xs)
    print(f"bench: {len(xs)} tensor(s), {_nbytes(raw)} on {device}, {args.threads} thread(s), median of "
          f"{args.repeat}; codebook {cb_desc}")
    rows = []
    for m in _tqdm(methods, desc="bench", unit="method"):
        m.setup(xs)
        rows.append(measure(m, repeat=args.repeat))
    print(f"{'method':<20} {'ratio':>7} {'encode GB/s':>12} {'decode GB/s':>12}  lossless")
    for r in rows:
        print(f"{r['method']:<20} {r['ratio']:>7.4f} {r['encode_gbps']:>12.3f} {r['decode_gbps']:>12.3f}  "
              f"{'yes' if r['verified'] else 'NO'}")
    if args.json:
        print(json.dumps({"device": str(device), "threads": args.threads, "raw_bytes": raw, "rows": rows}))
    return 0 if all(r["verified"] for r in rows) else EXIT_MISMATCH


# --------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .codec.format import DEFAULT_CHUNK_LOG2, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2
    backends = ("auto", "reference", "cpu", "cuda", "triton")
    chunk = dict(type=int, default=DEFAULT_CHUNK_LOG2, choices=range(MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 + 1),
                 metavar="N", help=f"log2 of the escape-table chunk length, {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2} "
                                   f"(default {DEFAULT_CHUNK_LOG2})")
    p = argparse.ArgumentParser(prog="splitzip-vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"splitzip-vllm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("calibrate", help="build an exponent codebook from KV tensor files",
                       description="Build a top-K exponent codebook (FORMAT.md §7) from bfloat16 KV tensors.")
    c.add_argument("files", nargs="*", metavar="FILES", help=".safetensors / .pt files with bfloat16 tensors")
    c.add_argument("-o", "--output", required=True, help="codebook JSON file to write")
    c.add_argument("--top", type=int, default=22,
                   help="codebook size, 1..22 (default 22: EXP4 uses the first 16, EXP2L 7 primary + 15 secondary)")
    c.add_argument("--exp4-only", action="store_true",
                   help="write a codebook that restricts encoders to EXP4/RAW (at most 16 exponents, no EXP2L)")
    c.add_argument("--chunk-log2", **chunk)
    c.add_argument("--model", help="calibrate from a model run by vLLM (its real paged KV) instead of files")
    c.add_argument("--prompts", help="with --model: text file of prompts separated by blank lines "
                                     "(default: local Python stdlib sources)")
    c.add_argument("--num-prompts", type=int, default=8, help="with --model and no --prompts (default 8)")
    c.add_argument("--max-model-len", type=int, default=4096, help="with --model (default 4096)")
    c.add_argument("--dump-dir", help="with --model: where the captured KV goes (default OUTPUT-kv/)")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("roundtrip", help="encode+decode every tensor, check bitwise equality, report the ratio",
                       description="Encode and decode every bfloat16 tensor (one payload each) with one "
                                   "backend, check bitwise equality, report the ratio over all of them.")
    r.add_argument("files", nargs="+", metavar="FILES")
    r.add_argument("--codebook", default="auto",
                   help="codebook JSON file, 'auto' (calibrate on the same files; default) or 'none' (RAW)")
    r.add_argument("--backend", default="auto", choices=backends, help="codec backend (default: best here)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    r.add_argument("--chunk-log2", **chunk)
    r.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    r.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    r.set_defaults(func=cmd_roundtrip)

    b = sub.add_parser("bench", help="encode/decode throughput of the backends next to memcpy, zstd, ZipNN",
                       description="Throughput (GB/s of uncompressed bytes, median) of each available backend "
                                   "and baselines on the same tensors. benchmarks/codec_bench.py is the full "
                                   "size sweep.")
    b.add_argument("files", nargs="+", metavar="FILES")
    b.add_argument("--backends", nargs="+", metavar="NAME",
                   help="any of reference cpu cuda triton memcpy zstd zipnn (default: all available)")
    b.add_argument("--codebook", default="auto", help="codebook JSON file, 'auto' (default) or 'none'")
    b.add_argument("--repeat", type=int, default=5, help="timed runs per measurement, median reported")
    b.add_argument("--threads", type=int, default=1, help="torch/ZipNN threads (default 1)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    b.add_argument("--chunk-log2", **chunk)
    b.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .benchutil import CliError
    from .codec import BackendUnavailableError, CodebookError, PayloadError, UnsupportedDtypeError
    try:
        return args.func(args)
    except (CliError, CodebookError, PayloadError, BackendUnavailableError, UnsupportedDtypeError) as e:
        kind = {CodebookError: "bad codebook file", PayloadError: "bad payload",
                BackendUnavailableError: "backend unavailable"}.get(type(e), "error")
        _err(f"{kind}: {e}")
        return EXIT_ERROR
    except NotImplementedError as e:
        _err(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
