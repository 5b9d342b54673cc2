"""Exponent codebooks: calibration (top-22 by frequency), coverage and expected ratio per mode, file I/O.

One codebook serves both coded modes (FORMAT.md §5): EXP4 uses its first 16 exponents, EXP2L its first 7 as
primary and the next 15 as secondary codes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .format import (DEFAULT_CHUNK_LOG2, EXP2L_MAX_PRIMARY, HEADER_BYTES, LUT_ESCAPE, MAX_CODEBOOK, MAX_CODES,
                     Exp2lLayout, Exp4Layout)

FILE_FORMAT = "splitzip-codebook"
FILE_VERSION = 2
FILE_VERSIONS_READ = (1, 2)
MODE_NAMES = ("exp4", "exp2l")


class CodebookError(ValueError):
    """A codebook (file or list) is malformed or does not fit the data."""


@dataclass(frozen=True)
class Codebook:
    """Up to 22 distinct 8-bit BF16 exponents, most frequent first.

    EXP4 code ``j`` stands for ``exponents[j]`` (``j < 16``); EXP2L primary code ``j`` for ``exponents[j]``
    (``j < 7``) and secondary code ``j`` for ``exponents[7 + j]``. ``two_level=False`` restricts encoders to
    EXP4/RAW.
    """
    exponents: tuple[int, ...]
    two_level: bool = True

    def __post_init__(self) -> None:
        ex = tuple(int(e) for e in self.exponents)
        if not 1 <= len(ex) <= MAX_CODEBOOK:
            raise CodebookError(f"a codebook needs 1..{MAX_CODEBOOK} exponents, got {len(ex)}")
        if any(not 0 <= e <= 255 for e in ex):
            raise CodebookError(f"codebook exponents must be 0..255, got {list(ex)}")
        if len(set(ex)) != len(ex):
            raise CodebookError(f"codebook exponents must be distinct, got {list(ex)}")
        object.__setattr__(self, "exponents", ex)
        object.__setattr__(self, "_bytes", bytes(ex))
        object.__setattr__(self, "two_level", bool(self.two_level))

    @property
    def n_codes(self) -> int:
        return len(self.exponents)

    @property
    def modes(self) -> tuple[str, ...]:
        return MODE_NAMES if self.two_level else MODE_NAMES[:1]

    def exp4(self) -> "Codebook":
        """The EXP4-only view (first 16 exponents, no EXP2L): what backends without EXP2L encode with."""
        if not self.two_level and self.n_codes <= MAX_CODES:
            return self
        return Codebook(self.exponents[:MAX_CODES], two_level=False)

    @property
    def primary(self) -> tuple[int, ...]:
        return self.exponents[:EXP2L_MAX_PRIMARY]

    @property
    def secondary(self) -> tuple[int, ...]:
        return self.exponents[EXP2L_MAX_PRIMARY:]

    def as_bytes(self) -> bytes:
        """The exponents as ``bytes`` (cached: the codec backends pass this to the kernels on every call)."""
        return self._bytes  # type: ignore[attr-defined]

    def table16(self) -> bytes:
        """The 16-byte EXP4 header field: the first 16 entries, zero-padded."""
        ex = self.exponents[:MAX_CODES]
        return bytes(ex) + bytes(MAX_CODES - len(ex))

    def encode_lut(self) -> list[int]:
        """256 entries: EXP4 code for each exponent, or ``format.LUT_ESCAPE`` for an escape."""
        lut = [LUT_ESCAPE] * 256
        for j, e in enumerate(self.exponents[:MAX_CODES]):
            lut[e] = j
        return lut

    def to_json(self, **stats) -> dict:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "dtype": "bfloat16",
                "exponents": list(self.exponents), "modes": list(self.modes), **stats}

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
        version = obj.get("version")
        if version not in FILE_VERSIONS_READ:
            raise CodebookError(f"{path}: codebook file version {version} is not supported "
                                f"(this build reads {', '.join(map(str, FILE_VERSIONS_READ))})")
        if obj.get("dtype", "bfloat16") != "bfloat16":
            raise CodebookError(f"{path}: codebook is for dtype {obj.get('dtype')}, only bfloat16 is coded")
        ex = tuple(obj.get("exponents", ()))
        if version == 1 and len(ex) > MAX_CODES:
            raise CodebookError(f"{path}: a version-1 codebook holds at most {MAX_CODES} exponents")
        modes = obj.get("modes", list(MODE_NAMES))
        if not isinstance(modes, list) or "exp4" not in modes or any(m not in MODE_NAMES for m in modes):
            raise CodebookError(f"{path}: modes must list 'exp4' and optionally 'exp2l', got {modes!r}")
        return Codebook(ex, two_level="exp2l" in modes)


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

    def top(self, k: int = MAX_CODEBOOK) -> Codebook:
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
        """Ratio of one payload holding all histogram samples (header and padding included), in the mode an
        encoder would choose (FORMAT.md §5)."""
        return max(self.expected_ratio_mode(cb, m, chunk_log2) for m in ("raw", *cb.modes))

    def expected_ratio_mode(self, cb: Codebook, mode: str, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> float:
        """Ratio of one payload of all samples in ``mode`` (``raw``, ``exp4`` or ``exp2l``); the secondary section
        is estimated with half a byte of padding per chunk."""
        n = self.total
        if mode == "raw" or n == 0:
            body = 2 * n
        elif mode == "exp4":
            m = n - self._count(cb.exponents[:MAX_CODES])
            body = Exp4Layout.compute(n, chunk_log2, m).body_bytes
        elif mode == "exp2l":
            n_sec = n - self._count(cb.primary)
            m = n_sec - self._count(cb.secondary)
            n_chunks = (n + (1 << chunk_log2) - 1) >> chunk_log2
            body = Exp2lLayout.compute(n, chunk_log2, m, (n_sec + 1) // 2 + n_chunks // 2).body_bytes
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return (2 * n) / (HEADER_BYTES + body)

    def _count(self, exps) -> int:
        return sum(int(self.counts[e]) for e in exps)


def calibrate(tensors: Iterable[torch.Tensor], k: int = MAX_CODEBOOK) -> tuple[Codebook, ExponentHistogram]:
    """Top-``k`` codebook by exponent frequency over ``tensors`` (exact zeros count as exponent 0)."""
    h = ExponentHistogram()
    for t in tensors:
        h.update(t)
    return h.top(k), h
