"""SplitZipConnector settings, read from ``kv_connector_extra_config`` (keys documented in README)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..codec.format import DEFAULT_CHUNK_LOG2, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2

COMPRESSION_POLICIES = ("auto", "always", "never")
PROTOCOL_VERSION = 1


class ConfigError(ValueError):
    """A ``kv_connector_extra_config`` value is invalid."""


@dataclass
class SplitZipConfig:
    codebook: str = "auto"                 # "auto" (calibrate from the first prefills) or a codebook file path
    auto_calibration_requests: int = 4     # "auto": prefills whose KV feed the histogram before it freezes
    codebook_out: str = ""                 # "auto": write the frozen codebook to this file
    kv_dump_dir: str = ""                  # prefill: save the KV of prepared requests here (.safetensors)
    kv_dump_max_requests: int = 16
    compression: str = "auto"              # "auto" | "always" | "never"
    auto_min_link_gbps: float = 0.0        # "auto": compress only while measured link GB/s is below this x codec GB/s
    codec_backend: str = "auto"            # reference | cpu | cuda | triton | auto
    chunk_log2: int = DEFAULT_CHUNK_LOG2
    arena_bytes: int = 0                   # prefill send arena; 0 = a quarter of the local KV cache
    recv_buffer_bytes: int = 0             # decode receive buffer; 0 = a quarter of the local KV cache
    kv_lease_duration: float = 30.0        # seconds prefill keeps a request's KV for decode (heartbeat-renewed)
    handshake_timeout: float = 5.0
    transfer_timeout: float = 30.0
    backends: list[str] = field(default_factory=lambda: ["UCX"])
    progress_delay_us: int = -1            # NIXL progress thread: -1 auto (1000 for a CPU KV cache, 0 on GPU),
                                           # 0 NIXL's busy poll, > 0 event-driven with this wake-up bound
    side_channel_host: str = ""            # default: VLLM_NIXL_SIDE_CHANNEL_HOST or localhost
    side_channel_port: int = 0             # default: VLLM_NIXL_SIDE_CHANNEL_PORT (+ data-parallel index)

    @staticmethod
    def from_extra(extra: dict[str, Any] | None) -> "SplitZipConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(SplitZipConfig)}
        unknown = sorted(set(extra) - known - {"enforce_handshake_compat"})
        if unknown:
            raise ConfigError(f"unknown SplitZipConnector setting(s) {unknown} in kv_connector_extra_config; "
                              f"known: {sorted(known)}")
        cfg = SplitZipConfig(**{k: v for k, v in extra.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.compression not in COMPRESSION_POLICIES:
            raise ConfigError(f"compression must be one of {COMPRESSION_POLICIES}, got {self.compression!r}")
        if not MIN_CHUNK_LOG2 <= int(self.chunk_log2) <= MAX_CHUNK_LOG2:
            raise ConfigError(f"chunk_log2 must be in {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
        if self.codebook != "auto" and not os.path.exists(self.codebook):
            raise ConfigError(f"codebook file {self.codebook!r} does not exist "
                              "(create one with `splitzip-vllm calibrate`, or use \"auto\")")
        if int(self.progress_delay_us) < -1:
            raise ConfigError("progress_delay_us must be -1 (auto), 0 (NIXL's busy poll) or a positive µs bound")
        for name in ("kv_lease_duration", "handshake_timeout", "transfer_timeout"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive")

    def resolved_progress_delay_us(self, kv_on_cpu: bool) -> int:
        """Auto: event-driven on CPU (a spinning thread steals a core from the model), NIXL's default on GPU."""
        if int(self.progress_delay_us) >= 0:
            return int(self.progress_delay_us)
        return 1000 if kv_on_cpu else 0

    def resolved_side_channel(self, dp_index: int = 0) -> tuple[str, int]:
        host = self.side_channel_host or os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost")
        port = self.side_channel_port or int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))
        return host, port + dp_index
