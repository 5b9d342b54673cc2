"""Exponent codebooks: calibration (top-16 by frequency), coverage and expected ratio, file I/O."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .format import (DEFAULT_CHUNK_LOG2, HEADER_BYTES, LUT_ESCAPE, MAX_CODES, Exp4Layout)

FILE_FORMAT = "splitzip-codebook"
FILE_VERSION = 1


class CodebookError(ValueError):
    """A codebook (file or list) is malformed or does not fit the data."""


@dataclass(frozen=True)
class Codebook:
    """Up to 16 distinct 8-bit BF16 exponents; code ``j`` stands for ``exponents[j]``."""
    exponents: tuple[int, ...]

    def __post_init__(self) -> None:
        ex = tuple(int(e) for e in self.exponents)
        if not 1 <= len(ex) <= MAX_CODES:
            raise CodebookError(f"a codebook needs 1..{MAX_CODES} exponents, got {len(ex)}")
        if any(not 0 <= e <= 255 for e in ex):
            raise CodebookError(f"codebook exponents must be 0..255, got {list(ex)}")
        if len(set(ex)) != len(ex):
            raise CodebookError(f"codebook exponents must be distinct, got {list(ex)}")
        object.__setattr__(self, "exponents", ex)
        object.__setattr__(self, "_bytes", bytes(ex))

    @property
    def n_codes(self) -> int:
        return len(self.exponents)

    def as_bytes(self) -> bytes:
        """The exponents as ``bytes`` (cached: the codec backends pass this to the kernels on every call)."""
        return self._bytes  # type: ignore[attr-defined]

    def table16(self) -> bytes:
        """The 16-byte header field: entries, zero-padded."""
        return bytes(self.exponents) + bytes(MAX_CODES - self.n_codes)

    def encode_lut(self) -> list[int]:
        """256 entries: code for each exponent, or ``format.LUT_ESCAPE`` for an escape."""
        lut = [LUT_ESCAPE] * 256
        for j, e in enumerate(self.exponents):
            lut[e] = j
        return lut

    def to_json(self, **stats) -> dict:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "dtype": "bfloat16",
                "exponents": list(self.exponents), **stats}

    def save(self, path: str | Path, **stats) -> None:
        Path(path).write_text(json.dumps(self.to_json(**stats), indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> "Codebook":
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CodebookError(f"cannot read codebook file {path}: {e}") from e
        if not isinstance(obj, dict) or obj.get("format") != FILE_FORMAT:
            raise CodebookError(f"{path} is not a splitzip codebook file (missing format={FILE_FORMAT!r})")
        if obj.get("version") != FILE_VERSION:
            raise CodebookError(f"{path}: codebook file version {obj.get('version')} is not supported")
        if obj.get("dtype", "bfloat16") != "bfloat16":
            raise CodebookError(f"{path}: codebook is for dtype {obj.get('dtype')}, only bfloat16 is coded")
        return Codebook(tuple(obj.get("exponents", ())))


class ExponentHistogram:
    """Accumulates the 256-bin BF16 exponent histogram over many tensors."""

    def __init__(self) -> None:
        self.counts = torch.zeros(256, dtype=torch.int64)

    def update(self, t: torch.Tensor) -> None:
        if t.dtype != torch.bfloat16:
            raise CodebookError(f"calibration needs bfloat16 tensors, got {t.dtype}")
        x = t.detach().reshape(-1).view(torch.int16).to(torch.int32)
        e = (x >> 7) & 0xFF
        self.counts += torch.bincount(e.cpu(), minlength=256)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def top(self, k: int = MAX_CODES) -> Codebook:
        if self.total == 0:
            raise CodebookError("no calibration data: the histogram is empty")
        order = sorted(range(256), key=lambda e: (-int(self.counts[e]), e))
        chosen = [e for e in order[:k] if self.counts[e] > 0] or [order[0]]
        return Codebook(tuple(chosen))

    def coverage(self, cb: Codebook) -> float:
        tot = self.total
        return float(sum(int(self.counts[e]) for e in cb.exponents)) / tot if tot else 0.0

    def entropy_bits(self) -> float:
        tot = self.total
        p = [int(c) / tot for c in self.counts if c > 0]
        return -sum(q * math.log2(q) for q in p)

    def expected_ratio(self, cb: Codebook, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> float:
        """Ratio of one payload holding all histogram samples (header and padding included)."""
        n = self.total
        m = n - round(self.coverage(cb) * n)
        body = Exp4Layout.compute(n, chunk_log2, m).body_bytes
        return (2 * n) / (HEADER_BYTES + min(body, 2 * n))


def calibrate(tensors: Iterable[torch.Tensor], k: int = MAX_CODES) -> tuple[Codebook, ExponentHistogram]:
    """Top-``k`` codebook by exponent frequency over ``tensors`` (exact zeros count as exponent 0)."""
    h = ExponentHistogram()
    for t in tensors:
        h.update(t)
    return h.top(k), h
