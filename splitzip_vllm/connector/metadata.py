"""Messages of the connector: scheduler->worker metadata, worker->scheduler manifests, handshake payload."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)


@dataclass
class RemoteInfo:
    """Where a request's KV lives on the prefill side (from ``kv_transfer_params``)."""
    engine_id: str
    host: str
    port: int
    request_id: str
    tp_size: int
    block_ids: list[int]
    manifests: list[dict[str, Any]] | None   # one per prefill TP rank, see contracts.Manifest
    blocks_per_piece: int = 1
    transfer_id: str = ""    # layer-wise: the proxy's id; manifests come from prefill's mailbox (mailbox.py)


@dataclass
class RecvRequest:
    local_block_ids: list[int]   # decode blocks to fill (the blocks not already in the local prefix cache)
    skip_blocks: int             # leading remote blocks decode already holds
    remote: RemoteInfo


@dataclass
class SplitZipConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per engine step."""
    reqs_to_encode: dict[str, list[int]] = field(default_factory=dict)    # prefill: req -> block ids
    transfer_ids: dict[str, str] = field(default_factory=dict)            # prefill: layer-wise req -> transfer id
    reqs_to_recv: dict[str, RecvRequest] = field(default_factory=dict)    # decode: loads to start
    reqs_to_release: dict[str, RemoteInfo] = field(default_factory=dict)  # decode: nothing to read, free P
    reqs_not_sent: set[str] = field(default_factory=set)                  # prefill: aborted, drop its payload
    reqs_to_cancel: set[str] = field(default_factory=set)                 # decode: aborted while loading
    heartbeats: list[tuple[RemoteInfo, list[str]]] = field(default_factory=list)
    idle_step: bool = False   # no tokens scheduled: the engine is only waiting on transfers (see worker)
    streamed: bool = False    # worker-side: this step's layer-wise requests are published (SplitZipWorker.stream)


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
    """Per-worker handshake payload (msgpack bytes of a contracts.Handshake)."""
    payload: bytes = b""
