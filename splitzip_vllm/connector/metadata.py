"""Messages of the connector: scheduler->worker metadata, worker->scheduler manifests, handshake payload."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

# Notification messages, prefixed so other traffic is ignored.
NOTIF_DONE = b"SZ:DONE:"   # decode read (or gave up on) a request: prefill may free it
NOTIF_HB = b"SZ:HB:"       # decode still wants these requests: extend their lease
NOTIF_RATE = b"SZ:RATE:"   # decode measured "wire_bytes,transfer_s,raw_bytes,decode_s" (compression policy)


@dataclass
class RemoteInfo:
    """Where a request's KV lives on the prefill side (from ``kv_transfer_params``)."""
    engine_id: str
    host: str
    port: int
    request_id: str
    tp_size: int
    block_ids: list[int]
    manifests: list[dict[str, Any]] | None   # one per prefill TP rank, see Manifest


@dataclass
class RecvRequest:
    local_block_ids: list[int]   # decode blocks to fill (the blocks not already in the local prefix cache)
    skip_blocks: int             # leading remote blocks decode already holds
    remote: RemoteInfo


@dataclass
class SplitZipConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per engine step."""
    reqs_to_encode: dict[str, list[int]] = field(default_factory=dict)    # prefill: req -> block ids
    reqs_to_recv: dict[str, RecvRequest] = field(default_factory=dict)    # decode: loads to start
    reqs_to_release: dict[str, RemoteInfo] = field(default_factory=dict)  # decode: nothing to read, free P
    reqs_not_sent: set[str] = field(default_factory=set)                  # prefill: aborted, drop its payload
    heartbeats: list[tuple[RemoteInfo, list[str]]] = field(default_factory=list)


class Manifest(msgspec.Struct, kw_only=True):
    """What one prefill TP rank published for one request (travels in ``kv_transfer_params`` as a dict).

    ``mode`` is ``"splitzip"`` (per-layer payloads in the send arena: ``layers[i] = (address, length)``, each
    header carrying the transfer tag derived from ``nonce``, see binding.py) or ``"direct"`` (raw pages read
    straight from the prefill KV cache, then ``ticket = (address, value)`` read to prove they were not freed).
    """
    mode: str
    raw_bytes: int
    wire_bytes: int
    layers: list[tuple[int, int]] = []
    reason: str = ""
    nonce: int = 0
    ticket: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Manifest":
        try:
            return msgspec.convert(d, Manifest, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"malformed KV manifest in kv_transfer_params: {e}") from None


@dataclass
class SplitZipWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: manifests of requests encoded this step, keyed by request then TP rank."""
    manifests: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SplitZipWorkerMetadata)
        for rid, by_rank in other.manifests.items():
            self.manifests.setdefault(rid, {}).update(by_rank)
        return self


@dataclass
class SplitZipHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Per-worker handshake payload (msgpack bytes of a dict; see worker.handshake_dict)."""
    payload: bytes = b""
