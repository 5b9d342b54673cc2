"""Decode side: read the pieces a request needs from every prefill rank that holds them, decode them into the
paged KV cache off the engine thread, and verify that everything read belongs to the request.

Per request (a *load*) and per prefill rank read from (a *source*):

* compressed (``splitzip``): send ``Want`` (this rank's heads, the blocks not already cached) -> poll the piece
  index with small READs -> READ ready payloads into the receive buffer (bounded: as much as fits) -> decode
  them on the codec thread (transfer tag + checksum verified) -> ``Consumed`` lets prefill reuse the space;
* raw (``direct``): one READ of the raw pieces straight into the KV blocks, then the ticket READ (which carries
  the ``Done`` notice) proves the blocks were still this request's during the data READ.

A load finishes when every source is done; any failure ends it through vLLM's load-failure path.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..codec.format import PayloadError, dtype_code
from ..transport.arena import ALIGN, ArenaFullError, ExtentAllocator
from ..transport.base import Transport, TransportError
from .binding import TicketTable, transfer_tag
from .contracts import Consumed, Done, Heartbeat, Manifest, Rate, Want, encode_notification
from .direct import DirectReads
from .kv_layout import KVLayout, PiecePlan
from .loads import INDEX_POLL_S, Load, LoadError, Source, check_tp
from .metadata import RecvRequest, RemoteInfo
from .mailbox import MAILBOX_PIECE, MailboxRefusedError, find_entry, probe_range
from .peers import PeerBook, PeerUnavailableError
from .piece_index import ENTRY_BYTES, HEADER_BYTES, INDEX_PIECE, IndexRevokedError, parse_index

logger = logging.getLogger("splitzip_vllm.connector")

RECV_TICKET_SLOTS = 1 << 12     # raw loads in flight at once
INDEX_LANDING_BYTES = 8 << 20   # host memory for piece-index READs in flight
INDEX_WINDOW = 64               # entries per index READ (1 KiB): pieces become ready roughly in order


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


class Consumer(DirectReads):
    def __init__(self, *, layout: KVLayout, transport: Transport, peers: PeerBook, tp_rank: int, tp_size: int,
                 total_heads: int, recv_bytes: int, timeout_s: float, backend, stats, dump=None):
        self.layout, self.transport, self.peers = layout, transport, peers
        self.tp_rank, self.tp_size, self.total_heads = tp_rank, tp_size, total_heads
        self.timeout_s, self.backend, self.stats = timeout_s, backend, stats
        self.dump = dump   # called with (remote request id, local block ids) after a load (kv_dump_dir)
        self.mem = "DRAM" if layout.device.type == "cpu" else "VRAM"
        self.dev = layout.device.index or 0 if layout.device.type != "cpu" else 0
        self.recv_buf = torch.empty(recv_bytes, dtype=torch.uint8, device=layout.device)
        self.recv_alloc = ExtentAllocator(recv_bytes)
        self.landing = torch.zeros(INDEX_LANDING_BYTES, dtype=torch.uint8)
        self.landing_alloc = ExtentAllocator(INDEX_LANDING_BYTES)
        self.tickets = TicketTable(RECV_TICKET_SLOTS)
        self._codec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitzip-decode")
        self._stream = torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        self._loads: dict[str, Load] = {}
        self._releases: list[tuple[RemoteInfo, float]] = []
        # ended loads whose KV blocks may still be written (a decode job running, a raw READ not released):
        # vLLM may reuse the blocks once a load is reported, so it is reported only when they are quiet
        self._draining: list[tuple[str, list, bool]] = []   # (request id, pending futures/handles, failed)
        self._zombies: list[tuple] = []   # (handle, free callback) whose DMA may still be in flight

    def registrations(self) -> list[tuple[int, int, str]]:
        return [(self.recv_buf.data_ptr(), self.recv_buf.numel(), self.mem),
                (self.landing.data_ptr(), self.landing.numel(), "DRAM"),
                (self.tickets.address(0), self.tickets.buffer.nbytes, "DRAM")]

    @property
    def recv_used_bytes(self) -> int:
        return self.recv_alloc.used_bytes

    # ---- requests ------------------------------------------------------------------------------------------
    @property
    def loading(self) -> bool:
        """Whether any load is in flight or draining (its state machine advances once per engine step)."""
        return bool(self._loads or self._draining)

    def start(self, rid: str, req: RecvRequest) -> None:
        now = time.monotonic()
        load = self._loads[rid] = Load(rid, req, [], now)
        try:
            load.sources = self._plan_sources(req)
        except (LoadError, ValueError) as e:
            load.error = str(e)

    def cancel(self, rid: str) -> None:
        """vLLM aborted a request whose KV is loading: stop, free prefill's copy, report the load finished."""
        load = self._loads.pop(rid, None)
        if load is None:
            return
        pending = []
        for src in load.sources:
            pending += self._abandon(src)
            self._notify(src, Done(request_id=load.req.remote.request_id, reader=src.reader, readers=src.readers))
        self._draining.append((rid, pending, False))

    def release(self, remote: RemoteInfo) -> None:
        """Nothing to read (full local prefix hit): tell the prefill ranks to free the request."""
        self._releases.append((remote, time.monotonic()))

    def heartbeat(self, remote: RemoteInfo, request_ids: list[str]) -> None:
        msg = encode_notification(Heartbeat(request_ids=request_ids))
        for peer in self.peers.connected(remote.engine_id):
            self.transport.notify(peer.agent, msg)

    def _plan_sources(self, req: RecvRequest) -> list[Source]:
        """Which prefill ranks hold this rank's KV heads, and which of their heads and pieces to read."""
        remote = req.remote
        p_size, d_size, heads = remote.tp_size, self.tp_size, self.total_heads
        check_tp(p_size, d_size, heads)
        hp, hd = heads // p_size, heads // d_size
        lo, hi = self.tp_rank * hd, (self.tp_rank + 1) * hd
        if not remote.transfer_id and (not remote.manifests or len(remote.manifests) != p_size):
            raise LoadError(f"prefill published {len(remote.manifests or [])} KV manifests for TP size {p_size}")
        out = []
        for p in range(lo // hp, (hi - 1) // hp + 1):
            readers = max(1, d_size // p_size)
            src = Source(p, None, None, max(lo, p * hp) - p * hp, min(hi, (p + 1) * hp) - p * hp, p * hp - lo,
                         self.tp_rank % readers, readers)
            if not remote.transfer_id:   # layer-wise: from the mailbox, once prefill has published
                self._plan(req, src, Manifest.from_dict(remote.manifests[p]), remote.blocks_per_piece)
            out.append(src)
        return out

    def _plan(self, req: RecvRequest, src: Source, manifest: Manifest, bpp: int) -> None:
        n = req.skip_blocks + len(req.local_block_ids)
        src.manifest = manifest
        src.plan = PiecePlan(len(self.layout.layers), self.total_heads // req.remote.tp_size, n, bpp)
        src.todo = set(src.plan.wanted(src.head_lo, src.head_hi, req.skip_blocks))

    # ---- every step ------------------------------------------------------------------------------------------
    def poll(self) -> tuple[set[str], set[str]]:
        """Advance every load; returns (finished, failed) request ids (failed ones are in both)."""
        finished: set[str] = set()
        failed: set[str] = set()
        self._send_releases()
        self._reap_zombies()
        self._drained(finished, failed)
        for rid, load in list(self._loads.items()):
            try:
                if load.error:
                    raise LoadError(load.error)
                self._advance(load)
                if time.monotonic() - load.progress > self.timeout_s:
                    # not peer_lost: other loads from the same prefill may be progressing fine
                    raise LoadError(f"KV load made no progress for {self.timeout_s:.0f}s (transfer_timeout; "
                                    "prefill unreachable or overloaded?)")
            except LoadError as e:
                self._fail(load, str(e), rejected=e.rejected, peer_lost=e.peer_lost)
                continue
            except Exception as e:  # never let one load take the engine down
                logger.exception("SplitZipConnector: KV load for request %s raised", rid)
                self._fail(load, f"{type(e).__name__}: {e}", rejected=False, peer_lost=False)
                continue
            if all(s.done for s in load.sources):
                self._complete(load)
                finished.add(rid)
        self._drained(finished, failed)
        return finished, failed

    def _drained(self, finished: set[str], failed: set[str]) -> None:
        zombies = {id(h) for h, _ in self._zombies}
        keep = []
        for rid, pending, is_failure in self._draining:
            pending = [x for x in pending if (not x.done() if hasattr(x, "done") else id(x) in zombies)]
            if pending:
                keep.append((rid, pending, is_failure))
                continue
            finished.add(rid)
            if is_failure:
                failed.add(rid)
        self._draining = keep

    def _advance(self, load: Load) -> None:
        remote = load.req.remote
        for src in load.sources:
            if src.done:
                continue
            if src.peer is None:
                try:
                    src.peer = self.peers.get(remote.engine_id, remote.host, remote.port, src.rank)
                except PeerUnavailableError as e:
                    raise LoadError(str(e)) from None
                if src.peer is None:
                    continue
                load.progress = time.monotonic()
                if src.manifest is not None:   # checked after the handshake, which names a setting mismatch
                    self._check_blocks(load, src)
            if src.manifest is None and not self._advance_mailbox(load, src):
                continue
            if src.manifest.mode == "direct":
                self._advance_direct(load, src)
            elif src.manifest.mode == "splitzip":
                self._advance_pieces(load, src)
            else:
                raise LoadError(f"unknown manifest mode {src.manifest.mode!r}")

    @staticmethod
    def _check_blocks(load: Load, src: Source) -> None:
        n = load.req.skip_blocks + len(load.req.local_block_ids)
        if src.manifest.num_blocks != n:
            raise LoadError(f"block count mismatch: prefill rank {src.rank} published {src.manifest.num_blocks} "
                            f"blocks, decode has {load.req.skip_blocks} cached + {len(load.req.local_block_ids)} "
                            "to fill")

    # ---- layer-wise: the manifest from prefill's mailbox ---------------------------------------------------------
    def _advance_mailbox(self, load: Load, src: Source) -> bool:
        """READ the mailbox slots of the transfer until prefill has posted its entry; True once it has."""
        remote = load.req.remote
        if src.mailbox_read is not None:
            raw = self._landed(src.mailbox_read)
            if raw is None:
                return False
            src.mailbox_read = None
            tag = transfer_tag(remote.engine_id, remote.transfer_id, src.rank, MAILBOX_PIECE, 0)
            try:
                found = find_entry(raw, tag, src.rank)
            except MailboxRefusedError as e:
                raise LoadError(str(e)) from None
            if found is not None:
                self._plan(load.req, src, *found)
                self._check_blocks(load, src)
                load.progress = time.monotonic()
                return True
        if time.monotonic() - src.last_index < src.index_every:
            return False
        start, size = probe_range(remote.transfer_id)
        src.mailbox_read = self._poll_read(load, src, [(src.peer.info.mailbox_addr + start, size)])
        if src.mailbox_read is not None:
            src.index_every = min(2 * src.index_every, INDEX_POLL_S[1])
        return False

    # ---- compressed pieces -------------------------------------------------------------------------------------
    def _advance_pieces(self, load: Load, src: Source) -> None:
        remote = load.req.remote
        if not src.asked:
            self._notify(src, Want(request_id=remote.request_id, reader=src.reader, readers=src.readers,
                                   head_lo=src.head_lo, head_hi=src.head_hi, block_lo=load.req.skip_blocks))
            src.asked = True
        self._finish_jobs(load, src)
        self._finish_reads(load, src)
        self._finish_index(load, src)
        waiting = self._unlocated(src)
        if waiting and src.index_read is None and time.monotonic() - src.last_index >= src.index_every:
            self._read_index(load, src, waiting)
        self._read_pieces(load, src)
        src.done = not src.todo

    def _unlocated(self, src: Source) -> list[int]:
        busy = {p for _, _, ps in src.reads for p, _, _ in ps} | {p for _, _, ps in src.jobs for p in ps}
        return sorted(src.todo - set(src.located) - busy)

    def _read_index(self, load: Load, src: Source, waiting: list[int]) -> None:
        """READ the index header and the entries spanning the pieces still waiting (one READ, two ranges)."""
        first = waiting[0]
        count = max(p for p in waiting if p < first + INDEX_WINDOW) - first + 1
        addr = src.manifest.index_addr
        read = self._poll_read(load, src, [(addr, HEADER_BYTES),
                                           (addr + HEADER_BYTES + ENTRY_BYTES * first, ENTRY_BYTES * count)])
        if read is not None:
            src.index_read = (*read, first)

    def _finish_index(self, load: Load, src: Source) -> None:
        raw = self._landed(src.index_read[:3]) if src.index_read is not None else None
        if raw is None:
            return
        first = src.index_read[3]
        src.index_read = None
        tag = transfer_tag(load.req.remote.engine_id, load.req.remote.request_id, src.rank, INDEX_PIECE,
                           src.manifest.nonce)
        try:
            ready = parse_index(raw, src.plan.count, tag, self._unlocated(src), first=first)
        except IndexRevokedError as e:
            raise LoadError(str(e), rejected=True) from None
        if ready:
            src.located.update(ready)
            src.index_every = INDEX_POLL_S[0]
            load.progress = time.monotonic()
        else:
            src.index_every = min(2 * src.index_every, INDEX_POLL_S[1])

    def _read_pieces(self, load: Load, src: Source) -> None:
        """READ located pieces into the receive buffer, as many as one free extent holds."""
        if not src.located:
            return
        order = sorted(src.located)
        total, take = 0, []
        for p in order:
            n = _align(src.located[p][1])
            if total + n > self.recv_alloc.largest_free():
                break
            total += n
            take.append(p)
        if not take:
            if self.recv_alloc.capacity < _align(src.located[order[0]][1]):
                raise LoadError(f"a {src.located[order[0]][1]}-byte piece does not fit the receive buffer "
                                f"({self.recv_alloc.capacity} B); raise recv_buffer_bytes")
            return  # back-pressure: space frees as other pieces are decoded
        ext = self.recv_alloc.allocate(total)
        self.stats.add(recv_alloc_bytes=self.recv_alloc.size_of(ext))
        base = self.recv_buf.data_ptr() + ext
        local, rem, pieces, cursor = [], [], [], 0
        for p in take:
            addr, n = src.located.pop(p)
            local.append((base + cursor, n))
            rem.append((addr, n))
            pieces.append((p, ext + cursor, n))
            cursor += _align(n)
        handle = self._read(src, local, self.mem, rem, src.peer.info.mem_type, b"", ext)
        src.reads.append((handle, ext, pieces))
        load.wire += sum(n for _, n in rem)

    def _finish_reads(self, load: Load, src: Source) -> None:
        keep = []
        for handle, ext, pieces in src.reads:
            if not self._done(handle):
                keep.append((handle, ext, pieces))
                continue
            tele = self.transport.telemetry(handle)
            load.xfer_s += tele.seconds if tele else 0.0
            self.transport.release(handle)
            fut = self._codec.submit(self._decode_pieces, load, src, pieces)
            src.jobs.append((fut, ext, [p for p, _, _ in pieces]))
            load.progress = time.monotonic()
        src.reads = keep

    def _finish_jobs(self, load: Load, src: Source) -> None:
        for job in [j for j in src.jobs if j[0].done()]:
            fut, ext, pieces = job
            src.jobs.remove(job)       # before anything can raise: _abandon must not free it again
            self._free_recv(ext)
            try:
                load.decode_s += fut.result()
            except PayloadError as e:
                raise LoadError(f"received KV payload rejected: {e}", rejected=True) from None
            except Exception as e:  # a codec bug must fail this load, never the engine
                logger.exception("SplitZipConnector: decoding request %s raised", load.rid)
                raise LoadError(f"decoding the received KV raised {type(e).__name__}: {e}") from None
            src.todo.difference_update(pieces)
            self._notify(src, Consumed(request_id=load.req.remote.request_id, pieces=pieces))
            load.progress = time.monotonic()

    def _decode_pieces(self, load: Load, src: Source, pieces: list[tuple[int, int, int]]) -> float:
        """Codec thread: decode payloads from the receive buffer into the KV cache (or scratch for blocks
        decode already has); every payload's tag must be the one prefill derived for this very piece."""
        t0 = time.perf_counter()
        code = dtype_code(self.layout.dtype)
        remote = load.req.remote
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            for piece, off, n in pieces:
                layer, head, run = src.plan.coords(piece)
                dests, copies = self._piece_dests(load.req, layer, head + src.head_shift, src.plan.blocks(run))
                tag = transfer_tag(remote.engine_id, remote.request_id, src.rank, piece, src.manifest.nonce)
                self.backend.decode_into(self.recv_buf[off:off + n], dests, code, tag=tag)
                for dst, tmp in copies:
                    dst.copy_(tmp)
            if self._stream is not None:
                self._stream.synchronize()
        return time.perf_counter() - t0

    def _piece_dests(self, req: RecvRequest, layer: int, head: int, blocks: range):
        dests, copies = [], []
        for b in blocks:
            if b < req.skip_blocks:   # decode has this block already: decode the piece's copy into scratch
                views = [torch.empty_like(v) for v in self.layout.layers[layer].piece(0, head)]
            else:
                views = self.layout.layers[layer].piece(req.local_block_ids[b - req.skip_blocks], head)
            for v in views:
                if v.is_contiguous():
                    dests.append(v)
                else:
                    tmp = torch.empty(v.shape, dtype=v.dtype, device=v.device)
                    dests.append(tmp)
                    copies.append((v, tmp))
        return dests, copies

    # ---- transport helpers ----------------------------------------------------------------------------------
    def _poll_read(self, load: Load, src: Source, remote: list[tuple[int, int]]) -> tuple[object, int, int] | None:
        """Start one small READ of prefill host memory (piece index, mailbox) into the landing buffer: (handle,
        landing offset, bytes), or None while the landing buffer is full. Counted in wire and index-read bytes."""
        size = sum(n for _, n in remote)
        try:
            off = self.landing_alloc.allocate(size)
        except ArenaFullError:
            return None
        local, cursor = [], self.landing.data_ptr() + off
        for _, n in remote:
            local.append((cursor, n))
            cursor += n
        try:
            handle = self._read(src, local, "DRAM", remote, "DRAM", b"")
        except LoadError:
            self.landing_alloc.free(off)   # the READ never started: nothing will land there
            raise
        src.last_index = time.monotonic()
        load.wire += size
        self.stats.add(index_read_bytes=size)
        return handle, off, size

    def _landed(self, read: tuple[object, int, int]) -> bytes | None:
        """The bytes of a finished :meth:`_poll_read` (its landing space freed), or None while in flight."""
        handle, off, size = read
        if not self._done(handle):
            return None
        self.transport.release(handle)
        raw = self.landing[off:off + size].numpy().tobytes()
        self.landing_alloc.free(off)
        return raw

    def _read(self, src: Source, local, local_mem, remote, remote_mem, notif: bytes, extent=None):
        try:
            return self.transport.read(src.peer.agent, local, local_mem, remote, remote_mem, notif,
                                       self.dev if local_mem != "DRAM" else 0,
                                       src.peer.info.device_id if remote_mem != "DRAM" else 0)
        except TransportError as e:
            if extent is not None:
                self._free_recv(extent)
            raise LoadError(str(e), peer_lost=True) from None

    def _free_recv(self, ext: int) -> None:
        self.stats.add(recv_free_bytes=self.recv_alloc.size_of(ext))
        self.recv_alloc.free(ext)

    def _done(self, handle) -> bool:
        state = self.transport.poll(handle)
        if state == "PROC":
            return False
        if state != "DONE":
            raise LoadError("the transport reported a transfer error (prefill gone or unreachable)", peer_lost=True)
        return True

    def _notify(self, src: Source, msg) -> None:
        if src.peer is not None:
            self.transport.notify(src.peer.agent, encode_notification(msg))

    def _send_releases(self) -> None:
        keep = []
        now = time.monotonic()
        for remote, since in self._releases:
            try:
                peers = [self.peers.get(remote.engine_id, remote.host, remote.port, p)
                         for p in range(remote.tp_size)]
            except PeerUnavailableError:
                continue   # prefill's lease frees it
            if all(peers):
                readers = max(1, self.tp_size // remote.tp_size)
                for p in peers:
                    self.transport.notify(p.agent, encode_notification(
                        Done(request_id=remote.request_id, reader=self.tp_rank % readers, readers=readers)))
            elif now - since < self.timeout_s:
                keep.append((remote, since))
        self._releases = keep

    # ---- endings ----------------------------------------------------------------------------------------------
    def _complete(self, load: Load) -> None:
        del self._loads[load.rid]
        remote = load.req.remote
        raw_bytes = len(load.req.local_block_ids) * self.layout.block_bytes
        if self.dump is not None:
            self.dump(f"recv-{remote.request_id}", load.req.local_block_ids)
        for src in load.sources:
            if src.manifest.mode == "splitzip":
                self._notify(src, Done(request_id=remote.request_id, reader=src.reader, readers=src.readers))
        self.stats.add(num_transfers=1, raw_bytes=raw_bytes, wire_bytes=load.wire, transfer_seconds=load.xfer_s,
                       decode_seconds=load.decode_s)
        if load.sources and load.wire:
            self._notify(load.sources[0], Rate(wire_bytes=load.wire, transfer_s=load.xfer_s, raw_bytes=raw_bytes,
                                               decode_s=load.decode_s))

    def _fail(self, load: Load, why: str, *, rejected: bool, peer_lost: bool) -> None:
        del self._loads[load.rid]
        logger.error("SplitZipConnector: KV load for request %s failed: %s; vLLM applies kv_load_failure_policy "
                     "(recompute or fail)", load.rid, why)
        self.stats.add(num_failed_transfers=1, num_rejected=int(rejected))
        remote = load.req.remote
        pending = []
        for src in load.sources:
            pending += self._abandon(src)
            self._notify(src, Done(request_id=remote.request_id, reader=src.reader, readers=src.readers))
            if peer_lost and src.peer is not None:
                self.peers.drop(remote.engine_id, src.rank)
        self._draining.append((load.rid, pending, True))

    def _abandon(self, src: Source) -> list:
        """Release what an ended source holds; buffers of READs the transport will not release stay reserved.
        Returns what may still write into the KV cache (running decode jobs, an unreleased raw READ)."""
        pending: list = [fut for fut, _, _ in src.jobs]
        for fut, ext, _ in src.jobs:
            fut.add_done_callback(lambda _f, e=ext: self._free_recv(e))
        handles = [(h, (lambda e=ext: self._free_recv(e))) for h, ext, _ in src.reads]
        if src.index_read is not None:
            handles.append((src.index_read[0], lambda o=src.index_read[1]: self.landing_alloc.free(o)))
        if src.mailbox_read is not None:
            handles.append((src.mailbox_read[0], lambda o=src.mailbox_read[1]: self.landing_alloc.free(o)))
        if src.direct is not None and src.direct[0] is not None:
            handles.append((src.direct[0], lambda: None))
        if src.ticket_slot is not None:
            slot = src.ticket_slot
            handles.append((None, lambda: self.tickets.put(slot)))
        for handle, free in handles:
            if handle is None or self.transport.release(handle):
                free()
            else:
                self._zombies.append((handle, free))
                if src.direct is not None and handle is src.direct[0]:
                    pending.append(handle)   # a raw READ lands in the KV blocks themselves
        src.jobs, src.reads, src.index_read, src.direct, src.ticket_slot = [], [], None, None, None
        src.mailbox_read = None
        return pending

    def _reap_zombies(self) -> None:
        keep = []
        for handle, free in self._zombies:
            if self.transport.poll(handle) != "PROC" and self.transport.release(handle):
                free()
            else:
                keep.append((handle, free))
        self._zombies = keep

    def close(self) -> None:
        self._codec.shutdown(wait=True, cancel_futures=True)
