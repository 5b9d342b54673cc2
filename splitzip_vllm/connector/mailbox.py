"""Layer-wise mode: where decode finds a request's manifest before prefill has answered the proxy.

In layer-wise mode the proxy sends a request to prefill and decode at once, naming the transfer with an id of its
choice (``splitzip_transfer``). Prefill publishes the request when its last prompt chunk starts and writes the
manifest (piece-index address, nonce, sizes) into a slot of this mailbox: registered host memory whose address
is in the handshake. Decode READs the slots the id hashes to until its entry appears, then reads pieces exactly
as in whole-request mode. Layout (little-endian), ``SLOTS`` entries of 64 bytes:

    tag u64 | index_addr u64 | nonce u64 | raw_bytes u64 | num_blocks u32 | blocks_per_piece u32 | mode u32 |
    check u32 | 16 zero bytes

``tag`` is binding.transfer_tag(engine, transfer id, rank, MAILBOX_PIECE, 0): an entry of another transfer, or
a zeroed one (freed), does not match. ``check`` is the CRC-32 of the fields before it, written last, so an entry
read while prefill writes it counts as not there yet. An id probes ``PROBE`` consecutive slots (one READ).
"""
from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import torch

from .contracts import Manifest

SLOTS = 4096
ENTRY_BYTES = 64
PROBE = 8
MAILBOX_PIECE = -2       # payload index used for a mailbox entry's tag
MODE_SPLITZIP = 1
_FIELDS = struct.Struct("<QQQQIII")
_CHECK = struct.Struct("<I")


class MailboxFullError(RuntimeError):
    """Every slot a transfer id may use holds a live transfer."""


class MailboxRefusedError(RuntimeError):
    """Prefill published the transfer but cannot stream it layer-wise (e.g. a KV dtype without SplitZip coding)."""


def first_slot(transfer_id: str) -> int:
    h = hashlib.blake2b(transfer_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (SLOTS - PROBE + 1)


def _check(fields: bytes) -> int:
    return zlib.crc32(fields) & 0xFFFF_FFFF or 1


class Mailbox:
    """Producer side: one per prefill worker."""

    def __init__(self) -> None:
        self.buffer = torch.zeros(SLOTS * ENTRY_BYTES, dtype=torch.uint8)
        self._np = self.buffer.numpy()
        self._used: set[int] = set()   # slots holding a live entry

    @property
    def base(self) -> int:
        return self.buffer.data_ptr()

    def post(self, transfer_id: str, tag: int, m: Manifest | None, blocks_per_piece: int) -> int:
        """Write the entry (``m`` None: refused); returns its slot (raises MailboxFullError)."""
        start = first_slot(transfer_id)
        slot = next((s for s in range(start, start + PROBE) if s not in self._used), None)
        if slot is None:
            raise MailboxFullError(f"{PROBE} mailbox slots for transfer {transfer_id} are all in use")
        fields = _FIELDS.pack(tag, 0, 0, 0, 0, 0, 0) if m is None else \
            _FIELDS.pack(tag, m.index_addr, m.nonce, m.raw_bytes, m.num_blocks, blocks_per_piece, MODE_SPLITZIP)
        e = slot * ENTRY_BYTES
        self._np[e:e + len(fields)] = np.frombuffer(fields, dtype=np.uint8)
        self._np[e + len(fields):e + len(fields) + 4] = np.frombuffer(_CHECK.pack(_check(fields)), dtype=np.uint8)
        self._used.add(slot)
        return slot

    def clear(self, slot: int) -> None:
        e = slot * ENTRY_BYTES
        self._np[e:e + ENTRY_BYTES] = 0
        self._used.discard(slot)


def probe_range(transfer_id: str) -> tuple[int, int]:
    """(byte offset, bytes) of the slots decode reads for ``transfer_id``."""
    return first_slot(transfer_id) * ENTRY_BYTES, PROBE * ENTRY_BYTES


def find_entry(raw: bytes, tag: int, rank: int) -> tuple[Manifest, int] | None:
    """The manifest and blocks-per-piece of the entry tagged ``tag`` among the slots read, or None (not there
    yet); raises MailboxRefusedError for an entry that says prefill cannot stream this transfer."""
    for e in range(0, len(raw) - ENTRY_BYTES + 1, ENTRY_BYTES):
        fields = raw[e:e + _FIELDS.size]
        got_tag, index_addr, nonce, raw_bytes, num_blocks, bpp, mode = _FIELDS.unpack(fields)
        if got_tag != tag or _CHECK.unpack_from(raw, e + _FIELDS.size)[0] != _check(fields):
            continue
        if mode != MODE_SPLITZIP:
            raise MailboxRefusedError("prefill cannot stream this request layer-wise (its KV dtype has no "
                                      "SplitZip coding); send it in whole-request mode")
        return Manifest(mode="splitzip", rank=rank, num_blocks=num_blocks, raw_bytes=raw_bytes, nonce=nonce,
                        index_addr=index_addr), bpp
    return None
