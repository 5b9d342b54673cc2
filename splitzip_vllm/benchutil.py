"""Shared pieces of ``splitzip-vllm bench`` and ``benchmarks/codec_bench.py``: KV tensor file loading, the
compressors compared side by side (SplitZip backends, torch memcpy, zstd, ZipNN) and a small timer.

Every method is timed on the same input: ``encode`` reads the uncompressed tensor and writes its compressed
form, ``decode`` reads that back into uncompressed bytes. Throughput is always *uncompressed* bytes per second.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .codec import Codebook, encode_capacity, get_backend, parse_header
from .codec.format import HEADER_BYTES, MODE_RAW, dtype_code


class CliError(Exception):
    """A user-facing error (bad file, bad option); printed without a traceback."""


# --------------------------------------------------------------------------------------------------------------
# tensor files

def _walk(obj, prefix: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((prefix or "tensor", obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}[{i}]" if prefix else f"[{i}]", out)


def read_tensor_file(path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """All tensors of a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file as ``(name, tensor)`` pairs."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"no such file: {p}")
    if not p.is_file():
        raise CliError(f"not a file: {p}")
    with p.open("rb") as f:
        head = f.read(8)
    is_zip = head[:4] == b"PK\x03\x04"
    if p.suffix == ".safetensors" or (p.suffix not in (".pt", ".pth", ".bin") and not is_zip):
        try:
            from safetensors.torch import load_file
            tensors = load_file(str(p))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            hint = "" if p.suffix == ".safetensors" else " (expected a .safetensors or .pt file)"
            raise CliError(f"cannot read {p} as safetensors{hint}: {e}") from None
        return list(tensors.items())
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CliError(f"cannot read {p} as a torch .pt file: {e}") from None
    out: list[tuple[str, torch.Tensor]] = []
    _walk(obj, "", out)
    if not out:
        raise CliError(f"{p} holds no tensors (a .pt file must hold a tensor, or a dict/list of tensors)")
    return out


def load_bf16_tensors(paths: Sequence[str | Path], warn: Callable[[str], None] | None = None
                      ) -> list[tuple[str, torch.Tensor]]:
    """The non-empty bfloat16 tensors of every file, named ``file:tensor``; other dtypes are skipped (with a
    warning). A file without any bfloat16 tensor is an error."""
    if not paths:
        raise CliError("no input files given")
    result: list[tuple[str, torch.Tensor]] = []
    for path in paths:
        items = read_tensor_file(path)
        bf = [(n, t) for n, t in items if t.dtype == torch.bfloat16 and t.numel() > 0]
        others = sorted({str(t.dtype).replace("torch.", "") for _, t in items if t.dtype != torch.bfloat16})
        if not bf:
            found = ", ".join(others) or "only empty tensors"
            raise CliError(f"{path} holds no bfloat16 tensors (found: {found}); SplitZip codes bfloat16 KV "
                           "cache only (other dtypes travel RAW)")
        if others and warn:
            warn(f"{path}: skipping {len(items) - len(bf)} non-bfloat16 tensor(s) ({', '.join(others)})")
        name = Path(path).name
        result.extend((f"{name}:{n}", t.detach().contiguous()) for n, t in bf)
    return result


# --------------------------------------------------------------------------------------------------------------
# statistics

def entropy_bits(counts: torch.Tensor) -> float:
    tot = int(counts.sum())
    if tot == 0:
        return 0.0
    p = counts[counts > 0].double() / tot
    return float(-(p * p.log2()).sum())


def entropy_bound_ratio(h_bits: float) -> float:
    """Ratio if the exponent byte were coded at ``h_bits`` bits and the sign+mantissa byte kept raw."""
    return 16.0 / (8.0 + h_bits)


def exponent_counts(t: torch.Tensor) -> torch.Tensor:
    x = t.reshape(-1).view(torch.int16).to(torch.int32)
    return torch.bincount(((x >> 7) & 0xFF).cpu(), minlength=256)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


