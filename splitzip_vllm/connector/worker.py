"""Worker-side half of SplitZipConnector: encode into the send arena, READ, decode into the paged KV cache."""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from ..codec import PayloadError, get_backend
from ..codec.codebook import Codebook, ExponentHistogram
from ..codec.format import HEADER_BYTES, VERSION as FORMAT_VERSION, dtype_code, encode_capacity, parse_header
from ..transport.arena import ALIGN, ArenaFullError, ExtentAllocator
from ..transport.nixl_agent import NixlTransport, TransportError, mem_type_of
from ..transport.side_channel import HandshakeError, fetch_handshake
from .binding import TicketTable, TicketTableFullError, new_nonce, transfer_tag
from .config import PROTOCOL_VERSION, SplitZipConfig
from .policy import CompressionPolicy
from .metadata import (NOTIF_DONE, NOTIF_HB, NOTIF_RATE, Manifest, RecvRequest, RemoteInfo, SplitZipConnectorMetadata,
                       SplitZipHandshakeMetadata, SplitZipWorkerMetadata)
from .stats import SplitZipStats

logger = logging.getLogger("splitzip_vllm.connector")

FAULT_ENV = "SPLITZIP_FAULT_INJECT"   # test hook: "corrupt_payload" flips one body byte before decode
_PEER_RETRY_S = 10.0
SEND_TICKET_SLOTS = 1 << 16     # prefill: raw requests published at once (512 KiB of host memory)
RECV_TICKET_SLOTS = 1 << 12     # decode: raw loads in flight at once


class IncompatiblePeerError(RuntimeError):
    """The prefill and decode servers differ in a setting that must match."""


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Layer:
    name: str
    tensor: torch.Tensor      # [num_blocks, ...] view of the paged cache
    page_bytes: int           # bytes of one block of this layer
    block_stride: int         # bytes between consecutive blocks

    @property
    def base(self) -> int:
        return self.tensor.data_ptr()

    def page(self, block: int) -> torch.Tensor:
        return self.tensor[block]


@dataclass
class _Peer:
    agent: str
    info: dict[str, Any]


@dataclass
class _Send:
    offset: int | None            # arena extent (None for direct sends)
    ticket_slot: int | None = None  # direct sends: slot of the ticket decode checks after its data READ
    deadline: float | None = None  # set once the scheduler has finished the request
    read: bool = False


