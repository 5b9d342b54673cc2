"""SplitZipConnector: the vLLM ``KVConnectorBase_V1`` facade over the scheduler and worker halves."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole, KVConnectorTransferResults)

from .config import SplitZipConfig
from .metadata import SplitZipConnectorMetadata, SplitZipHandshakeMetadata
from .stats import SplitZipPromMetrics, SplitZipStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


def share_vllm_logging(name: str = "splitzip_vllm") -> bool:
    """Send this package's log records through vLLM's handlers and level.

    vLLM's default logging config only configures the ``vllm`` logger, so without this the connector's INFO lines
    (codebook, policy decisions, peers) would be dropped. A config that already gives ``splitzip_vllm`` handlers
    (``VLLM_LOGGING_CONFIG_PATH``) is left alone. Returns whether handlers were attached.
    """
    ours, theirs = logging.getLogger(name), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return False
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(theirs.level)
    ours.propagate = False
    return True


class SplitZipConnector(KVConnectorBase_V1):
    """Prefill/decode KV transfer with lossless SplitZip compression over NIXL (pull mode).

    Enable with ``--kv-transfer-config '{"kv_connector":"SplitZipConnector",
    "kv_connector_module_path":"splitzip_vllm.connector","kv_role":"kv_producer"}'`` (``kv_consumer`` on
    decode servers). Settings go in ``kv_connector_extra_config`` (see :class:`SplitZipConfig`).
    """

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        share_vllm_logging()
        ktc = vllm_config.kv_transfer_config
        self.cfg = SplitZipConfig.from_extra(ktc.kv_connector_extra_config)
        self.engine_id = str(ktc.engine_id)
        self.scheduler = self.worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import SplitZipScheduler
            self.scheduler = SplitZipScheduler(vllm_config, self.engine_id, self.cfg)
        else:
            from .worker import SplitZipWorker
            self.worker = SplitZipWorker(vllm_config, self.engine_id, self.cfg)

    # ---- scheduler side ---------------------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler is not None:
            self.scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def on_new_request(self, request: "Request") -> None:
        self.scheduler.on_new_request(request)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        self.scheduler.set_handshake_metadata({(0, k): v for k, v in metadata.items()})

    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict) -> None:
        self.scheduler.set_handshake_metadata(metadata)

    # ---- worker side ------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> SplitZipHandshakeMetadata | None:
        return self.worker.get_handshake_metadata() if self.worker and self.worker.transport else None

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SplitZipConnectorMetadata)
        if self.worker.is_consumer:
            self.worker.start_load(meta)
        if self.worker.is_producer:
            self.worker.stream(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete (decoded into the cache) before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self.worker.is_producer:   # layer-wise transfers: this layer's pieces may be encoded now
            meta = self._get_connector_metadata()
            assert isinstance(meta, SplitZipConnectorMetadata)
            self.worker.layer_saved(meta, layer_name)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SplitZipConnectorMetadata)
        if self.worker.is_producer:
            self.worker.save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        meta = self._get_connector_metadata()
        idle = isinstance(meta, SplitZipConnectorMetadata) and meta.idle_step
        sending, recving, failed = self.worker.transfer_results(finished_req_ids, idle_step=idle)
        return KVConnectorTransferResults(finished_sending=sending or None, finished_recving=recving or None,
                                          failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending, r.finished_recving

    def build_connector_worker_meta(self):
        return self.worker.worker_meta() if self.worker else None

    def get_kv_connector_stats(self) -> SplitZipStats | None:
        return self.worker.take_stats() if self.worker else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SplitZipStats | None:
        return SplitZipStats(data=data) if data is not None else SplitZipStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return SplitZipPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
