"""C++ CPU backend (``splitzip_vllm._C_cpu``): AVX-512 kernels with a portable scalar fallback.

Importing this module never fails because the extension is missing: ``is_available()`` is then False.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..codebook import Codebook
from ..format import HEADER_BYTES, PayloadError, check_tag, decode_error_message
from . import CodecBackend, register

try:
    from ... import _C_cpu  # type: ignore[attr-defined]
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # extension not built
    _C_cpu = None
    _IMPORT_ERROR = e

_MARKER = "splitzip.PayloadError: "


def _flat(regions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for r in regions:
        if r.device.type != "cpu":
            raise ValueError(f"the cpu codec backend needs CPU tensors, got one on {r.device}")
        out.append(r if r.is_contiguous() else r.contiguous())
    return out


def _reraise(e: RuntimeError, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int, tag: int) -> None:
    """A payload status of the extension ("<marker><status> <aux>") as PayloadError with format.py's message."""
    msg = str(e)
    if not msg.startswith(_MARKER):
        raise e
    status, aux = (int(v) for v in msg[len(_MARKER):].split())
    flat = payload.reshape(-1)
    header = flat[:HEADER_BYTES].numpy().tobytes()
    n = sum(r.numel() for r in regions)
    raise PayloadError(decode_error_message(status, aux, header, flat.numel(), dtype, n, tag), status) from None


@register
class CpuBackend(CodecBackend):
    name = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return _C_cpu is not None

    @classmethod
    def supports_device(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    @staticmethod
    def simd_level() -> int:
        """0 = portable scalar kernels, 1 = AVX-512 kernels."""
        return int(_C_cpu.simd_level()) if _C_cpu is not None else -1

    # The fast paths hand the arguments straight to the extension, which checks device, layout, dtype and
    # bounds itself (a Python-side check costs about as much as encoding a 12 KiB payload). On a ValueError or
    # TypeError the slow path reruns with the Python checks (readable messages) and contiguous copies.

    def encode_into(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                    chunk_log2: int, out: torch.Tensor, tag: int = 0) -> None:
        self.encode_len(regions, dtype, codebook, chunk_log2, out, tag)

    def encode_len(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                   chunk_log2: int, out: torch.Tensor, tag: int = 0) -> int:
        """``encode_into`` that also returns the payload length."""
        cb = codebook.as_bytes() if codebook is not None else None
        two = codebook is not None and codebook.two_level
        try:
            return _C_cpu.encode_into(regions, dtype, cb, len(cb) if cb else 0, chunk_log2, out, tag, two)
        except (ValueError, TypeError):
            return self._encode_checked(regions, dtype, cb, chunk_log2, out, tag, two)

    def _encode_checked(self, regions: Sequence[torch.Tensor], dtype: int, cb: bytes | None, chunk_log2: int,
                        out: torch.Tensor, tag: int, two_level: bool = False) -> int:
        check_tag(tag)
        if out.device.type != "cpu" or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError("the cpu codec backend encodes into a contiguous uint8 CPU tensor")
        return int(_C_cpu.encode_into(_flat(regions), dtype, cb, len(cb) if cb else 0, chunk_log2,
                                      out.reshape(-1), tag, two_level))

    def decode_into(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                    tag: int = 0) -> None:
        try:
            _C_cpu.decode_into(payload, payload.numel(), regions, dtype, tag)
        except (ValueError, TypeError):
            self._decode_checked(payload, regions, dtype, tag)
        except RuntimeError as e:
            _reraise(e, payload, regions, dtype, tag)

    def _decode_checked(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                        tag: int) -> None:
        check_tag(tag)
        if payload.device.type != "cpu":
            raise ValueError(f"the cpu codec backend decodes CPU payloads, got one on {payload.device}")
        if payload.dtype != torch.uint8:
            raise PayloadError(f"a payload is a uint8 buffer, got dtype {payload.dtype}")
        flat = payload.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        for r in regions:
            if not r.is_contiguous():
                raise ValueError("decode destinations must be contiguous (the api stages non-contiguous ones)")
        try:
            _C_cpu.decode_into(flat, flat.numel(), _flat(regions), dtype, tag)
        except RuntimeError as e:
            _reraise(e, flat, regions, dtype, tag)
