"""Decode side, raw (``direct``) transfers: one READ of the raw pieces straight into decode's KV blocks, then a
READ of the request's ticket (carrying the ``Done`` notice) proves the blocks were still this request's during the
data READ (docs/TRANSFER_BINDING.md). A mixin of :class:`~.consumer.Consumer`, which owns the state it uses."""
from __future__ import annotations

import time

from .binding import TicketTableFullError
from .contracts import Done, encode_notification
from .kv_layout import coalesce, piece_ranges
from .loads import Load, LoadError, Source
from .metadata import RecvRequest


class DirectReads:
    def _advance_direct(self, load: Load, src: Source) -> None:
        m = src.manifest
        if m.ticket is None:
            raise LoadError(f"prefill published raw KV without a validity ticket ({m.reason})")
        if src.direct is None:
            local, rem = self._direct_ranges(load.req, src)
            try:
                src.ticket_slot = self.tickets.take()
            except TicketTableFullError:
                return  # back-pressure
            if not local:
                src.direct = (None, "data")
            else:
                # no notice yet: prefill must keep the blocks (and the ticket) until the ticket READ is done
                src.direct = (self._read(src, local, self.mem, rem, src.peer.info.mem_type, b""), "data")
                load.wire += sum(n for _, n in rem)
            return
        handle, phase = src.direct
        if handle is not None and not self._done(handle):
            return
        if handle is not None:
            tele = self.transport.telemetry(handle)
            load.xfer_s += tele.seconds if tele else 0.0
            self.transport.release(handle)
        load.progress = time.monotonic()
        if phase == "data":
            done = encode_notification(Done(request_id=load.req.remote.request_id, reader=src.reader,
                                            readers=src.readers))
            src.direct = (self._read(src, [(self.tickets.address(src.ticket_slot), 8)], "DRAM",
                                     [(m.ticket[0], 8)], "DRAM", done), "ticket")
            return
        seen = self.tickets.value(src.ticket_slot)
        if seen != m.ticket[1]:
            raise LoadError(f"the raw KV blocks were freed or reused by prefill before or while they were read "
                            f"(ticket {m.ticket[1]:#x}, now {seen:#x}): a read after the prefill's lease "
                            f"(kv_lease_duration) expired?", rejected=True)
        self.tickets.put(src.ticket_slot)
        src.ticket_slot = None
        src.done = True

    def _direct_ranges(self, req: RecvRequest, src: Source) -> tuple[list, list]:
        info = src.peer.info
        local, rem = [], []
        for li, layer in enumerate(self.layout.layers):
            spec = info.layers[li]
            for h in range(src.head_lo, src.head_hi):
                for b in range(req.skip_blocks, src.plan.num_blocks):
                    rb = req.remote.block_ids[b]
                    rem += piece_ranges(info.layout, spec.base, spec.shape, spec.strides, info.element_size, rb, h)
                    local += layer.piece_ranges(req.local_block_ids[b - req.skip_blocks], h + src.head_shift)
        return coalesce(local, rem)

