"""Worker-side half of SplitZipConnector: builds the KV layout, the transport, the producer (prefill) and the
consumer (decode), serves the handshake, and checks peers. The work itself lives in producer.py / consumer.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

import msgspec
import torch

from ..codec import get_backend
from ..codec.codebook import Codebook, ExponentHistogram
from ..codec.format import VERSION as FORMAT_VERSION
from ..transport.nixl_agent import NixlTransport, mem_type_of
from ..transport.side_channel import fetch_handshake
from .budget import ModelGeometry, check_staging
from .config import SplitZipConfig
from .consumer import Consumer
from .loads import LoadError, check_tp
from .contracts import PROTOCOL_VERSION, Handshake, LayerSpec
from .kv_layout import KVGeometry, KVLayout, PiecePlan, blocks_per_piece
from .metadata import SplitZipConnectorMetadata, SplitZipHandshakeMetadata, SplitZipWorkerMetadata
from .peers import IncompatiblePeerError, PeerBook
from .policy import CompressionPolicy
from .producer import Producer
from .stats import SplitZipStats

logger = logging.getLogger("splitzip_vllm.connector")

MIN_FORMAT_VERSION = 1   # oldest wire-format version the codec still decodes
POLL_EVERY_S = 0.0005    # engine steps closer together than this skip the transport poll
# An engine whose only requests are finished-but-held (prefill) or loading (decode) runs empty steps back to
# back. Under TP>1 that is a multi-process spin (engine + workers yielding on vLLM's shared-memory queue) that
# starved the API server on a 2-core host until the lease expired (prefill answered only then). A sleep per
# empty step ends the spin; it costs a new request at most that long before the engine sees it.
# Loads in flight advance once per step, so they get the short wait.
IDLE_STEP_WAIT_S = 0.002
LOADING_STEP_WAIT_S = 0.001


def model_fingerprint(vllm_config: Any) -> str:
    """Hash of the model's architecture config (not its path): equal for the same model on any machine."""
    try:
        cfg = vllm_config.model_config.hf_config.to_dict()
    except AttributeError:
        cfg = {"model": str(vllm_config.model_config.model)}
    for k in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path"):
        cfg.pop(k, None)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def kv_dtype_name(vllm_config: Any, dtype: torch.dtype) -> tuple[str, str]:
    """(cache dtype string, FP8 scale source) as the handshake compares them."""
    cache = vllm_config.cache_config
    name = str(getattr(cache, "cache_dtype", "auto"))
    if name == "auto":
        name = str(dtype).replace("torch.", "")
    scales = ""
    if name.startswith("fp8"):
        scales = "dynamic" if getattr(cache, "calculate_kv_scales", False) else "checkpoint"
    return name, scales


