"""Prefill side: publish finished prompts, encode the pieces decode asks for into the bounded send arena.

Engine thread (``wait_for_save`` / ``get_finished``): :meth:`Producer.publish` reserves a piece index (compressed)
or a ticket (raw) and returns the manifest; :meth:`Producer.poll` handles decode's notifications and leases and
returns the requests vLLM may free. Encoder thread: encodes wanted pieces in batches into the send arena as
space allows and lists them in the request's piece index; decode's ``Consumed`` notices give the space back.
So a request of any length streams through an arena of any size, and the engine step never waits for the codec.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..codec.format import HEADER_BYTES, dtype_code, encode_capacity, parse_header
from ..transport.arena import ALIGN, ArenaFullError, ExtentAllocator
from .binding import TicketTable, TicketTableFullError, new_nonce, transfer_tag
from .contracts import Consumed, Done, Heartbeat, Manifest, Rate, Want, decode_notification
from .kv_layout import KVLayout, PiecePlan
from .mailbox import MAILBOX_PIECE, Mailbox, MailboxFullError
from .piece_index import INDEX_PIECE, IndexArena

logger = logging.getLogger("splitzip_vllm.connector")

SEND_TICKET_SLOTS = 1 << 16     # raw requests published at once (512 KiB of host memory)
BATCH_RAW_BYTES = 2 << 20       # the encoder fills the arena in batches of about this much KV


class _NotStreamable(RuntimeError):
    pass


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Send:
    rid: str
    mode: str
    block_ids: list[int]
    plan: PiecePlan
    name: str = ""                                # the transfer's name on the wire (tags, notices): rid, or the
                                                  # proxy's transfer id in layer-wise mode
    saved: set[int] | None = None                 # layer-wise: layers whose KV the forward pass has written
    layer_events: dict[int, object] = field(default_factory=dict)   # layer-wise on GPU: event after each layer
    slot: int | None = None                       # layer-wise: mailbox slot
    consumed: int = 0                             # pieces decode has read (Consumed notices)
    nonce: int = 0
    index_off: int | None = None
    ticket_slot: int | None = None
    deadline: float | None = None                 # set when vLLM finished the request; renewed by decode
    readers: int | None = None
    readers_done: set[int] = field(default_factory=set)
    queue: collections.deque = field(default_factory=collections.deque)   # wanted pieces not encoded yet
    spec: collections.deque = field(default_factory=collections.deque)    # pieces to encode before asked
    wanted: set[int] = field(default_factory=set)
    encoded: set[int] = field(default_factory=set)                        # encoded or being encoded
    ready: object = None                                                  # GPU: event after the KV writes
    batches: dict[int, set[int]] = field(default_factory=dict)            # arena offset -> pieces unconsumed
    piece_batch: dict[int, int] = field(default_factory=dict)


class Producer:
    def __init__(self, *, engine_id: str, tp_rank: int, layout: KVLayout, arena_bytes: int, index_bytes_: int,
                 lease_s: float, backend, policy, stats, chunk_log2: int, codebook_source):
        self.engine_id, self.tp_rank, self.layout = engine_id, tp_rank, layout
        self.lease_s, self.backend, self.policy, self.stats = lease_s, backend, policy, stats
        self.chunk_log2, self.codebook_source = chunk_log2, codebook_source
        self.arena = torch.empty(arena_bytes, dtype=torch.uint8, device=layout.device)
        self.arena_alloc = ExtentAllocator(arena_bytes)
        self.index = IndexArena(index_bytes_)
        self.tickets = TicketTable(SEND_TICKET_SLOTS)
        self.mailbox = Mailbox()
        self._sends: dict[str, _Send] = {}
        self._names: dict[str, str] = {}       # wire name -> request id (layer-wise transfers)
        self._gated: list[_Send] = []           # layer-wise sends whose forward pass runs in this step
        self._saved: list[_Send] = []           # ... whose forward pass just ended (overlap measured at poll)
        self._finished: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._rr: collections.deque[str] = collections.deque()   # round-robin over requests with pieces to encode
        self._stream = torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        self._encoding: set[int] = set()    # arena offsets of batches being written (encoder or engine thread)
        self._thread = threading.Thread(target=self._encode_loop, name="splitzip-encoder", daemon=True)
        self._thread.start()

    def registrations(self) -> list[tuple[int, int, str]]:
        """(address, bytes, mem type) the transport must register for decode to read."""
        mem = "DRAM" if self.layout.device.type == "cpu" else "VRAM"
        return [(self.arena.data_ptr(), self.arena.numel(), mem),
                (self.index.base, self.index.buffer.numel(), "DRAM"),
                (self.tickets.address(0), self.tickets.buffer.nbytes, "DRAM"),
                (self.mailbox.base, self.mailbox.buffer.numel(), "DRAM")]

    # ---- engine thread ---------------------------------------------------------------------------------
    def publish(self, rid: str, block_ids: list[int], plan: PiecePlan, transfer_id: str = "") -> Manifest:
        """Whole-request mode (called after the forward pass that completed the prompt): returns the manifest
        for ``kv_transfer_params``. Layer-wise (``transfer_id``, called before that forward pass): pieces wait
        for :meth:`layer_saved`, and the manifest goes into the mailbox under ``transfer_id``."""
        if transfer_id:
            return self._publish_layerwise(rid, block_ids, plan, transfer_id)
        return self._publish(rid, block_ids, plan, rid)

    def _publish(self, rid: str, block_ids: list[int], plan: PiecePlan, name: str,
                 gated: bool = False) -> Manifest:
        raw = len(block_ids) * self.layout.block_bytes
        self.stats.add(num_encoded=1)
        reason = ""
        if self.backend is None:
            reason = f"dtype {self.layout.dtype} is carried raw"
        elif not gated and not self.policy.decide():   # layer-wise always streams through the arena
            reason = f"compression policy: {self.policy.describe()}"
        with self._cv:
            if not reason:
                nonce = new_nonce()
                try:
                    off = self.index.publish(plan.count, transfer_tag(self.engine_id, name, self.tp_rank,
                                                                      INDEX_PIECE, nonce))
                except ArenaFullError as e:
                    reason = f"piece index memory full ({e}); sending raw"
                    self.stats.add(num_arena_fallbacks=1)
                else:
                    send = self._sends[rid] = _Send(rid, "splitzip", block_ids, plan, name=name, nonce=nonce,
                                                    index_off=off, saved=set() if gated else None)
                    # start encoding before decode asks (most decodes want every piece): the Want then finds
                    # them ready; arena use for this is capped so asked-for pieces always find room
                    send.spec.extend(range(plan.count))
                    if gated:
                        self._gated.append(send)
                    elif self.layout.device.type == "cuda":
                        send.ready = torch.cuda.Event()
                        send.ready.record(torch.cuda.current_stream(self.layout.device))
                    self._rr.append(rid)
                    self._cv.notify_all()
                    return Manifest(mode="splitzip", rank=self.tp_rank, num_blocks=len(block_ids), raw_bytes=raw,
                                    nonce=nonce, index_addr=self.index.base + off)
            if gated:   # layer-wise streams through the arena only
                raise _NotStreamable(reason)
            send = _Send(rid, "direct", block_ids, plan, name=name)
            self._sends[rid] = send
            self.stats.add(num_direct=1)
            try:
                send.ticket_slot, value = self.tickets.issue()
            except TicketTableFullError as e:
                return Manifest(mode="direct", rank=self.tp_rank, num_blocks=len(block_ids), raw_bytes=raw,
                                reason=f"{reason}; no ticket: {e}")
            return Manifest(mode="direct", rank=self.tp_rank, num_blocks=len(block_ids), raw_bytes=raw,
                            reason=reason, ticket=(self.tickets.address(send.ticket_slot), value))

    def _publish_layerwise(self, rid: str, block_ids: list[int], plan: PiecePlan, transfer_id: str) -> Manifest:
        tag = transfer_tag(self.engine_id, transfer_id, self.tp_rank, MAILBOX_PIECE, 0)
        try:
            m = self._publish(rid, block_ids, plan, transfer_id, gated=True)
        except _NotStreamable as e:   # say so in the mailbox: decode fails the load at once and recomputes
            logger.warning("SplitZipConnector: request %s cannot stream layer-wise: %s", rid, e)
            m = None
        with self._cv:
            try:
                slot = self.mailbox.post(transfer_id, tag, m, plan.bpp)
            except MailboxFullError as e:
                logger.warning("SplitZipConnector: %s; decode will time out and recompute", e)
                slot = None
            if rid in self._sends:
                self._sends[rid].slot = slot
                self._names[transfer_id] = rid
        return m or Manifest(mode="none", rank=self.tp_rank, num_blocks=len(block_ids), raw_bytes=0)

    def layer_saved(self, layers: list[int], inline: bool = False) -> None:
        """Engine thread, layer-wise: the forward pass has written these layers' KV for this step's sends (GPU:
        queued on the current stream; the encoder's stream waits for an event recorded here). ``inline`` (from
        ``save_kv_layer``, CPU KV cache): encode them right here, see :meth:`_encode_now`."""
        if not self._gated:
            return
        event = None
        if self.layout.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.layout.device))
        with self._cv:
            for send in self._gated:
                for layer in layers:
                    send.saved.add(layer)
                    if event is not None:
                        send.layer_events[layer] = event
            self._cv.notify_all()
        if inline and self.layout.device.type == "cpu":
            for send in list(self._gated):
                self._encode_now(send, set(layers))

    def _encode_now(self, s: _Send, layers: set[int]) -> None:
        """CPU, engine thread, between two layers of the forward pass: encode these layers' pieces now. A CPU
        server's encoder thread shares the model's core: encoding there during the forward pass slowed a
        1k-token prefill 2.2x (0.5 Gbit/s) and 4.5x (unlimited link) in benchmarks/e2e_ttft_bench.py, far more
        than the encode itself costs (GIL hand-offs between the thread's per-piece Python and the model thread
        are the likely cause). Inline, the forward pass pays just the encode, and decode's READs of a layer
        still overlap the layers after it."""
        todo = collections.deque(p for layer in sorted(layers) for p in s.plan.layer_pieces(layer))
        while True:
            with self._cv:
                while todo and todo[0] in s.encoded:
                    todo.popleft()
                if not todo or self._sends.get(s.rid) is not s:
                    return
                job = self._reserve(s, todo)
            if job is None:
                return   # arena full: the encoder thread takes the rest as space frees
            self._run_job(job)

    def step_saved(self) -> None:
        """Engine thread, after the forward pass: every layer of this step's layer-wise sends is written (also
        the layers the model did not report through ``save_kv_layer``)."""
        if self._gated:
            with self._cv:   # pieces already encoded (the encoder's current batch not counted)
                for s in self._gated:
                    busy = sum(len(s.batches.get(off, ())) for off in self._encoding)
                    self.stats.add(lw_pieces=s.plan.count, lw_encoded_in_forward=len(s.encoded) - busy)
            self.layer_saved(list(range(len(self.layout.layers))))
            self._saved, self._gated = self._gated, []

    def drop(self, rid: str) -> None:
        """Unpublish: zero the ticket and the piece index, free the arena. Runs before the request is reported
        finished, i.e. before vLLM may reuse its blocks (docs/TRANSFER_BINDING.md)."""
        with self._cv:
            send = self._sends.pop(rid, None)
            self._finished.discard(rid)
            if send is None:
                return
            if send.ticket_slot is not None:
                self.tickets.revoke(send.ticket_slot)
            if send.index_off is not None:
                self.index.revoke(send.index_off)
            if send.slot is not None:
                self.mailbox.clear(send.slot)
            self._names.pop(send.name, None)
            for off in send.batches:
                if off in self._encoding:   # being written: the writer frees it when done
                    continue
                self.stats.add(arena_free_bytes=self.arena_alloc.size_of(off))
                self.arena_alloc.free(off)
            send.batches.clear()
            send.queue.clear()
            self.stats.add(num_freed=1)
            self._cv.notify_all()

    def poll(self, finished_req_ids: set[str], notifications: list[bytes]) -> set[str]:
        """Apply decode's notices and the leases; returns the requests now freed (vLLM may reuse their blocks)."""
        now = time.monotonic()
        done: set[str] = set()
        with self._cv:
            for rid in finished_req_ids:
                if rid in self._sends and self._sends[rid].deadline is None:
                    self._sends[rid].deadline = now + self.lease_s
                    self._finished.add(rid)
            for raw in notifications:
                msg = decode_notification(raw)
                if msg is not None:
                    self._apply(msg, now)
            for s in self._saved:   # decode's notices of what it read during the forward pass arrived by now
                self.stats.add(lw_read_in_forward=s.consumed)
            self._saved = []
            for rid in list(self._finished):
                s = self._sends[rid]
                if s.readers is not None and len(s.readers_done) >= s.readers:
                    done.add(rid)
                elif s.deadline is not None and now > s.deadline:
                    logger.warning("SplitZipConnector: lease of request %s expired after %.1fs without a complete "
                                   "read; freeing its KV blocks and staging memory", rid, self.lease_s)
                    self.stats.add(num_expired=1)
                    done.add(rid)
        for rid in done:
            self.drop(rid)
        return done

    def _apply(self, msg, now: float) -> None:
        if isinstance(msg, Rate):
            self.policy.observe_transfer(msg.wire_bytes, msg.transfer_s, msg.raw_bytes, msg.decode_s)
            return
        if isinstance(msg, Heartbeat):
            for name in msg.request_ids:
                self._renew(self._sends.get(self._names.get(name, name)), now)
            return
        s = self._sends.get(self._names.get(msg.request_id, msg.request_id))
        if s is None:
            return  # already freed: a late notice
        self._renew(s, now)
        if isinstance(msg, Want):
            self._want(s, msg)
        elif isinstance(msg, Consumed):
            self._consumed(s, msg.pieces)
        elif isinstance(msg, Done):
            s.readers = msg.readers
            s.readers_done.add(msg.reader)

    def _renew(self, s: _Send | None, now: float) -> None:
        if s is not None and s.deadline is not None:
            s.deadline = max(s.deadline, now + self.lease_s)

    def _want(self, s: _Send, msg: Want) -> None:
        s.readers = msg.readers
        if s.mode != "splitzip":
            return
        new = [p for p in s.plan.wanted(msg.head_lo, msg.head_hi, msg.block_lo) if p not in s.wanted]
        s.wanted.update(new)
        s.queue.extend(p for p in new if p not in s.encoded)
        if new and s.rid not in self._rr:
            self._rr.append(s.rid)
        self._cv.notify_all()

    def _consumed(self, s: _Send, pieces: list[int]) -> None:
        s.consumed += len(pieces)
        for p in pieces:
            off = s.piece_batch.pop(p, None)
            if off is None:
                continue
            left = s.batches[off]
            left.discard(p)
            if not left:
                del s.batches[off]
                self.stats.add(arena_free_bytes=self.arena_alloc.size_of(off))
                self.arena_alloc.free(off)
                self._cv.notify_all()

    @property
    def arena_used_bytes(self) -> int:
        return self.arena_alloc.used_bytes

    # ---- encoder thread --------------------------------------------------------------------------------
    def _encode_loop(self) -> None:
        if self.layout.device.type == "cuda":
            torch.cuda.set_device(self.layout.device)
        while True:
            with self._cv:
                job = self._next_batch()
                while job is None and not self._stop:
                    self._cv.wait(timeout=0.05)
                    job = self._next_batch()
                if self._stop:
                    return
            self._run_job(job)

    def _run_job(self, job) -> None:
        try:
            self._encode_batch(*job)
        except Exception:  # a failing encode must not kill the thread or the engine: decode recomputes
            logger.exception("SplitZipConnector: encoding request %s failed", job[0].rid)
            with self._cv:
                s, off = job[0], job[2]
                if off in self._encoding:
                    self._encoding.discard(off)
                    for p in s.batches.pop(off, ()):
                        s.piece_batch.pop(p, None)
                    self._free_extent(off)

    def _next_batch(self):
        """(send, pieces, arena offset, capacity) of the next batch: pieces decode asked for first, round-robin
        over requests; pieces not asked for yet only while the arena is less than half full."""
        for speculative in (False, True):
            if speculative and 2 * self.arena_alloc.used_bytes >= self.arena_alloc.capacity:
                return None
            for _ in range(len(self._rr)):
                rid = self._rr[0]
                self._rr.rotate(-1)
                s = self._sends.get(rid)
                if s is None or (not s.queue and not s.spec):
                    self._rr.remove(rid)
                    continue
                queue = s.spec if speculative else s.queue
                while queue and queue[0] in s.encoded:
                    queue.popleft()
                if queue and self._encodable(s, queue[0]):
                    return self._reserve(s, queue)
        return None

    def _reserve(self, s: _Send, queue: collections.deque):
        cap1 = self.piece_capacity(s.plan.bpp)
        n = max(1, min(len(queue), BATCH_RAW_BYTES // cap1, self.arena_alloc.largest_free() // cap1))
        try:
            off = self.arena_alloc.allocate(n * cap1)
        except ArenaFullError:
            return None
        pieces = []
        while queue and len(pieces) < n and self._encodable(s, queue[0]):
            p = queue.popleft()
            if p not in s.encoded:
                pieces.append(p)
        s.encoded.update(pieces)
        self._encoding.add(off)
        s.batches[off] = set(pieces)
        for p in pieces:
            s.piece_batch[p] = off
        self.stats.add(arena_alloc_bytes=self.arena_alloc.size_of(off))
        return s, pieces, off, cap1

    @staticmethod
    def _encodable(s: _Send, piece: int) -> bool:
        """Layer-wise: only pieces of layers the forward pass has written (queues run in layer order)."""
        return s.saved is None or s.plan.coords(piece)[0] in s.saved

    def _free_extent(self, off: int) -> None:
        self.stats.add(arena_free_bytes=self.arena_alloc.size_of(off))
        self.arena_alloc.free(off)
        self._cv.notify_all()

    def piece_capacity(self, bpp: int) -> int:
        """Arena bytes one piece of ``bpp`` blocks may need before its real length is known."""
        return _align(encode_capacity(self.layout.piece_elems * bpp, self.layout.element_size))

    def _encode_batch(self, s: _Send, pieces: list[int], off: int, cap1: int) -> None:
        if s.ready is not None:   # GPU: the encoder's stream waits for the forward pass that wrote this KV
            self._stream.wait_event(s.ready)
        for layer in sorted({s.plan.coords(p)[0] for p in pieces}):   # layer-wise on GPU
            if layer in s.layer_events:
                self._stream.wait_event(s.layer_events[layer])
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self._encode_pieces(s, pieces, off, cap1)

    def _encode_pieces(self, s: _Send, pieces: list[int], off: int, cap1: int) -> None:
        t0 = time.perf_counter()
        code = dtype_code(self.layout.dtype)
        codebook = self.codebook_source(s.block_ids)
        slots: list[tuple[int, int]] = []
        cursor = off
        pack = self.layout.device.type == "cpu"  # CPU: back to back; GPU: fixed slots, one header copy
        for p in pieces:
            layer, head, run = s.plan.coords(p)
            regions = [v for b in s.plan.blocks(run) for v in self.layout.layers[layer].piece(s.block_ids[b], head)]
            regions = [r if r.is_contiguous() else r.contiguous() for r in regions]
            out = self.arena[cursor:cursor + cap1]
            tag = transfer_tag(self.engine_id, s.name, self.tp_rank, p, s.nonce)
            self.backend.encode_into(regions, code, codebook, self.chunk_log2, out, tag=tag)
            if pack:
                n = parse_header(out[:HEADER_BYTES].numpy().tobytes()).payload_bytes
                slots.append((cursor, n))
                cursor += _align(n)
            else:
                slots.append((cursor, 0))
                cursor += cap1
        if not pack:
            heads = torch.stack([self.arena[a:a + HEADER_BYTES] for a, _ in slots]).cpu()
            slots = [(a, parse_header(h.numpy().tobytes()).payload_bytes) for (a, _), h in zip(slots, heads)]
        wire = sum(n for _, n in slots)
        raw = sum(len(s.plan.blocks(s.plan.coords(p)[2])) for p in pieces) * self.layout.piece_bytes
        self.policy.observe_encode(raw, wire, time.perf_counter() - t0)
        with self._cv:
            self._encoding.discard(off)
            if self._sends.get(s.rid) is not s:
                self._free_extent(off)   # dropped while being encoded: drop() left this extent to the encoder
                return
            if pack:
                before = self.arena_alloc.size_of(off)
                self.arena_alloc.shrink(off, cursor - off)
                self.stats.add(arena_free_bytes=before - self.arena_alloc.size_of(off))
                self._cv.notify_all()
            base = self.arena.data_ptr()
            itag = transfer_tag(self.engine_id, s.name, self.tp_rank, INDEX_PIECE, s.nonce)
            for p, (a, n) in zip(pieces, slots):
                self.index.set_entry(s.index_off, p, base + a, n, itag)
            self.stats.add(encoded_wire_bytes=wire, encoded_raw_bytes=raw, encode_seconds=time.perf_counter() - t0)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
