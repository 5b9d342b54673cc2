"""Transfer statistics: vLLM's periodic 'KV Transfer metrics' log line and Prometheus counters."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics, KVConnectorStats,
                                                                  PromMetric, PromMetricT)
from vllm.v1.metrics.utils import create_metric_per_engine

# name -> (prometheus name, help). All are sums over the interval.
COUNTERS: dict[str, tuple[str, str]] = {
    "num_transfers": ("splitzip_transfers", "KV loads completed by the decode side"),
    "raw_bytes": ("splitzip_raw_bytes", "Uncompressed KV bytes delivered to the decode KV cache"),
    "wire_bytes": ("splitzip_wire_bytes", "Bytes read over NIXL for those KV loads (payloads and piece indexes)"),
    "index_read_bytes": ("splitzip_index_read_bytes", "Part of the wire bytes spent reading piece indexes"),
    "transfer_seconds": ("splitzip_transfer_seconds", "Seconds from READ start to READ completion"),
    "decode_seconds": ("splitzip_decode_seconds", "Seconds spent decompressing into the KV cache"),
    "num_encoded": ("splitzip_encoded_requests", "Requests whose KV the prefill side prepared"),
    "encoded_raw_bytes": ("splitzip_encoded_raw_bytes", "Uncompressed KV bytes prepared by the prefill side"),
    "encoded_wire_bytes": ("splitzip_encoded_wire_bytes", "Bytes published for reading by the prefill side"),
    "encode_seconds": ("splitzip_encode_seconds", "Seconds spent compressing on the prefill side"),
    "num_direct": ("splitzip_direct_requests", "Requests sent uncompressed (policy, dtype or full arena)"),
    "num_arena_fallbacks": ("splitzip_arena_fallbacks", "Requests sent uncompressed because the arena was full"),
    "num_failed_transfers": ("splitzip_failed_transfers",
                             "KV loads that failed (peer gone, timeout, corrupted payload, handshake)"),
    "num_rejected": ("splitzip_rejected_transfers",
                     "KV loads rejected by verification (payload of another transfer, revoked raw-KV ticket, "
                     "corrupted payload); included in failed transfers"),
    "num_expired": ("splitzip_expired_requests", "Prefill requests freed by lease expiry without a read"),
    "num_freed": ("splitzip_freed_requests", "Prefill requests whose KV was released (read, expired or aborted)"),
    "arena_alloc_bytes": ("splitzip_arena_alloc_bytes", "Send-arena bytes reserved for published payloads"),
    "arena_free_bytes": ("splitzip_arena_free_bytes", "Send-arena bytes released (read, expired or aborted)"),
    "recv_alloc_bytes": ("splitzip_recv_alloc_bytes", "Receive-buffer bytes reserved for payload READs"),
    "recv_free_bytes": ("splitzip_recv_free_bytes", "Receive-buffer bytes released (decoded or abandoned)"),
    "lw_pieces": ("splitzip_layerwise_pieces", "Layer-wise transfers (prefill): pieces published"),
    "lw_encoded_in_forward": ("splitzip_layerwise_encoded_in_forward",
                              "Layer-wise (prefill): pieces encoded while the forward pass was still running"),
    "lw_read_in_forward": ("splitzip_layerwise_read_in_forward",
                           "Layer-wise (prefill): pieces decode had read by the end of the forward pass's step "
                           "(the transfer hidden behind prefill)"),
}


_LOCK = threading.Lock()   # the encoder / codec threads add while the engine thread takes the interval's sums


@dataclass
class SplitZipStats(KVConnectorStats):
    """Additive counters; serialisable (plain dict of numbers)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {k: 0 for k in COUNTERS}

    def add(self, **kw: float) -> None:
        with _LOCK:
            for k, v in kw.items():
                self.data[k] = self.data.get(k, 0) + v

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def clone_and_reset(self) -> "SplitZipStats":
        with _LOCK:
            out = SplitZipStats(data=dict(self.data))
            self.reset()
        return out

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {}
        if d.get("num_transfers"):
            out.update({
                "Num successful transfers": int(d["num_transfers"]),
                "Raw MB": round(d["raw_bytes"] / 2**20, 3),
                "Wire MB": round(d["wire_bytes"] / 2**20, 3),
                "Ratio": round(d["raw_bytes"] / d["wire_bytes"], 4) if d["wire_bytes"] else 0,
                "Avg xfer time (ms)": round(1e3 * d["transfer_seconds"] / d["num_transfers"], 3),
                "Avg decode time (ms)": round(1e3 * d["decode_seconds"] / d["num_transfers"], 3),
            })
        if d.get("num_encoded"):
            out.update({
                "Num prepared": int(d["num_encoded"]),
                "Prepared ratio": round(d["encoded_raw_bytes"] / d["encoded_wire_bytes"], 4)
                if d["encoded_wire_bytes"] else 0,
                "Avg encode time (ms)": round(1e3 * d["encode_seconds"] / d["num_encoded"], 3),
            })
        out.update({"Num direct": int(d.get("num_direct", 0)),
                    "Num failed transfers": int(d.get("num_failed_transfers", 0)),
                    "Num rejected transfers": int(d.get("num_rejected", 0)),
                    "Num KV expired reqs": int(d.get("num_expired", 0))})
        return out


class SplitZipPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per :data:`COUNTERS` entry, named ``vllm:<name>`` (``_total`` suffixed)."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for key, (name, doc) in COUNTERS.items():
            c = self._counter_cls(name=f"vllm:{name}", documentation=doc, labelnames=labelnames)
            self._counters[key] = create_metric_per_engine(c, self.per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self._counters and value:
                self._counters[key][engine_idx].inc(value)
