"""Per-request piece index: where each encoded piece of a published request sits in the send arena.

Prefill keeps one index per (request, TP rank) in registered host memory; decode READs it to learn which of
the pieces it asked for are ready, then READs exactly those payloads. Layout (little-endian):

    header (32 B): magic "SZIX" u32 | version u16 | 0 u16 | n_pieces u32 | 0 u32 | tag u64 | 0 u64
    entry i (16 B): address u64 | length u32 | check u32      (length 0 = not encoded yet)

``tag`` binds the index to its request and allocation (binding.transfer_tag with payload index -1); prefill
zeroes the header before the request's memory is reused, so a late read sees a foreign or zero tag and is
rejected. ``check`` is the CRC-32 of (address, length, i, tag): an entry read while prefill was writing it
fails the check and counts as not ready (the payload's own header tag and checksum are verified anyway).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from ..transport.arena import ExtentAllocator

MAGIC = 0x5849_5A53   # "SZIX"
VERSION = 1
HEADER_BYTES = 32
ENTRY_BYTES = 16
INDEX_PIECE = -1      # payload index used for the index's own tag
_HEADER = struct.Struct("<IHHIIQQ")
_CHECK = struct.Struct("<QIqQ")
_ENTRY = np.dtype([("addr", "<u8"), ("len", "<u4"), ("check", "<u4")])


class IndexRevokedError(RuntimeError):
    """The index no longer belongs to the request decode asked for (freed, or reused by another one)."""


def index_bytes(n_pieces: int) -> int:
    return HEADER_BYTES + ENTRY_BYTES * n_pieces


def entry_check(address: int, length: int, piece: int, tag: int) -> int:
    return zlib.crc32(_CHECK.pack(address, length, piece, tag)) & 0xFFFF_FFFF


class IndexArena:
    """Registered host memory holding the piece indexes of published requests (producer side)."""

    def __init__(self, capacity: int):
        self.buffer = torch.zeros(capacity, dtype=torch.uint8)
        self.alloc = ExtentAllocator(capacity)
        self._np = self.buffer.numpy()

    @property
    def base(self) -> int:
        return self.buffer.data_ptr()

    def publish(self, n_pieces: int, tag: int) -> int:
        """Reserve and initialise an index; returns its offset (raises ArenaFullError)."""
        size = index_bytes(n_pieces)
        off = self.alloc.allocate(size)
        self._np[off:off + size] = 0
        self._np[off:off + HEADER_BYTES] = np.frombuffer(_HEADER.pack(MAGIC, VERSION, 0, n_pieces, 0, tag, 0),
                                                          dtype=np.uint8)
        return off

    def set_entry(self, off: int, piece: int, address: int, length: int, tag: int) -> None:
        e = off + HEADER_BYTES + ENTRY_BYTES * piece
        # address and length first, the check last: a reader that sees a valid check sees the whole entry
        self._np[e:e + 12] = np.frombuffer(struct.pack("<QI", address, length), dtype=np.uint8)
        self._np[e + 12:e + 16] = np.frombuffer(struct.pack("<I", entry_check(address, length, piece, tag)),
                                                dtype=np.uint8)

    def revoke(self, off: int) -> None:
        """Zero the header (a later READ of this index is rejected), then free the space."""
        self._np[off:off + HEADER_BYTES] = 0
        self.alloc.free(off)


def parse_index(raw: bytes | memoryview, n_pieces: int, tag: int, wanted: list[int],
                first: int = 0) -> dict[int, tuple[int, int]]:
    """``{piece: (address, length)}`` for the ready pieces among ``wanted`` in an index READ by decode; ``raw``
    holds the header and the entries from piece ``first`` on."""
    magic, version, _, n, _, got_tag, _ = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC or got_tag != tag or n != n_pieces:
        raise IndexRevokedError(
            f"the request's piece index was freed or reused by prefill (tag {got_tag:#x}, expected {tag:#x}): a "
            f"read after the prefill's lease (kv_lease_duration) expired?")
    if version != VERSION:
        raise IndexRevokedError(f"piece index version {version}; this build reads {VERSION}")
    count = (len(raw) - HEADER_BYTES) // ENTRY_BYTES
    ent = np.frombuffer(raw, dtype=_ENTRY, count=count, offset=HEADER_BYTES)
    out: dict[int, tuple[int, int]] = {}
    for i in wanted:
        if not first <= i < first + count:
            continue
        addr, length, check = (int(x) for x in ent[i - first].tolist())
        if length and check == entry_check(addr, length, i, tag):
            out[i] = (addr, length)
    return out
