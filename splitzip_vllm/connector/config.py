"""SplitZipConnector settings, read from ``kv_connector_extra_config`` (keys documented in README)."""
from __future__ import annotations

import os
from typing import Annotated, Any

import msgspec

from ..codec.format import DEFAULT_CHUNK_LOG2, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2

COMPRESSION_POLICIES = ("auto", "always", "never")
DEFAULT_STAGING_BYTES = 64 << 20   # send arena and receive buffer, each: device memory beyond vLLM's KV budget


class ConfigError(ValueError):
    """A ``kv_connector_extra_config`` value is invalid."""


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class SplitZipConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Settings; types and ranges are enforced by msgspec (strict: ``"30"`` is not a number, ``true`` not 1)."""
    codebook: str = "auto"                 # "auto" (calibrate from the first prefills) or a codebook file path
    auto_calibration_requests: Annotated[int, msgspec.Meta(ge=1)] = 4   # "auto": prefills feeding the histogram
    codebook_out: str = ""                 # "auto": write the frozen codebook to this file
    kv_dump_dir: str = ""                  # save KV here (.safetensors): prefill what it publishes, decode what it
                                           # received ("recv-" files)
    kv_dump_max_requests: NonNegInt = 16
    compression: str = "auto"              # "auto" | "always" | "never"
    codec_backend: str = "auto"            # reference | cpu | cuda | triton | auto
    chunk_log2: Annotated[int, msgspec.Meta(ge=MIN_CHUNK_LOG2, le=MAX_CHUNK_LOG2)] = DEFAULT_CHUNK_LOG2
    arena_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = DEFAULT_STAGING_BYTES   # prefill send arena (device)
    recv_buffer_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = DEFAULT_STAGING_BYTES  # decode receive buffer
    index_bytes: Annotated[int, msgspec.Meta(ge=1 << 16)] = 32 << 20   # prefill piece indexes (host memory)
    piece_tokens: Annotated[int, msgspec.Meta(ge=1)] = 128  # tokens per piece (blocks are grouped up to this)
    allow_model_mismatch: bool = False     # accept a prefill serving another model of the same geometry
    kv_lease_duration: Seconds = 30.0      # seconds prefill keeps a request's KV for decode (heartbeat-renewed)
    handshake_timeout: Seconds = 5.0
    transfer_timeout: Seconds = 30.0
    backends: list[str] = msgspec.field(default_factory=lambda: ["UCX"])
    progress_delay_us: Annotated[int, msgspec.Meta(ge=-1)] = -1  # NIXL progress thread: -1 auto (1000 for a CPU
                                           # KV cache, 0 on GPU), 0 NIXL's busy poll, > 0 event-driven bound
    side_channel_host: str = ""            # default: VLLM_NIXL_SIDE_CHANNEL_HOST or localhost
    side_channel_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # default: VLLM_NIXL_SIDE_CHANNEL_PORT
    enforce_handshake_compat: bool = True  # accepted for NixlConnector configs; the handshake always checks

    @staticmethod
    def from_extra(extra: dict[str, Any] | None) -> "SplitZipConfig":
        extra = dict(extra or {})
        known = [f for f in SplitZipConfig.__struct_fields__]
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"unknown SplitZipConnector setting(s) {unknown} in kv_connector_extra_config; "
                              f"known: {sorted(known)}")
        try:
            cfg = msgspec.convert(extra, SplitZipConfig, strict=True)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid SplitZipConnector setting in kv_connector_extra_config: {_explain(e)}") \
                from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.compression not in COMPRESSION_POLICIES:
            raise ConfigError(f"compression must be one of {COMPRESSION_POLICIES}, got {self.compression!r}")
        if self.codebook != "auto" and not os.path.exists(self.codebook):
            raise ConfigError(f"codebook file {self.codebook!r} does not exist "
                              "(create one with `splitzip-vllm calibrate`, or use \"auto\")")

    def resolved_progress_delay_us(self, kv_on_cpu: bool) -> int:
        """Auto: event-driven on CPU (a spinning thread steals a core from the model), NIXL's default on GPU."""
        if int(self.progress_delay_us) >= 0:
            return int(self.progress_delay_us)
        return 1000 if kv_on_cpu else 0

    def resolved_side_channel(self, dp_index: int = 0) -> tuple[str, int]:
        host = self.side_channel_host or os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost")
        port = self.side_channel_port or int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))
        return host, port + dp_index


def _explain(e: msgspec.ValidationError) -> str:
    """msgspec says "Expected `int` >= 0, got `str` - at `$.arena_bytes`"; lead with the setting's name."""
    msg = str(e)
    head, sep, where = msg.rpartition(" - at `$.")
    if not sep:
        return msg
    return f"{where.rstrip('`')}: {head[0].lower()}{head[1:]}"
