"""Shared helpers for the codec tests: backend parametrisation, data generators, payload surgery."""
from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import torch

from splitzip_vllm.codec import Codebook, available_backends, get_backend
from splitzip_vllm.codec.format import HEADER_BYTES, Exp4Layout

BF16 = torch.bfloat16
CUDA = torch.cuda.is_available()


def _cpu_has_scalar_variant() -> bool:
    try:
        from splitzip_vllm import _C_cpu  # type: ignore[attr-defined]
    except ImportError:
        return False
    return _C_cpu.max_simd_level() > 0


def backend_specs(device: str) -> list[str]:
    """Backend specs for ``device``: backend names, plus ``cpu-scalar`` (the C++ portable kernels)."""
    names = list(available_backends(device))
    if device == "cpu" and "cpu" in names and _cpu_has_scalar_variant():
        names.insert(names.index("cpu") + 1, "cpu-scalar")
    return names


def backend_params(include_cuda: bool = True) -> list:
    """pytest params ``(spec, device)`` for every backend usable here; a skipped ``cuda`` param without CUDA."""
    params = [pytest.param(s, "cpu", id=f"{s}@cpu") for s in backend_specs("cpu")]
    if include_cuda:
        if CUDA:
            params += [pytest.param(s, "cuda", id=f"{s}@cuda") for s in backend_specs("cuda")]
        else:
            params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skip(reason="CUDA unavailable")))
    return params


def all_specs() -> list[tuple[str, str]]:
    out = [(s, "cpu") for s in backend_specs("cpu")]
    if CUDA:
        out += [(s, "cuda") for s in backend_specs("cuda")]
    return out


@contextlib.contextmanager
def backend(spec: str, device: str = "cpu") -> Iterator:
    """Yield the backend object for ``spec``; ``cpu-scalar`` switches the C++ kernels to scalar meanwhile."""
    if spec == "cpu-scalar":
        from splitzip_vllm import _C_cpu  # type: ignore[attr-defined]
        old = _C_cpu.simd_level()
        assert _C_cpu.set_simd_level(0) == 0
        try:
            yield get_backend("cpu", device)
        finally:
            _C_cpu.set_simd_level(old)
    else:
        yield get_backend(spec, device)


def api_name(spec: str) -> str:
    return "cpu" if spec == "cpu-scalar" else spec


def run_under_interpreter(test_file: str, *pytest_args: str, timeout: int = 900) -> None:
    """Run pytest on ``test_file`` in a child process with ``TRITON_INTERPRET=1`` set before triton is imported
    (``triton.jit`` fixes compiled vs interpreted when a function is decorated, so a session that imported triton
    compiled cannot switch); fail with the child's output."""
    try:
        import triton  # noqa: F401
    except Exception:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                        *pytest_args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"interpreter run failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-5000:]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view (int16 for 2-byte dtypes, uint8 for bytes, int32 for 4-byte) on the CPU, flat."""
    t = t.detach().reshape(-1).cpu()
    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[size])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.numel() == b.numel(), (a.numel(), b.numel())
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        bad = (ba != bb).nonzero().reshape(-1)
        i = int(bad[0])
        raise AssertionError(f"{bad.numel()} elements differ, first at {i}: {int(ba[i]):#x} != {int(bb[i]):#x}")


def all_bf16_patterns() -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(BF16)


def exponents(t: torch.Tensor) -> torch.Tensor:
    return (bits(t).to(torch.int32) >> 7) & 0xFF


