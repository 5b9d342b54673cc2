"""Public codec API: encode / decode with automatic or forced backend selection."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .backends import BackendUnavailableError, CodecBackend, backend_classes
from .codebook import Codebook
from .format import (DEFAULT_CHUNK_LOG2, HEADER_BYTES, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2, PayloadError,
                     check_tag, dtype_code, dtype_from_code, element_size, encode_capacity, parse_header)

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_instances: dict[str, CodecBackend] = {}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends built here that can run on ``device``, best first."""
    device = torch.device(device)
    classes = backend_classes()
    order = _PREFERENCE.get(device.type, ("reference",))
    extra = [n for n in BACKEND_NAMES if n not in order]
    return [n for n in (*order, *extra)
            if n in classes and classes[n].is_available() and classes[n].supports_device(device)]


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> CodecBackend:
    """Backend by name (``reference``, ``cpu``, ``cuda``, ``triton``) or the best for ``device``.

    ``SPLITZIP_BACKEND`` in the environment overrides ``auto``.
    """
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get("SPLITZIP_BACKEND", "auto")
    if name == "auto":
        avail = available_backends(device)
        if device.type == "cpu" and "triton" in avail and "cpu" not in avail:
            avail.remove("triton")
        name = avail[0]
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown codec backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or auto")
    cls = backend_classes().get(name)
    if cls is None or not cls.is_available():
        raise BackendUnavailableError(f"codec backend {name!r} is not built or importable here "
                                      f"(available: {', '.join(available_backends(device)) or 'none'})")
    if not cls.supports_device(device):
        raise BackendUnavailableError(f"codec backend {name!r} cannot run on device {device}")
    if name not in _instances:
        _instances[name] = cls()
    return _instances[name]


def _as_regions(data: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    regions = [data] if isinstance(data, torch.Tensor) else list(data)
    if regions and any(r.dtype != regions[0].dtype or r.device != regions[0].device for r in regions):
        raise ValueError("all regions must share one dtype and one device")
    return regions


def encode(data: torch.Tensor | Sequence[torch.Tensor], codebook: Codebook | None = None, *,
           chunk_log2: int = DEFAULT_CHUNK_LOG2, backend: str = "auto",
           out: torch.Tensor | None = None, tag: int = 0) -> torch.Tensor:
    """Encode a tensor (or the concatenation of several) into a payload; returns the exact-length bytes.

    Non-contiguous inputs are copied first. ``codebook=None`` or a non-bfloat16 dtype gives a RAW payload.
    ``tag`` binds the payload to a transfer (u64, FORMAT.md §6a); decoding it needs the same tag.
    """
    check_tag(tag)
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk_log2 must be in {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}, got {chunk_log2}")
    regions = _as_regions(data)
    if not regions:
        raise ValueError("nothing to encode: no regions given")
    code = dtype_code(regions[0].dtype)
    regions = [r.contiguous() for r in regions]
    device = regions[0].device
    n = sum(r.numel() for r in regions)
    cap = encode_capacity(n, element_size(code))
    if out is None:
        out = torch.empty(cap, dtype=torch.uint8, device=device)
    elif out.numel() < cap or out.dtype != torch.uint8:
        raise ValueError(f"output buffer must be uint8 with at least {cap} bytes")
    get_backend(backend, device).encode_into(regions, code, codebook, chunk_log2, out, tag)
    length = parse_header(out[:HEADER_BYTES].cpu().numpy().tobytes()).payload_bytes
    return out[:length]


def decode(payload: torch.Tensor | bytes, out: torch.Tensor | Sequence[torch.Tensor] | None = None, *,
           backend: str = "auto", device: torch.device | str | None = None, tag: int = 0) -> torch.Tensor:
    """Decode a payload into ``out`` (tensor or regions) or into a new flat tensor; returns it.

    Raises :class:`PayloadError` for any corrupted, truncated or mismatched payload, and for a payload of
    another transfer (its transfer tag is not ``tag``; FORMAT.md §6a) before writing anything.
    """
    check_tag(tag)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if payload.dtype != torch.uint8:
        raise PayloadError(f"a payload is a uint8 buffer, got dtype {payload.dtype}")
    payload = payload.reshape(-1)
    hdr = parse_header(payload[:HEADER_BYTES].cpu().numpy().tobytes(), payload.numel(), tag)
    if out is None:
        dev = torch.device(device) if device is not None else payload.device
        result: torch.Tensor | list[torch.Tensor] = torch.empty(hdr.n_elems, dtype=dtype_from_code(hdr.dtype),
                                                                device=dev)
        regions = [result]
    else:
        regions = _as_regions(out)
        result = out if isinstance(out, torch.Tensor) else regions
    if not regions:
        raise ValueError("no destination regions given")
    code = dtype_code(regions[0].dtype)
    staged = [(r, r.contiguous()) for r in regions]
    dev = regions[0].device
    if payload.device != dev:
        payload = payload.to(dev)
    get_backend(backend, dev).decode_into(payload, [s for _, s in staged], code, tag)
    for r, s in staged:
        if s is not r:
            r.copy_(s)
    return result  # type: ignore[return-value]
