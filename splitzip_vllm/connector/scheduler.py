"""Scheduler-side half of SplitZipConnector (runs in the EngineCore process)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..transport.side_channel import SideChannelServer
from .config import SplitZipConfig
from .contracts import PROTOCOL_VERSION
from .kv_layout import blocks_per_piece
from .metadata import (RecvRequest, RemoteInfo, SplitZipConnectorMetadata, SplitZipHandshakeMetadata,
                       SplitZipWorkerMetadata)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("splitzip_vllm.connector")

_REMOTE_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")


def remote_info_from_params(params: dict[str, Any]) -> RemoteInfo:
    block_ids = params.get("remote_block_ids") or []
    if block_ids and isinstance(block_ids[0], list):  # per KV-cache group (NIXL convention)
        block_ids = block_ids[0]
    sz = params.get("splitzip") or {}
    transfer_id = str(sz.get("transfer") or "")   # layer-wise: prefill knows the transfer by this name only
    return RemoteInfo(engine_id=str(params["remote_engine_id"]), host=str(params["remote_host"]),
                      port=int(params["remote_port"]), request_id=transfer_id or str(params["remote_request_id"]),
                      tp_size=int(params.get("tp_size") or 1), block_ids=[int(b) for b in block_ids],
                      manifests=sz.get("manifests"), blocks_per_piece=int(sz.get("blocks_per_piece") or 1),
                      transfer_id=transfer_id)


class SplitZipScheduler:
    """Decides what the workers encode (prefill) and load (decode); fills ``kv_transfer_params``."""

    def __init__(self, vllm_config: "VllmConfig", engine_id: str, cfg: SplitZipConfig):
        self.vllm_config = vllm_config
        self.engine_id = engine_id
        self.cfg = cfg
        self.block_size = vllm_config.cache_config.block_size
        dp_index = getattr(vllm_config.parallel_config, "data_parallel_index", 0) or 0
        self.side_host, self.side_port = cfg.resolved_side_channel(dp_index)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.blocks_per_piece = blocks_per_piece(self.block_size, cfg.piece_tokens)
        self.kv_cache_manager = None
        self._server: SideChannelServer | None = None
        # prefill state
        self._pending_encode: dict[str, "Request"] = {}
        self._encoded: set[str] = set()
        self._manifests: dict[str, dict[int, dict[str, Any]]] = {}
        self._awaiting_manifest: dict[str, dict[str, Any]] = {}
        # decode state
        self._reqs_to_recv: dict[str, RecvRequest] = {}
        self._reqs_to_release: dict[str, RemoteInfo] = {}
        self._reqs_not_sent: set[str] = set()
        self._reqs_to_encode: dict[str, list[int]] = {}
        self._transfer_ids: dict[str, str] = {}   # layer-wise requests among _reqs_to_encode
        self._recving: set[str] = set()
        self._reqs_to_cancel: set[str] = set()
        self._heartbeat: dict[str, RemoteInfo] = {}
        self._last_heartbeat = 0.0

    # ---- startup ------------------------------------------------------------------------------------
    def set_handshake_metadata(self, metadata: dict[tuple[int, int], SplitZipHandshakeMetadata]) -> None:
        payloads = {tp: m.payload for (pp, tp), m in metadata.items() if pp == 0 and m is not None}
        if payloads and self._server is None:
            self._server = SideChannelServer(self.side_host, self.side_port, payloads)

    # ---- both roles -----------------------------------------------------------------------------------
    def on_new_request(self, request: "Request") -> None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and all(k in params for k in _REMOTE_KEYS):
            try:
                self._heartbeat[request.request_id] = remote_info_from_params(params)
            except (KeyError, TypeError, ValueError):
                pass

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return 0, False
        if not all(params.get(k) is not None for k in _REMOTE_KEYS):
            return 0, False
        if not params.get("splitzip"):
            logger.warning("request %s asks for a remote prefill but its kv_transfer_params carry no "
                           "'splitzip' manifest (was the prefill server started with SplitZipConnector?); "
                           "recomputing the prompt locally", request.request_id)
            return 0, False
        count = len(request.prompt_token_ids or []) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_decode"):
            self._pending_encode[request.request_id] = request
            return
        if not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        if not params.get("splitzip") or not all(params.get(k) is not None for k in _REMOTE_KEYS):
            return
        remote = remote_info_from_params(params)
        if num_external_tokens > 0:
            groups = blocks.blocks
            skip = sum(1 for b in groups[0] if b.block_hash is not None and not b.is_null)
            local = list(blocks.get_unhashed_block_ids())
            self._reqs_to_recv[request.request_id] = RecvRequest(local, skip, remote)
            self._recving.add(request.request_id)
        else:  # full local prefix hit: nothing to read, let prefill free its copy
            self._reqs_to_release[request.request_id] = remote
            self._heartbeat.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> SplitZipConnectorMetadata:
        for rid, req in list(self._pending_encode.items()):
            n = scheduler_output.num_scheduled_tokens.get(rid, 0)
            if n and req.num_computed_tokens + n >= req.num_prompt_tokens:
                n_blocks = -(-req.num_prompt_tokens // self.block_size)
                block_ids = list(self.kv_cache_manager.get_block_ids(rid)[0][:n_blocks])
                self._reqs_to_encode[rid] = block_ids
                transfer_id = (req.kv_transfer_params or {}).get("splitzip_transfer")
                if transfer_id:   # layer-wise (docs/LAYERWISE.md): published before this step's forward pass
                    self._transfer_ids[rid] = str(transfer_id)
                self._encoded.add(rid)
                del self._pending_encode[rid]
        meta = SplitZipConnectorMetadata(reqs_to_encode=self._reqs_to_encode, transfer_ids=self._transfer_ids,
                                         reqs_to_recv=self._reqs_to_recv,
                                         reqs_to_release=self._reqs_to_release,
                                         reqs_not_sent=self._reqs_not_sent, reqs_to_cancel=self._reqs_to_cancel)
        meta.idle_step = not any(scheduler_output.num_scheduled_tokens.values())
        now = time.monotonic()
        if self._heartbeat and now - self._last_heartbeat >= self.cfg.kv_lease_duration / 6:
            self._last_heartbeat = now
            by_engine: dict[tuple[str, str, int], tuple[RemoteInfo, list[str]]] = {}
            for info in self._heartbeat.values():
                key = (info.engine_id, info.host, info.port)
                by_engine.setdefault(key, (info, []))[1].append(info.request_id)
            meta.heartbeats = list(by_engine.values())
        self._reqs_to_encode, self._reqs_to_recv, self._transfer_ids = {}, {}, {}
        self._reqs_to_release, self._reqs_not_sent, self._reqs_to_cancel = {}, set(), set()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus
        rid = request.request_id
        params = request.kv_transfer_params
        self._heartbeat.pop(rid, None)
        if rid in self._recving:
            # aborted while its KV is loading: vLLM keeps the blocks until the worker reports the load finished;
            # the worker stops reading and tells prefill to free its copy
            self._reqs_to_cancel.add(rid)
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            # decode side, aborted before it was ever scheduled: free the prefill copy
            params["do_remote_prefill"] = False
            if all(params.get(k) is not None for k in _REMOTE_KEYS):
                self._reqs_to_release[rid] = remote_info_from_params(params)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        self._pending_encode.pop(rid, None)
        if rid not in self._encoded:
            return False, None  # aborted before the prompt finished: nothing was prepared
        self._encoded.discard(rid)
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            self._reqs_not_sent.add(rid)
            self._manifests.pop(rid, None)
            return False, None
        n_blocks = -(-request.num_prompt_tokens // self.block_size)
        out: dict[str, Any] = dict(
            do_remote_prefill=True, do_remote_decode=False, remote_block_ids=[list(block_ids[:n_blocks])],
            remote_engine_id=self.engine_id, remote_request_id=rid, remote_host=self.side_host,
            remote_port=self.side_port, tp_size=self.tp_size, remote_num_tokens=request.num_prompt_tokens,
            transfer_mode="pull", splitzip=None)
        manifests = self._manifests.pop(rid, None)
        if manifests is not None:
            out["splitzip"] = self._pack(manifests)
        else:
            self._awaiting_manifest[rid] = out  # filled by update_connector_output of this same step
        return True, out

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, SplitZipWorkerMetadata):
            for rid, by_rank in meta.manifests.items():
                params = self._awaiting_manifest.pop(rid, None)
                if params is not None:
                    params["splitzip"] = self._pack(by_rank)
                elif rid in self._encoded:
                    self._manifests[rid] = by_rank
        for rid in connector_output.finished_recving or ():
            self._heartbeat.pop(rid, None)
            self._recving.discard(rid)
        if self._awaiting_manifest:
            for rid, params in self._awaiting_manifest.items():
                logger.error("no manifest arrived for request %s; decode will recompute its prompt", rid)
            self._awaiting_manifest.clear()

    def _pack(self, by_rank: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "blocks_per_piece": self.blocks_per_piece,
                "manifests": [by_rank[r] for r in sorted(by_rank)]}

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