def realistic_bf16(n: int, seed: int = 0, scale: float = 0.05, outlier_rate: float = 0.002) -> torch.Tensor:
    """KV-like data: randn * scale, a few large outliers and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    k = int(n * outlier_rate)
    if k:
        # distinct positions: index_put with duplicate indices is not deterministic
        perm = torch.randperm(n, generator=g)
        x[perm[:k]] = torch.randn(k, generator=g) * 300.0
        x[perm[k:k + max(1, k // 4)]] = 0.0
    return x.to(BF16)


def channel_kv_bf16(n: int, seed: int, outliers: float = 0.002, device: str | torch.device = "cpu") -> torch.Tensor:
    """KV-like data with log-normal per-channel scales (128 channels) and rare huge outliers (escapes)."""
    g = torch.Generator().manual_seed(seed)
    ch = 128
    rows = (n + ch - 1) // ch
    scale = torch.exp(torch.randn(1, ch, generator=g) * 0.7) * 0.05
    x = torch.randn(rows, ch, generator=g) * scale
    if outliers:
        m = torch.rand(rows, ch, generator=g) < outliers
        x = torch.where(m, x * 3000.0 + 1e-30, x)
    return x.reshape(-1)[:n].to(BF16).contiguous().to(device)


def random_bits(n: int, seed: int = 0, dtype: torch.dtype = BF16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.int32).to(torch.uint8)
    return raw.view(dtype)


def top_codebook(t: torch.Tensor, k: int = 16, two_level: bool = False) -> Codebook:
    """Top-``k`` exponents of ``t``; EXP4/RAW only unless ``two_level`` (the EXP2L tests ask for it)."""
    counts = torch.bincount(exponents(t), minlength=256)
    order = sorted(range(256), key=lambda e: (-int(counts[e]), e))
    chosen = [e for e in order[:k] if counts[e] > 0] or [order[0]]
    return Codebook(tuple(chosen), two_level=two_level)


def count_escapes(t: torch.Tensor, cb: Codebook) -> int:
    e = exponents(t)
    inside = torch.zeros(256, dtype=torch.bool)
    inside[list(cb.exponents)] = True
    return int((~inside[e]).sum())


def expected_payload_len(t: torch.Tensor, cb: Codebook | None, chunk_log2: int) -> tuple[int, int]:
    """(payload length, mode) an encoder must produce (FORMAT.md §5), computed independently of any codec."""
    n = t.numel()
    raw = n * t.element_size()
    if cb is not None and t.dtype == BF16 and n > 0:
        body = Exp4Layout.compute(n, chunk_log2, count_escapes(t, cb)).body_bytes
        if body < raw:
            return HEADER_BYTES + body, 1
    return HEADER_BYTES + raw, 0


# ---------------------------------------------------------------------------------------------------------------
# payload surgery
# ---------------------------------------------------------------------------------------------------------------
# written from FORMAT.md §1, independently of splitzip_vllm.codec.format: bytes 0..63 (version 1 ends there),
# then version 2's transfer_tag and ext
HDR_V1 = struct.Struct("<4sBBBBBBHI16sQQQII")
HDR = struct.Struct("<4sBBBBBBHI16sQQQIIQ24s")
FIELDS_V1 = ("magic", "version", "dtype", "mode", "code_bits", "n_codes", "chunk_log2", "reserved", "crc",
             "codebook", "n_elems", "n_escapes", "body_bytes", "checksum_a", "checksum_b")
FIELDS = FIELDS_V1 + ("transfer_tag", "ext")


def _layout(version: int) -> tuple[struct.Struct, tuple[str, ...]]:
    return (HDR_V1, FIELDS_V1) if version == 1 else (HDR, FIELDS)


def header_fields(payload: bytes | bytearray) -> dict:
    st, names = _layout(payload[4])
    return dict(zip(names, st.unpack(bytes(payload[:st.size]))))


def reseal(buf: bytearray) -> bytearray:
    """Recompute the header CRC of ``buf`` in place (zlib.crc32 with the CRC field zeroed) over the header length
    of the version byte in ``buf`` (64 for version 1, else 96)."""
    hb = _layout(buf[4])[0].size
    buf[12:16] = b"\0\0\0\0"
    buf[12:16] = struct.pack("<I", zlib.crc32(bytes(buf[:hb])) & 0xFFFFFFFF)
    return buf


def with_fields(payload: bytes | bytearray, seal: bool = True, **fields) -> bytearray:
    """``payload`` with header fields replaced (packed in the layout of the payload's own version)."""
    st, names = _layout(payload[4])
    f = header_fields(payload)
    f.update(fields)
    buf = bytearray(payload)
    buf[:st.size] = st.pack(*(f[k] for k in names))
    return reseal(buf) if seal else buf


def to_v1(payload: bytes | bytearray | torch.Tensor) -> bytearray:
    """The format-v1 payload of the same data: bytes 0..63 of a (v2) payload's header with version 1, resealed
    over 64 bytes, then the body (FORMAT.md §8). The v2 payload's transfer tag is dropped."""
    if isinstance(payload, torch.Tensor):
        payload = payload.cpu().numpy().tobytes()
    f = header_fields(payload)
    assert f["version"] == 2
    f["version"] = 1
    head = bytearray(HDR_V1.pack(*(f[k] for k in FIELDS_V1)))
    return reseal(head + bytes(payload[HDR.size:]))


def to_tensor(buf: bytes | bytearray | Sequence[int]) -> torch.Tensor:
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(buf)
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8)


class Canary:
    """Destination regions embedded in a larger canary-filled buffer (gaps between and around them)."""

    PAD = 67  # elements of canary around and between the regions

    def __init__(self, sizes: Sequence[int], dtype: torch.dtype, device: str = "cpu", fill: int = 0xA5):
        esz = torch.empty(0, dtype=dtype).element_size()
        total = sum(sizes) + self.PAD * (len(sizes) + 1)
        self.raw = torch.full((total * esz,), fill, dtype=torch.uint8, device=device)
        self.fill = fill
        self.esz = esz
        self.buf = self.raw.view(dtype)
        self.regions: list[torch.Tensor] = []
        self.spans: list[tuple[int, int]] = []
        off = self.PAD
        for s in sizes:
            self.regions.append(self.buf[off:off + s])
            self.spans.append((off * esz, (off + s) * esz))
            off += s + self.PAD

    def check(self) -> None:
        mask = torch.ones(self.raw.numel(), dtype=torch.bool, device=self.raw.device)
        for a, b in self.spans:
            mask[a:b] = False
        outside = self.raw[mask]
        bad = (outside != self.fill).nonzero().reshape(-1)
        assert bad.numel() == 0, f"decoder wrote {bad.numel()} bytes outside its destination"

    def untouched(self) -> bool:
        """Nothing written at all, regions included (a decode refused before writing)."""
        return bool((self.raw == self.fill).all())

    def data(self) -> torch.Tensor:
        return torch.cat([r.reshape(-1).cpu() for r in self.regions]) if self.regions else self.buf[:0].cpu()
