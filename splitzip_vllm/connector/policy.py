"""Compression policy: compress only when it makes the prefill->decode hand-off faster.

Serial hand-off of ``S`` raw bytes at ratio ``r`` over a link of ``B`` wire bytes/s, with encode throughput ``E``
(prefill) and decode throughput ``D`` (decode), all measured:

    compressed:  S/E + S/(r*B) + S/D        raw:  S/B
    compress  <=>  1/E + 1/D < (1 - 1/r) / B

Measurements are exponential moving averages; the decode side reports link and decode rates to the prefill side
after every transfer (a NIXL notification). Until the link has been measured, "auto" compresses.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Ema:
    alpha: float = 0.3
    value: float | None = None

    def update(self, x: float) -> None:
        if x > 0:
            self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


class CompressionPolicy:
    """``always``, ``never`` or ``auto`` (decide from measured encode, link and decode rates)."""

    PROBE_EVERY = 32  # while "auto" sends raw, compress one request in this many to keep E and D measured

    def __init__(self, mode: str, expected_ratio: float = 4 / 3):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"unknown compression policy {mode!r}")
        self.mode = mode
        self.ratio = _Ema(value=expected_ratio)
        self.encode_bps = _Ema()
        self.decode_bps = _Ema()
        self.link_bps = _Ema()
        self._raw_streak = 0

    def observe_encode(self, raw_bytes: int, wire_bytes: int, seconds: float) -> None:
        if seconds > 0 and wire_bytes > 0:
            self.encode_bps.update(raw_bytes / seconds)
            self.ratio.update(raw_bytes / wire_bytes)

    def observe_transfer(self, wire_bytes: int, transfer_s: float, raw_bytes: int = 0, decode_s: float = 0.0) -> None:
        if transfer_s > 0 and wire_bytes > 0:
            self.link_bps.update(wire_bytes / transfer_s)
        if decode_s > 0 and raw_bytes > 0:
            self.decode_bps.update(raw_bytes / decode_s)

    def decide(self) -> bool:
        """The decision for the next request: :meth:`should_compress`, plus a periodic probe while raw."""
        if self.should_compress():
            self._raw_streak = 0
            return True
        self._raw_streak += 1
        if self.mode == "auto" and self._raw_streak >= self.PROBE_EVERY:
            self._raw_streak = 0
            return True
        return False

    def should_compress(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        link = self.link_bps.value
        if link is None:
            return True
        r = self.ratio.value or 4 / 3
        if r <= 1.0:
            return False
        codec_s_per_byte = sum(1 / v.value for v in (self.encode_bps, self.decode_bps) if v.value)
        return codec_s_per_byte < (1 - 1 / r) / link

    def describe(self) -> str:
        fmt = lambda v: "?" if v.value is None else f"{v.value / 1e9:.2f} GB/s"  # noqa: E731
        return (f"policy={self.mode} link={fmt(self.link_bps)} encode={fmt(self.encode_bps)} "
                f"decode={fmt(self.decode_bps)} ratio={self.ratio.value:.3f} -> "
                f"{'compress' if self.should_compress() else 'raw'}")