class SplitZipWorker:
    def __init__(self, vllm_config: Any, engine_id: str, cfg: SplitZipConfig):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        self.vllm_config = vllm_config
        self.engine_id = engine_id
        self.cfg = cfg
        role = vllm_config.kv_transfer_config.kv_role
        self.is_producer = role in ("kv_producer", "kv_both")
        self.is_consumer = role in ("kv_consumer", "kv_both")
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.block_size = vllm_config.cache_config.block_size
        self.model = str(vllm_config.model_config.model)
        self.total_heads = vllm_config.model_config.get_total_num_kv_heads()
        self.bpp = blocks_per_piece(self.block_size, cfg.piece_tokens)
        self.stats = SplitZipStats()
        self.policy = CompressionPolicy(cfg.compression)
        self.transport: NixlTransport | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.peers: PeerBook | None = None
        self._new_manifests: dict[str, dict[int, dict[str, Any]]] = {}
        self._codebook: Codebook | None = None
        self._hist: ExponentHistogram | None = None
        self._calibrated_requests = 0
        self._dumped = 0
        self._last_mode: str | None = None
        self._last_poll = 0.0

    # ---- setup --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        mc = self.vllm_config.model_config
        geo = KVGeometry(self.block_size, mc.get_num_kv_heads(self.vllm_config.parallel_config), mc.get_head_size())
        self.layout = lay = KVLayout(kv_caches, geo)
        check_staging(self.cfg, ModelGeometry.from_layout(lay, self.tp_size, self.total_heads),
                      self.vllm_config.kv_transfer_config.kv_role)
        self.kv_dtype, self.kv_scales = kv_dtype_name(self.vllm_config, lay.dtype)
        self.backend = get_backend(self.cfg.codec_backend, lay.device) if lay.dtype == torch.bfloat16 else None
        if self.backend is None:
            logger.warning("SplitZipConnector: KV cache dtype %s has no SplitZip coding; KV moves uncompressed "
                           "through the same path", lay.dtype)
        self.mem_type = mem_type_of(lay.layers[0].tensor)
        self.device_id = lay.device.index or 0 if lay.device.type != "cpu" else 0
        self.transport = NixlTransport(f"splitzip-{self.engine_id}-tp{self.tp_rank}-{uuid.uuid4().hex[:8]}",
                                       self.cfg.backends,
                                       progress_delay_us=self.cfg.resolved_progress_delay_us(lay.device.type == "cpu"))
        self.transport.register(lay.storages(), self.mem_type, self.device_id)
        regs = []
        if self.is_producer:
            self._load_codebook()
            self.producer = Producer(engine_id=self.engine_id, tp_rank=self.tp_rank, layout=lay,
                                     arena_bytes=self.cfg.arena_bytes, index_bytes_=self.cfg.index_bytes,
                                     lease_s=self.cfg.kv_lease_duration, backend=self.backend, policy=self.policy,
                                     stats=self.stats, chunk_log2=self.cfg.chunk_log2,
                                     codebook_source=self._codebook_for)
            regs += self.producer.registrations()
        if self.is_consumer:
            self.peers = PeerBook(self.transport, self._check_peer, self.cfg.handshake_timeout, fetch_handshake)
            self.consumer = Consumer(layout=lay, transport=self.transport, peers=self.peers, tp_rank=self.tp_rank,
                                     tp_size=self.tp_size, total_heads=self.total_heads,
                                     recv_bytes=self.cfg.recv_buffer_bytes, timeout_s=self.cfg.transfer_timeout,
                                     backend=self.backend, stats=self.stats,
                                     dump=self._dump_kv if self.cfg.kv_dump_dir else None)
            regs += self.consumer.registrations()
        for addr, size, mem in regs:
            self.transport.register([(addr, size)], mem, self.device_id if mem != "DRAM" else 0)
        self._handshake = self.handshake()
        logger.info("SplitZipConnector worker tp%d: %s, codec %s, pieces of %d blocks, send arena %d B, receive "
                    "buffer %d B", self.tp_rank, lay.describe(), self.backend.name if self.backend else "none (raw)",
                    self.bpp, self.cfg.arena_bytes if self.producer else 0,
                    self.cfg.recv_buffer_bytes if self.consumer else 0)

    def handshake(self) -> Handshake:
        lay = self.layout
        return Handshake(
            protocol=PROTOCOL_VERSION, format_versions=(MIN_FORMAT_VERSION, FORMAT_VERSION),
            engine_id=self.engine_id, tp_rank=self.tp_rank, tp_size=self.tp_size, model=self.model,
            model_fingerprint=model_fingerprint(self.vllm_config), kv_dtype=self.kv_dtype, kv_scales=self.kv_scales,
            two_level=self._two_level(),
            block_size=self.block_size, total_kv_heads=self.total_heads, head_size=lay.geo.head_size,
            layout=lay.kind, piece_order=lay.piece_order, element_size=lay.element_size,
            layers=[LayerSpec(*l.spec()) for l in lay.layers], agent_metadata=self.transport.metadata(),
            mem_type=self.mem_type, device_id=self.device_id,
            mailbox_addr=self.producer.mailbox.base if self.producer is not None else 0)

    def _two_level(self) -> bool:
        """Prefill: whether its payloads may be EXP2L; decode: whether its codec reads EXP2L."""
        if self.backend is None or not self.backend.two_level:
            return False
        if self.is_producer and self._codebook is not None and self._hist is None:
            return self._codebook.two_level   # a codebook file (an "auto" codebook is two-level)
        return True

    def get_handshake_metadata(self) -> SplitZipHandshakeMetadata:
        return SplitZipHandshakeMetadata(payload=msgspec.msgpack.encode(self._handshake))

    def _check_peer(self, info: Handshake, engine_id: str) -> None:
        """Refuse a prefill worker whose KV decode would misread; every message names what to align."""
        mine = self._handshake
        if info.engine_id != engine_id:
            raise IncompatiblePeerError(f"side channel serves engine {info.engine_id}, kv_transfer_params name "
                                        f"{engine_id}")
        if info.protocol != mine.protocol:
            raise IncompatiblePeerError(f"prefill speaks connector protocol {info.protocol}, decode {mine.protocol}: "
                                        "install the same splitzip-vllm version on both")
        if not MIN_FORMAT_VERSION <= info.format_versions[1] <= FORMAT_VERSION:
            raise IncompatiblePeerError(f"prefill writes wire format v{info.format_versions[1]}, decode reads "
                                        f"v{MIN_FORMAT_VERSION}..v{FORMAT_VERSION}: upgrade splitzip-vllm on decode")
        for key, hint in (("kv_dtype", "--kv-cache-dtype / --dtype"), ("block_size", "--block-size"),
                          ("total_kv_heads", "the model"), ("head_size", "the model"),
                          ("piece_order", "the attention backend"), ("element_size", "--kv-cache-dtype")):
            if getattr(info, key) != getattr(mine, key):
                raise IncompatiblePeerError(f"prefill has {key}={getattr(info, key)} but decode has "
                                            f"{key}={getattr(mine, key)}; align {hint} on both servers")
        if info.two_level and not mine.two_level:
            name = self.backend.name if self.backend else "none"
            raise IncompatiblePeerError(
                f"prefill writes EXP2L payloads but decode's codec backend ({name}) does not read them; use "
                "codec_backend \"cpu\" on decode, or give prefill an EXP4-only codebook (calibrate --exp4-only)")
        if len(info.layers) != len(mine.layers):
            raise IncompatiblePeerError(f"prefill has {len(info.layers)} KV layers, decode {len(mine.layers)}; "
                                        "both servers must serve the same model")
        if "dynamic" in (info.kv_scales, mine.kv_scales):
            raise IncompatiblePeerError("FP8 KV cache with calculate_kv_scales: each engine computes its own "
                                        "scales, so prefill's FP8 KV would be misread by decode; use scales from "
                                        "the checkpoint on both servers")
        try:
            check_tp(info.tp_size, self.tp_size, self.total_heads)
        except LoadError as e:
            raise IncompatiblePeerError(str(e)) from None
        if info.model_fingerprint != mine.model_fingerprint:
            msg = (f"prefill serves model {info.model} (config {info.model_fingerprint}), decode serves "
                   f"{self.model} (config {mine.model_fingerprint})")
            if not self.cfg.allow_model_mismatch:
                raise IncompatiblePeerError(f"{msg}; serve the same model on both, or set "
                                            "kv_connector_extra_config.allow_model_mismatch=true")
            logger.warning("SplitZipConnector: %s; continuing (allow_model_mismatch)", msg)

    # ---- prefill ------------------------------------------------------------------------------------------
    def stream(self, meta: SplitZipConnectorMetadata) -> None:
        """Layer-wise: publish the requests whose last prompt chunk runs in this step; their pieces are encoded as
        :meth:`layer_saved` reports each layer written. Called at the step's first ``save_kv_layer`` (vLLM calls
        ``start_load_kv`` only after the forward pass when no load is synchronous), and from ``start_load_kv``
        for models that never call ``save_kv_layer``; once per step."""
        if meta.streamed:
            return
        meta.streamed = True
        for rid, transfer_id in meta.transfer_ids.items():
            block_ids = meta.reqs_to_encode[rid]
            plan = PiecePlan(len(self.layout.layers), self.layout.geo.num_heads, len(block_ids), self.bpp)
            manifest = self.producer.publish(rid, block_ids, plan, transfer_id)
            self._new_manifests.setdefault(rid, {})[self.tp_rank] = manifest.to_dict()

    def layer_saved(self, meta: SplitZipConnectorMetadata, layer_name: str) -> None:
        self.stream(meta)
        index = self.layout.index_of(layer_name)
        if index is not None:
            self.producer.layer_saved([index], inline=True)

    def save(self, meta: SplitZipConnectorMetadata) -> None:
        """Publish every request whose prompt completed this step (called from wait_for_save); layer-wise ones
        were published before the forward pass, and are now complete."""
        self.producer.step_saved()
        for rid in meta.reqs_not_sent:
            self.producer.drop(rid)
        for rid, block_ids in meta.reqs_to_encode.items():
            if self.cfg.kv_dump_dir:
                self._dump_kv(rid, block_ids)
            if rid in meta.transfer_ids:
                continue
            plan = PiecePlan(len(self.layout.layers), self.layout.geo.num_heads, len(block_ids), self.bpp)
            manifest = self.producer.publish(rid, block_ids, plan)
            if manifest.mode != self._last_mode and self.cfg.compression == "auto":
                logger.info("SplitZipConnector: now sending %s (%s)",
                            "compressed" if manifest.mode == "splitzip" else "raw", self.policy.describe())
            self._last_mode = manifest.mode
            self._new_manifests.setdefault(rid, {})[self.tp_rank] = manifest.to_dict()

    def _load_codebook(self) -> None:
        if self.cfg.codebook == "auto":
            self._hist = ExponentHistogram()
        else:
            self._codebook = Codebook.load(self.cfg.codebook)
            logger.info("SplitZipConnector: codebook %s from %s", list(self._codebook.exponents), self.cfg.codebook)

    def _codebook_for(self, block_ids: list[int]) -> Codebook | None:
        """Encoder thread: the codebook, calibrated from the first requests' KV when "auto"."""
        if self._hist is not None and self._calibrated_requests < self.cfg.auto_calibration_requests:
            for l in self.layout.layers:
                self._hist.update(l.blocks(block_ids))
            self._calibrated_requests += 1
            self._codebook = self._hist.top()
            if self._calibrated_requests == self.cfg.auto_calibration_requests:
                self._freeze_codebook()
        return self._codebook

    def _freeze_codebook(self) -> None:
        h, cb = self._hist, self._codebook
        logger.info("SplitZipConnector: codebook frozen after %d prefills: %s (coverage %.4f%%, expected ratio "
                    "%.4f)", self._calibrated_requests, list(cb.exponents), 100 * h.coverage(cb),
                    h.expected_ratio(cb))
        if self.cfg.codebook_out:
            cb.save(self.cfg.codebook_out, coverage=h.coverage(cb), expected_ratio=h.expected_ratio(cb),
                    entropy_bits=h.entropy_bits(), samples=h.total)
            logger.info("SplitZipConnector: wrote codebook to %s", self.cfg.codebook_out)
        self._hist = None

    def _dump_kv(self, rid: str, block_ids: list[int]) -> None:
        """Save a request's KV blocks (one tensor per layer, ``[blocks, ...]``): prefill dumps what it publishes
        (calibration, benchmarks), decode what it received (``recv-`` prefix; checks of lossless transfer)."""
        from safetensors.torch import save_file
        if self._dumped >= self.cfg.kv_dump_max_requests:
            return
        os.makedirs(self.cfg.kv_dump_dir, exist_ok=True)
        tensors = {f"layer{i}": l.blocks(block_ids).contiguous().cpu() for i, l in enumerate(self.layout.layers)}
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rid)
        save_file(tensors, os.path.join(self.cfg.kv_dump_dir, f"tp{self.tp_rank}-{safe}.safetensors"))
        self._dumped += 1

    def worker_meta(self) -> SplitZipWorkerMetadata | None:
        if not self._new_manifests:
            return None
        out = SplitZipWorkerMetadata(self._new_manifests)
        self._new_manifests = {}
        return out

    # ---- decode ------------------------------------------------------------------------------------------
    def start_load(self, meta: SplitZipConnectorMetadata) -> None:
        for remote in meta.reqs_to_release.values():
            self.consumer.release(remote)
        for info, rids in meta.heartbeats:
            self.consumer.heartbeat(info, rids)
        for rid, req in meta.reqs_to_recv.items():
            self.consumer.start(rid, req)
        for rid in meta.reqs_to_cancel:
            self.consumer.cancel(rid)

    # ---- every step -----------------------------------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str], idle_step: bool = False
                         ) -> tuple[set[str], set[str], set[str]]:
        """Once per engine step; the transport (NIXL notifications, transfer states) is polled at most every
        ``POLL_EVERY_S``. ``idle_step``: nothing was scheduled, so wait a little first (see ``IDLE_STEP_WAIT_S``)."""
        if idle_step:
            loading = self.consumer is not None and self.consumer.loading
            time.sleep(LOADING_STEP_WAIT_S if loading else IDLE_STEP_WAIT_S)
        now = time.monotonic()
        poll_transport = now - self._last_poll >= POLL_EVERY_S
        if poll_transport:
            self._last_poll = now
        sending: set[str] = set()
        recving: set[str] = set()
        failed: set[str] = set()
        if self.producer is not None:
            sending = self.producer.poll(finished_req_ids, self.transport.notifications() if poll_transport else [])
        if self.consumer is not None and poll_transport:
            recving, failed = self.consumer.poll()
        return sending, recving, failed

    def take_stats(self) -> SplitZipStats | None:
        return None if self.stats.is_empty() else self.stats.clone_and_reset()

    def shutdown(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.consumer is not None:
            self.consumer.close()
        if self.peers is not None:
            self.peers.close()
        if self.transport is not None:
            self.transport.close()
