"""Adapter exposing the PyTorch reference codec as a backend (any device)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from ..codebook import Codebook
from . import CodecBackend, register


@register
class ReferenceBackend(CodecBackend):
    name = "reference"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def supports_device(cls, device: torch.device) -> bool:
        return True

    def encode_into(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                    chunk_log2: int, out: torch.Tensor, tag: int = 0) -> None:
        payload = reference.encode(regions, dtype, codebook, chunk_log2, tag)
        out[:payload.numel()].copy_(payload)

    def decode_into(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                    tag: int = 0) -> None:
        n = sum(r.numel() for r in regions)
        data = reference.decode(payload, dtype, n, tag)
        off = 0
        for r in regions:
            nb = r.numel() * r.element_size()
            r.view(-1).view(torch.uint8).copy_(data[off:off + nb]) if r.is_contiguous() else \
                r.copy_(data[off:off + nb].view(r.dtype).view(r.shape))
            off += nb
