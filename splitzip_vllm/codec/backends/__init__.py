"""Codec backends. Each one implements :class:`CodecBackend` and writes FORMAT.md payloads byte for byte."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..codebook import Codebook


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built or cannot run on this device."""


class CodecBackend(ABC):
    """One implementation of the wire format.

    ``regions`` is a list of contiguous tensors of one dtype whose logical concatenation is the data
    (for the connector: the blocks of one layer of one request in the paged KV cache).
    """
    name: str = ""
    two_level: bool = True   # implements EXP2L (mode 2); without it, encodes with the codebook's EXP4 view

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when the backend is built/importable on this machine."""

    @classmethod
    @abstractmethod
    def supports_device(cls, device: torch.device) -> bool:
        """True when the backend can run on tensors of ``device``."""

    @abstractmethod
    def encode_into(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                    chunk_log2: int, out: torch.Tensor, tag: int = 0) -> None:
        """Write header+body into ``out`` (uint8, ``>= encode_capacity`` bytes, same device), a format-v2
        payload bound to transfer ``tag`` (u64; 0 = unbound, FORMAT.md §6a).

        GPU backends do not synchronise with the host; the length is in the header.
        """

    @abstractmethod
    def decode_into(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                    tag: int = 0) -> None:
        """Decode ``payload`` (uint8, format v1 or v2) into ``regions``; raise ``PayloadError`` on any
        inconsistency, and before writing anything when the payload's transfer tag is not ``tag``."""


_REGISTRY: dict[str, type[CodecBackend]] = {}


def register(cls: type[CodecBackend]) -> type[CodecBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def backend_classes() -> dict[str, type[CodecBackend]]:
    # import for registration side effects; each module guards its own optional imports
    from . import reference_backend  # noqa: F401
    for mod in ("cpu_backend", "cuda_backend", "triton_backend"):
        try:
            __import__(f"{__name__}.{mod}")
        except ImportError:
            pass
    return dict(_REGISTRY)