# --------------------------------------------------------------------------------------------------------------
# timer

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(op: Callable[[object], object], *, prepare: Callable[[], object] | None = None,
            device: torch.device | str = "cpu", repeat: int = 5, warmup: int = 1,
            min_sample_s: float = 0.02, max_inner: int = 10_000, samples: list[float] | None = None) -> float:
    """Median seconds of one ``op(prepare())`` call; ``prepare`` (e.g. a fresh input copy) is not timed.

    Short ops are run ``inner`` times per sample so one sample lasts at least ``min_sample_s``. The per-call
    time of every sample is appended to ``samples`` when given.
    """
    device = torch.device(device)

    def sample(inner: int) -> float:
        total = 0.0
        for _ in range(inner):
            arg = prepare() if prepare else None
            _sync(device)
            t0 = time.perf_counter()
            op(arg)
            _sync(device)
            total += time.perf_counter() - t0
        return total

    first = sample(1)
    inner = 1 if first >= min_sample_s else min(max_inner, max(1, math.ceil(min_sample_s / max(first, 1e-7))))
    for _ in range(max(0, warmup - 1)):
        sample(inner)
    runs = [sample(inner) / inner for _ in range(max(1, repeat))]
    if samples is not None:
        samples.extend(runs)
    return statistics.median(runs)


# --------------------------------------------------------------------------------------------------------------
# methods: each one compresses/decompresses a list of flat bfloat16 tensors (one payload/frame per tensor)

@dataclass
class Method:
    """One compressor under test; ``setup`` binds the inputs, then ``encode``/``decode`` run all of them."""
    name: str
    kind: str = "codec"
    xs: list[torch.Tensor] = field(default_factory=list)

    def setup(self, xs: Sequence[torch.Tensor]) -> None:
        self.xs = [x.reshape(-1) for x in xs]

    @property
    def raw_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.xs)

    def encode(self, arg=None) -> None:
        raise NotImplementedError

    def decode(self, arg=None) -> None:
        raise NotImplementedError

    def encode_input(self):  # untimed per-call preparation of encode()'s argument
        return None

    def compressed_bytes(self) -> int:
        raise NotImplementedError

    def verify(self) -> bool:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.xs[0].device if self.xs else torch.device("cpu")


class SplitZipMethod(Method):
    """A SplitZip codec backend, called at the backend level with preallocated buffers (the connector's hot
    path; the public :func:`encode` adds an allocation and a 96-byte header read per call)."""

    def __init__(self, backend: str, codebook: Codebook | None, chunk_log2: int = 12, exp4_only: bool = False):
        if exp4_only and codebook is not None:
            codebook = codebook.exp4()   # EXP4/RAW only: the v1 codec, for comparison (FORMAT.md §5)
        super().__init__(name=f"splitzip-{backend}" + ("-exp4" if exp4_only else ""), kind="splitzip")
        self.backend_name = backend
        self.codebook = codebook
        self.chunk_log2 = chunk_log2

    def setup(self, xs: Sequence[torch.Tensor]) -> None:
        super().setup(xs)
        self.be = get_backend(self.backend_name, self.device)
        self.outs = [torch.empty(encode_capacity(x.numel(), 2), dtype=torch.uint8, device=x.device)
                     for x in self.xs]
        self.dsts = [torch.empty_like(x) for x in self.xs]
        self.code = dtype_code(torch.bfloat16)
        self.encode()
        _sync(self.device)
        self.headers = [parse_header(o[:HEADER_BYTES].cpu().numpy().tobytes()) for o in self.outs]
        self.payloads = [o[:h.payload_bytes] for o, h in zip(self.outs, self.headers)]

    def encode(self, arg=None) -> None:
        for x, o in zip(self.xs, self.outs):
            self.be.encode_into([x], self.code, self.codebook, self.chunk_log2, o)

    def decode(self, arg=None) -> None:
        for p, d in zip(self.payloads, self.dsts):
            self.be.decode_into(p, [d], self.code)

    def compressed_bytes(self) -> int:
        return sum(h.payload_bytes for h in self.headers)

    @property
    def escapes(self) -> int:
        return sum(h.n_escapes for h in self.headers)

    @property
    def raw_payloads(self) -> int:
        return sum(h.mode == MODE_RAW for h in self.headers)

    @property
    def modes(self) -> dict[int, int]:
        """Payload count per mode (0 RAW, 1 EXP4, 2 EXP2L)."""
        out: dict[int, int] = {}
        for h in self.headers:
            out[h.mode] = out.get(h.mode, 0) + 1
        return out

    def payload_bytes(self) -> list[bytes]:
        return [p.cpu().numpy().tobytes() for p in self.payloads]

    def verify(self) -> bool:
        self.decode()
        _sync(self.device)
        return all(torch.equal(d.view(torch.int16), x.view(torch.int16)) for d, x in zip(self.dsts, self.xs))