@dataclass
class _Recv:
    req: RecvRequest
    started: float = 0.0
    handle: Any = None
    extent: int | None = None
    manifest: Manifest | None = None
    local_ranges: list[tuple[int, int]] = field(default_factory=list)
    decode_s: float = 0.0
    ticket_slot: int | None = None  # direct loads: landing slot of the ticket READ
    checking_ticket: bool = False   # direct loads: the data READ is done, ``handle`` is the ticket READ
    xfer_s: float = 0.0


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
        self.layers: list[_Layer] = []
        self.transport: NixlTransport | None = None
        self.stats = SplitZipStats()
        self._fault = os.environ.get(FAULT_ENV, "")
        # prefill
        self._sends: dict[str, _Send] = {}
        self._finished: set[str] = set()
        self._new_manifests: dict[str, dict[int, dict[str, Any]]] = {}
        self._codebook: Codebook | None = None
        self._hist: ExponentHistogram | None = None
        self._calibrated_requests = 0
        self._dumped = 0
        self.policy = CompressionPolicy(cfg.compression)
        self._last_policy: bool | None = None
        # decode
        self._recvs: dict[str, _Recv] = {}
        self._peers: dict[str, _Peer] = {}
        self._peer_failures: dict[str, tuple[float, str]] = {}
        self._done_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._zombie_handles: list[Any] = []

    # ---- setup --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        seen: set[int] = set()
        for name, t in kv_caches.items():
            if t.data_ptr() in seen:
                continue  # layers sharing one cache appear more than once
            seen.add(t.data_ptr())
            page = t[0]
            if not page.is_contiguous():
                raise RuntimeError(f"SplitZipConnector needs page-contiguous KV blocks; layer {name} has shape "
                                   f"{tuple(t.shape)} strides {t.stride()}")
            self.layers.append(_Layer(name, t, page.numel() * t.element_size(), t.stride(0) * t.element_size()))
        t0 = self.layers[0].tensor
        self.device, self.dtype = t0.device, t0.dtype
        self.num_blocks = t0.shape[0]
        self.mem_type = mem_type_of(t0)
        self.device_id = t0.device.index or 0 if t0.device.type != "cpu" else 0
        self.compressible = self.dtype == torch.bfloat16
        if not self.compressible:
            logger.warning("SplitZipConnector: KV cache dtype %s has no SplitZip coding; KV moves uncompressed "
                           "through the same path", self.dtype)
        kv_bytes = sum(l.block_stride * self.num_blocks for l in self.layers)
        self.backend = get_backend(self.cfg.codec_backend, self.device) if self.compressible else None

        self.transport = NixlTransport(f"splitzip-{self.engine_id}-tp{self.tp_rank}-{uuid.uuid4().hex[:8]}",
                                       self.cfg.backends,
                                       progress_delay_us=self.cfg.resolved_progress_delay_us(
                                           self.device.type == "cpu"))
        storages = {}
        for l in self.layers:
            s = l.tensor.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        self.transport.register(list(storages.items()), self.mem_type, self.device_id)

        self.tickets: TicketTable | None = None
        if self.is_producer or self.is_consumer:
            self.tickets = TicketTable(SEND_TICKET_SLOTS if self.is_producer else RECV_TICKET_SLOTS)
            self.transport.register([(self.tickets.address(0), self.tickets.buffer.nbytes)], "DRAM", 0)
        self.arena = self.arena_alloc = None
        if self.is_producer:
            size = int(self.cfg.arena_bytes) or max(kv_bytes // 4, 16 << 20)
            self.arena = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.arena_alloc = ExtentAllocator(size)
            self.transport.register([(self.arena.data_ptr(), size)], self.mem_type, self.device_id)
        self.recv_buf = self.recv_alloc = None
        if self.is_consumer:
            size = int(self.cfg.recv_buffer_bytes) or max(kv_bytes // 4, 16 << 20)
            self.recv_buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.recv_alloc = ExtentAllocator(size)
            self.transport.register([(self.recv_buf.data_ptr(), size)], self.mem_type, self.device_id)
        self._load_codebook()
        logger.info("SplitZipConnector worker tp%d: %d layers, %d blocks of %d B, dtype %s on %s, codec %s, "
                    "arena %s B, recv buffer %s B", self.tp_rank, len(self.layers), self.num_blocks,
                    self.layers[0].page_bytes, self.dtype, self.device,
                    self.backend.name if self.backend else "none (raw)",
                    self.arena.numel() if self.arena is not None else 0,
                    self.recv_buf.numel() if self.recv_buf is not None else 0)

    def _load_codebook(self) -> None:
        if self.cfg.codebook == "auto":
            self._hist = ExponentHistogram()
        else:
            self._codebook = Codebook.load(self.cfg.codebook)
            logger.info("SplitZipConnector: codebook %s from %s", list(self._codebook.exponents), self.cfg.codebook)

    def handshake_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION, "format_version": FORMAT_VERSION, "engine_id": self.engine_id,
            "tp_rank": self.tp_rank, "tp_size": self.tp_size, "model": self.model, "dtype": str(self.dtype),
            "block_size": self.block_size, "num_layers": len(self.layers),
            "page_bytes": [l.page_bytes for l in self.layers],
            "agent_metadata": self.transport.metadata(), "mem_type": self.mem_type, "device_id": self.device_id,
            "layer_bases": [l.base for l in self.layers], "block_strides": [l.block_stride for l in self.layers],
        }

    def get_handshake_metadata(self) -> SplitZipHandshakeMetadata:
        return SplitZipHandshakeMetadata(payload=msgspec.msgpack.encode(self.handshake_dict()))

    # ---- prefill: encode --------------------------------------------------------------------------------
    def save(self, meta: SplitZipConnectorMetadata) -> None:
        """Prepare every request whose prompt completed this step (called from wait_for_save)."""
        for rid in meta.reqs_not_sent:
            self._drop_send(rid)
        for rid, block_ids in meta.reqs_to_encode.items():
            if self.cfg.kv_dump_dir and self._dumped < self.cfg.kv_dump_max_requests:
                self._dump_kv(rid, block_ids)
            t0 = time.perf_counter()
            manifest = self._prepare(rid, block_ids)
            dt = time.perf_counter() - t0
            self.stats.add(num_encoded=1, encoded_raw_bytes=manifest.raw_bytes,
                           encoded_wire_bytes=manifest.wire_bytes, encode_seconds=dt)
            decision = manifest.mode == "splitzip"
            if decision != self._last_policy and self.cfg.compression == "auto":
                logger.info("SplitZipConnector: now sending %s (%s)", "compressed" if decision else "raw",
                            self.policy.describe())
                self._last_policy = decision
            self._new_manifests.setdefault(rid, {})[self.tp_rank] = manifest.to_dict()

    def _prepare(self, rid: str, block_ids: list[int]) -> Manifest:
        raw = sum(l.page_bytes for l in self.layers) * len(block_ids)
        reason = ""
        if not self.compressible:
            reason = f"dtype {self.dtype} is carried raw"
        elif not self.policy.decide():
            reason = f"compression policy: {self.policy.describe()}"
        if not reason:
            codebook = self._codebook_for(block_ids)
            caps = [_align(encode_capacity(l.page_bytes // self.layers[0].tensor.element_size() * len(block_ids),
                                           self.layers[0].tensor.element_size())) for l in self.layers]
            try:
                off = self.arena_alloc.allocate(sum(caps))
            except ArenaFullError as e:
                self.stats.add(num_arena_fallbacks=1)
                reason = f"send arena full ({e}); sending raw"
                logger.warning("SplitZipConnector: request %s: %s", rid, reason)
            else:
                t0 = time.perf_counter()
                nonce = new_nonce()
                tags = [transfer_tag(self.engine_id, rid, self.tp_rank, i, nonce) for i in range(len(self.layers))]
                layers = self._encode_layers(block_ids, codebook, off, caps, tags)
                # codec rate for the policy: encode only (auto-calibration histograms are excluded)
                self.policy.observe_encode(raw, sum(n for _, n in layers), time.perf_counter() - t0)
                self._sends[rid] = _Send(off)
                self.stats.add(arena_alloc_bytes=self.arena_alloc.size_of(off))
                return Manifest(mode="splitzip", raw_bytes=raw, wire_bytes=sum(n for _, n in layers),
                                layers=layers, nonce=nonce)
        self.stats.add(num_direct=1)
        try:
            slot, value = self.tickets.issue()
        except TicketTableFullError as e:
            self._sends[rid] = _Send(None)
            return Manifest(mode="direct", raw_bytes=raw, wire_bytes=raw, reason=f"{reason}; no ticket: {e}")
        self._sends[rid] = _Send(None, ticket_slot=slot)
        return Manifest(mode="direct", raw_bytes=raw, wire_bytes=raw, reason=reason,
                        ticket=(self.tickets.address(slot), value))

    def _encode_layers(self, block_ids: list[int], codebook: Codebook | None, off: int,
                       caps: list[int], tags: list[int]) -> list[tuple[int, int]]:
        code = dtype_code(self.dtype)
        base = self.arena.data_ptr()
        pack = self.device.type == "cpu"  # CPU: pack payloads back to back; GPU: fixed slots, one sync
        cursor, slots = off, []
        for layer, cap, tag in zip(self.layers, caps, tags):
            out = self.arena[cursor:cursor + cap]
            self.backend.encode_into([layer.page(b) for b in block_ids], code, codebook, self.cfg.chunk_log2, out,
                                     tag=tag)
            if pack:
                n = parse_header(out[:HEADER_BYTES].numpy().tobytes()).payload_bytes
                slots.append((cursor, n))
                cursor += _align(n)
            else:
                slots.append((cursor, 0))
                cursor += cap
        if not pack:
            heads = torch.stack([self.arena[s:s + HEADER_BYTES] for s, _ in slots]).cpu()
            slots = [(s, parse_header(h.numpy().tobytes()).payload_bytes) for (s, _), h in zip(slots, heads)]
        self.arena_alloc.shrink(off, cursor - off)
        return [(base + s, n) for s, n in slots]

    def _codebook_for(self, block_ids: list[int]) -> Codebook | None:
        if self._hist is not None and self._calibrated_requests < self.cfg.auto_calibration_requests:
            for l in self.layers:
                idx = torch.tensor(block_ids, device=self.device)
                self._hist.update(l.tensor.index_select(0, idx))
            self._calibrated_requests += 1
            self._codebook = self._hist.top()
            if self._calibrated_requests == self.cfg.auto_calibration_requests:
                logger.info("SplitZipConnector: codebook frozen after %d prefills: %s (coverage %.4f%%, expected "
                            "ratio %.4f)", self._calibrated_requests, list(self._codebook.exponents),
                            100 * self._hist.coverage(self._codebook), self._hist.expected_ratio(self._codebook))
                if self.cfg.codebook_out:
                    self._codebook.save(self.cfg.codebook_out, coverage=self._hist.coverage(self._codebook),
                                        expected_ratio=self._hist.expected_ratio(self._codebook),
                                        entropy_bits=self._hist.entropy_bits(), samples=self._hist.total)
                    logger.info("SplitZipConnector: wrote codebook to %s", self.cfg.codebook_out)
                self._hist = None
        return self._codebook

    def _dump_kv(self, rid: str, block_ids: list[int]) -> None:
        """Save a prepared request's KV pages (one tensor per layer) for calibration and benchmarks."""
        from safetensors.torch import save_file
        os.makedirs(self.cfg.kv_dump_dir, exist_ok=True)
        idx = torch.tensor(block_ids, device=self.device)
        tensors = {f"layer{i}": l.tensor.index_select(0, idx).contiguous().cpu() for i, l in enumerate(self.layers)}
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rid)
        save_file(tensors, os.path.join(self.cfg.kv_dump_dir, f"tp{self.tp_rank}-{safe}.safetensors"))
        self._dumped += 1

    def _drop_send(self, rid: str) -> None:
        """Unpublish a request. The ticket is zeroed here, before the caller reports the request finished
        (only then does vLLM reuse its blocks): a decode whose ticket READ still sees the value read intact KV."""
        send = self._sends.pop(rid, None)
        if send is not None:
            if send.ticket_slot is not None:
                self.tickets.revoke(send.ticket_slot)
            if send.offset is not None:
                self.stats.add(arena_free_bytes=self.arena_alloc.size_of(send.offset))
                self.arena_alloc.free(send.offset)
            self.stats.add(num_freed=1)
        self._finished.discard(rid)

    def worker_meta(self) -> SplitZipWorkerMetadata | None:
        if not self._new_manifests:
            return None
        out = SplitZipWorkerMetadata(self._new_manifests)
        self._new_manifests = {}
        return out

    def _poll_sends(self, finished_req_ids: set[str]) -> set[str]:
        now = time.perf_counter()
        for rid in finished_req_ids:
            if rid in self._sends and self._sends[rid].deadline is None:
                self._sends[rid].deadline = now + self.cfg.kv_lease_duration
                self._finished.add(rid)
        for msg in self.transport.notifications() if self.transport else ():
            if msg.startswith(NOTIF_DONE):
                rid = msg[len(NOTIF_DONE):].decode()
                if rid in self._sends:
                    self._sends[rid].read = True
            elif msg.startswith(NOTIF_RATE):
                try:
                    wire, xfer_s, raw, dec_s = (float(x) for x in msg[len(NOTIF_RATE):].decode().split(","))
                    self.policy.observe_transfer(int(wire), xfer_s, int(raw), dec_s)
                except ValueError:
                    pass
            elif msg.startswith(NOTIF_HB):
                for rid in msg[len(NOTIF_HB):].decode().split(","):
                    s = self._sends.get(rid)
                    if s is not None and s.deadline is not None:
                        s.deadline = max(s.deadline, now + self.cfg.kv_lease_duration)
        done: set[str] = set()
        for rid, s in list(self._sends.items()):
            if rid not in self._finished:
                continue
            if s.read:
                done.add(rid)
            elif s.deadline is not None and now > s.deadline:
                logger.warning("SplitZipConnector: lease of request %s expired after %.1fs without a read; "
                               "freeing its KV blocks and arena space", rid, self.cfg.kv_lease_duration)
                self.stats.add(num_expired=1)
                done.add(rid)
        for rid in done:
            self._drop_send(rid)
        return done

    @property
    def arena_used_bytes(self) -> int:
        return self.arena_alloc.used_bytes if self.arena_alloc else 0

    # ---- decode: load -------------------------------------------------------------------------------
    def start_load(self, meta: SplitZipConnectorMetadata) -> None:
        for rid, remote in meta.reqs_to_release.items():
            peer = self._peer(remote, quiet=True)
            if peer is not None:
                self.transport.notify(peer.agent, NOTIF_DONE + remote.request_id.encode())
        for info, rids in meta.heartbeats:
            peer = self._peer(info, quiet=True)
            if peer is not None:
                self.transport.notify(peer.agent, NOTIF_HB + ",".join(rids).encode())
        for rid, req in meta.reqs_to_recv.items():
            self._recvs[rid] = _Recv(req, started=time.perf_counter())
        self._issue_reads()

    def _issue_reads(self) -> None:
        for rid, r in list(self._recvs.items()):
            if r.handle is not None:
                continue
            try:
                self._issue(rid, r)
            except (ArenaFullError, TicketTableFullError):
                continue  # back-pressure: retry next step
            except TransportError as e:
                self._fail(rid, str(e), peer_lost=True)
            except (HandshakeError, IncompatiblePeerError, ValueError) as e:
                self._fail(rid, str(e))

    def _issue(self, rid: str, r: _Recv) -> None:
        remote = r.req.remote
        if not remote.manifests or len(remote.manifests) <= self.tp_rank:
            raise ValueError(f"prefill published no KV manifest for TP rank {self.tp_rank}")
        m = Manifest.from_dict(remote.manifests[self.tp_rank])
        r.manifest = m
        peer = self._peer(remote)
        if peer is None:
            raise HandshakeError(self._peer_failures[remote.engine_id][1])
        n_remote = len(remote.block_ids)
        if r.req.skip_blocks + len(r.req.local_block_ids) != n_remote:
            raise ValueError(f"block count mismatch: prefill sent {n_remote} blocks, decode has "
                             f"{r.req.skip_blocks} cached + {len(r.req.local_block_ids)} to fill")
        notif = NOTIF_DONE + remote.request_id.encode()
        if m.mode == "direct":
            if m.ticket is None:
                raise ValueError(f"prefill published raw KV without a validity ticket ({m.reason})")
            rem, loc = [], []
            for li, l in enumerate(self.layers):
                rbase, rstride = peer.info["layer_bases"][li], peer.info["block_strides"][li]
                for i, lb in enumerate(r.req.local_block_ids):
                    rb = remote.block_ids[r.req.skip_blocks + i]
                    rem.append((rbase + rb * rstride, l.page_bytes))
                    loc.append((l.base + lb * l.block_stride, l.page_bytes))
            if not loc:
                self.transport.notify(peer.agent, notif)
                self._complete(rid, r, 0.0)
                return
            r.ticket_slot = self.tickets.take()
            # no notification yet: prefill must keep the blocks (and the ticket) until the ticket READ is done
            r.handle = self.transport.read(peer.agent, loc, self.mem_type, rem, peer.info["mem_type"], b"",
                                           self.device_id, peer.info["device_id"])
            return
        if m.mode != "splitzip" or len(m.layers) != len(self.layers):
            raise ValueError(f"manifest has mode {m.mode!r} with {len(m.layers)} layers; decode has "
                             f"{len(self.layers)} layers")
        total = sum(_align(n) for _, n in m.layers)
        if total > self.recv_alloc.capacity:
            raise ValueError(f"request needs {total} bytes of receive buffer but it holds only "
                             f"{self.recv_alloc.capacity}; raise kv_connector_extra_config.recv_buffer_bytes")
        r.extent = self.recv_alloc.allocate(total)
        cursor = self.recv_buf.data_ptr() + r.extent
        for _, n in m.layers:
            r.local_ranges.append((cursor, n))
            cursor += _align(n)
        r.handle = self.transport.read(peer.agent, r.local_ranges, self.mem_type, m.layers, peer.info["mem_type"],
                                       notif, self.device_id, peer.info["device_id"])

    def _peer(self, remote: RemoteInfo, quiet: bool = False) -> _Peer | None:
        key = remote.engine_id
        if key in self._peers:
            return self._peers[key]
        failed = self._peer_failures.get(key)
        if failed and time.monotonic() - failed[0] < _PEER_RETRY_S:
            return None
        try:
            raw = fetch_handshake(remote.host, remote.port, self.tp_rank, self.cfg.handshake_timeout)
            info = msgspec.msgpack.decode(raw)
            if "error" in info:
                raise HandshakeError(f"prefill side channel refused: {info['error']}")
            self._check_compatible(info, remote)
            agent = self.transport.add_peer(info["agent_metadata"])
        except (HandshakeError, IncompatiblePeerError, TransportError, msgspec.DecodeError) as e:
            msg = f"handshake with prefill engine {key} at {remote.host}:{remote.port} failed: {e}"
            self._peer_failures[key] = (time.monotonic(), msg)
            if not quiet:
                logger.error("SplitZipConnector: %s", msg)
            return None
        self._peer_failures.pop(key, None)
        self._peers[key] = _Peer(agent, info)
        logger.info("SplitZipConnector: connected to prefill engine %s (agent %s)", key, agent)
        return self._peers[key]

    def _check_compatible(self, info: dict[str, Any], remote: RemoteInfo) -> None:
        mine = self.handshake_dict() | {"tp_size": self.tp_size}
        if info.get("engine_id") != remote.engine_id:
            raise IncompatiblePeerError(f"side channel serves engine {info.get('engine_id')}, "
                                        f"kv_transfer_params name {remote.engine_id}")
        for key in ("protocol", "format_version", "dtype", "block_size", "num_layers", "page_bytes", "tp_size"):
            if info.get(key) != mine[key]:
                raise IncompatiblePeerError(
                    f"prefill has {key}={info.get(key)} but decode has {key}={mine[key]}; both servers must use "
                    f"the same value (model, --dtype/--kv-cache-dtype, --block-size, tensor parallel size, "
                    f"splitzip-vllm version)")
        if info.get("model") != self.model:
            logger.warning("SplitZipConnector: prefill serves model %s, decode serves %s; geometry matches, "
                           "continuing", info.get("model"), self.model)

    def _poll_recvs(self) -> None:
        now = time.perf_counter()
        for rid, r in list(self._recvs.items()):
            if r.handle is None:
                if now - r.started > self.cfg.transfer_timeout:
                    self._fail(rid, f"no receive-buffer space for {self.cfg.transfer_timeout:.0f}s")
                continue
            state = self.transport.poll(r.handle)
            if state == "PROC":
                if now - r.started > self.cfg.transfer_timeout:
                    self._fail(rid, f"KV read did not finish within {self.cfg.transfer_timeout:.0f}s "
                                    "(prefill unreachable?)", peer_lost=True)
                continue
            if state != "DONE":
                self._fail(rid, "NIXL reported a transfer error (prefill gone or unreachable)", peer_lost=True)
                continue
            tele = self.transport.telemetry(r.handle)
            r.xfer_s += tele.seconds if tele else now - r.started
            self.transport.release(r.handle)
            r.handle = None
            try:
                if self._verify(rid, r):
                    self._complete(rid, r, r.xfer_s)
            except PayloadError as e:
                self._fail(rid, f"received KV payload rejected: {e}", rejected=True)
            except TransportError as e:
                self._fail(rid, str(e), peer_lost=True)

    def _verify(self, rid: str, r: _Recv) -> bool:
        """True once the load is verified; False while a direct load still waits for its ticket READ."""
        m = r.manifest
        if m is None or m.mode != "direct":
            self._decode(r)
            return True
        if not r.checking_ticket:  # data landed: now prove prefill had not freed the blocks meanwhile
            peer = self._peers[r.req.remote.engine_id]
            r.checking_ticket = True
            r.handle = self.transport.read(peer.agent, [(self.tickets.address(r.ticket_slot), 8)], "DRAM",
                                           [(m.ticket[0], 8)], "DRAM",
                                           NOTIF_DONE + r.req.remote.request_id.encode())
            return False
        seen = self.tickets.value(r.ticket_slot)
        if seen != m.ticket[1]:
            raise PayloadError(f"the raw KV blocks were freed or reused by prefill before or while they were read "
                               f"(ticket {m.ticket[1]:#x}, now {seen:#x}): a read after the prefill's lease "
                               f"(kv_lease_duration) expired?")
        return True

    def _decode(self, r: _Recv) -> None:
        m = r.manifest
        if m is None or m.mode == "direct":
            return
        t0 = time.perf_counter()
        code = dtype_code(self.dtype)
        esize = self.layers[0].tensor.element_size()
        scratch = None
        if r.req.skip_blocks:
            scratch = torch.empty(r.req.skip_blocks * self.layers[0].page_bytes // esize, dtype=self.dtype,
                                  device=self.device).view(r.req.skip_blocks, -1)
        base = self.recv_buf.data_ptr()
        for li, (layer, (addr, n)) in enumerate(zip(self.layers, r.local_ranges)):
            payload = self.recv_buf[addr - base:addr - base + n]
            if self._fault == "corrupt_payload" and li == 0 and n > HEADER_BYTES:
                payload[HEADER_BYTES + (n - HEADER_BYTES) // 2] ^= 0x5A
            regions = ([scratch[i] for i in range(r.req.skip_blocks)] if scratch is not None else [])
            regions += [layer.page(b) for b in r.req.local_block_ids]
            if self.backend is None:
                raise PayloadError("no codec backend available for this KV cache dtype")
            tag = transfer_tag(r.req.remote.engine_id, r.req.remote.request_id, self.tp_rank, li, m.nonce)
            self.backend.decode_into(payload, regions, code, tag=tag)
        r.decode_s = time.perf_counter() - t0
        self.stats.add(decode_seconds=r.decode_s)

    def _complete(self, rid: str, r: _Recv, xfer_s: float) -> None:
        m = r.manifest
        wire = sum(n for _, n in m.layers) if m and m.mode == "splitzip" else \
            sum(l.page_bytes for l in self.layers) * len(r.req.local_block_ids)
        raw = m.raw_bytes if m and m.mode == "splitzip" else wire
        self.stats.add(num_transfers=1, raw_bytes=raw, wire_bytes=wire, transfer_seconds=xfer_s)
        peer = self._peers.get(r.req.remote.engine_id)
        if peer is not None and wire:
            dec_s = r.decode_s if m is not None and m.mode == "splitzip" else 0.0
            self.transport.notify(peer.agent, NOTIF_RATE + f"{wire},{xfer_s:.9f},{raw},{dec_s:.9f}".encode())
        self._release_extent(r)
        self._release_ticket(r)
        del self._recvs[rid]
        self._done_recving.add(rid)

    def _fail(self, rid: str, why: str, peer_lost: bool = False, rejected: bool = False) -> None:
        r = self._recvs.pop(rid)
        logger.error("SplitZipConnector: KV load for request %s failed: %s; vLLM applies "
                     "kv_load_failure_policy (recompute or fail)", rid, why)
        self.stats.add(num_failed_transfers=1, num_rejected=int(rejected))
        if r.handle is not None and not self.transport.release(r.handle):
            # DMA may still land in the buffer or the ticket slot: both stay reserved until NIXL lets go
            self._zombie_handles.append((r.handle, r.extent, r.ticket_slot))
        else:
            self._release_extent(r)
            self._release_ticket(r)
        peer = self._peers.get(r.req.remote.engine_id)
        if peer is not None:
            self.transport.notify(peer.agent, NOTIF_DONE + r.req.remote.request_id.encode())
            if peer_lost:
                self.transport.remove_peer(peer.agent)  # re-handshake next time
                del self._peers[r.req.remote.engine_id]
        self._done_recving.add(rid)
        self._failed_recving.add(rid)

    def _release_extent(self, r: _Recv) -> None:
        if r.extent is not None:
            self.recv_alloc.free(r.extent)
            r.extent = None

    def _release_ticket(self, r: _Recv) -> None:
        if r.ticket_slot is not None:
            self.tickets.put(r.ticket_slot)
            r.ticket_slot = None

    def _reap_zombies(self) -> None:
        keep = []
        for handle, extent, slot in self._zombie_handles:
            if self.transport.poll(handle) != "PROC" and self.transport.release(handle):
                if extent is not None:
                    self.recv_alloc.free(extent)
                if slot is not None:
                    self.tickets.put(slot)
            else:
                keep.append((handle, extent, slot))
        self._zombie_handles = keep

    # ---- every step -----------------------------------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        sending: set[str] = set()
        if self.is_producer:
            sending = self._poll_sends(finished_req_ids)
        if self.is_consumer:
            self._issue_reads()
            self._poll_recvs()
            self._reap_zombies()
        recving, failed = self._done_recving, self._failed_recving
        self._done_recving, self._failed_recving = set(), set()
        return sending, recving, failed

    def take_stats(self) -> SplitZipStats | None:
        return None if self.stats.is_empty() else self.stats.clone_and_reset()

    def shutdown(self) -> None:
        if self.transport is not None:
            for p in self._peers.values():
                self.transport.remove_peer(p.agent)
            self.transport.close()