class MemcpyMethod(Method):
    """``dst.copy_(src)``: the cost of touching the bytes once, no compression."""

    def __init__(self):
        super().__init__(name="torch-memcpy", kind="baseline")

    def setup(self, xs: Sequence[torch.Tensor]) -> None:
        super().setup(xs)
        self.dsts = [torch.empty_like(x) for x in self.xs]

    def encode(self, arg=None) -> None:
        for x, d in zip(self.xs, self.dsts):
            d.copy_(x)

    decode = encode

    def compressed_bytes(self) -> int:
        return self.raw_bytes

    def verify(self) -> bool:
        self.encode()
        return all(torch.equal(d.view(torch.int16), x.view(torch.int16)) for d, x in zip(self.dsts, self.xs))


class ZstdMethod(Method):
    """zstd (``zstandard``), single thread, one frame per tensor."""

    def __init__(self, level: int = 1):
        import zstandard
        super().__init__(name=f"zstd-{level}", kind="baseline")
        self.cctx = zstandard.ZstdCompressor(level=level, threads=0)
        self.dctx = zstandard.ZstdDecompressor()

    def setup(self, xs: Sequence[torch.Tensor]) -> None:
        super().setup(xs)
        self.srcs = [x.cpu().view(torch.uint8).numpy() for x in self.xs]
        self.encode()

    def encode(self, arg=None) -> None:
        self.frames = [self.cctx.compress(s) for s in self.srcs]

    def decode(self, arg=None) -> None:
        self.outs = [self.dctx.decompress(f) for f in self.frames]

    def compressed_bytes(self) -> int:
        return sum(len(f) for f in self.frames)

    def verify(self) -> bool:
        self.decode()
        return all(o == s.tobytes() for o, s in zip(self.outs, self.srcs))


class ZipNNMethod(Method):
    """ZipNN (``zipnn``), bfloat16 byte grouping + entropy coding, ``threads`` threads.

    ZipNN's ``compress`` rewrites its input buffer in place, so every call gets a fresh copy, made untimed
    in :meth:`encode_input`.
    """

    def __init__(self, threads: int = 1):
        import zipnn
        super().__init__(name="zipnn", kind="baseline")
        self.z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)

    def setup(self, xs: Sequence[torch.Tensor]) -> None:
        super().setup(xs)
        self.srcs = [x.cpu().view(torch.uint8).numpy().tobytes() for x in self.xs]
        self.encode(self.encode_input())

    def encode_input(self):
        return [bytearray(s) for s in self.srcs]

    def encode(self, arg=None) -> None:
        bufs = arg if arg is not None else self.encode_input()
        self.frames = [self.z.compress(b) for b in bufs]

    def decode(self, arg=None) -> None:
        self.outs = [self.z.decompress(f) for f in self.frames]

    def compressed_bytes(self) -> int:
        return sum(len(f) for f in self.frames)

    def verify(self) -> bool:
        self.decode()
        return all(bytes(o) == s for o, s in zip(self.outs, self.srcs))


def baseline_methods(names: Iterable[str], threads: int = 1) -> list[Method]:
    """``memcpy``, ``zstd`` (level 1), ``zipnn`` by name; unavailable ones raise ``CliError``."""
    out: list[Method] = []
    for n in names:
        try:
            if n == "memcpy":
                out.append(MemcpyMethod())
            elif n == "zstd":
                out.append(ZstdMethod(1))
            elif n == "zipnn":
                out.append(ZipNNMethod(threads))
            else:
                raise CliError(f"unknown baseline {n!r} (memcpy, zstd, zipnn)")
        except ImportError as e:
            raise CliError(f"baseline {n!r} needs a package that is not installed: {e}") from None
    return out


def measure(method: Method, *, repeat: int, warmup: int = 1, min_sample_s: float = 0.02) -> dict:
    """Ratio, verification and median encode/decode throughput of a set-up method."""
    ok = method.verify()
    raw = method.raw_bytes
    comp = method.compressed_bytes()
    s_enc: list[float] = []
    s_dec: list[float] = []
    t_enc = time_op(method.encode, prepare=method.encode_input, device=method.device, repeat=repeat,
                    warmup=warmup, min_sample_s=min_sample_s, samples=s_enc)
    t_dec = time_op(method.decode, device=method.device, repeat=repeat, warmup=warmup,
                    min_sample_s=min_sample_s, samples=s_dec)
    return {"method": method.name, "kind": method.kind, "raw_bytes": raw, "compressed_bytes": comp,
            "ratio": raw / comp if comp else float("nan"), "verified": ok,
            "encode_s": t_enc, "decode_s": t_dec, "encode_gbps": gbps(raw, t_enc), "decode_gbps": gbps(raw, t_dec),
            "encode_best_gbps": gbps(raw, min(s_enc)), "decode_best_gbps": gbps(raw, min(s_dec))}
