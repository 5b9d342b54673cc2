"""Bind every KV transfer to the request (and the allocation) it was published for.

A decode server reads prefill memory at addresses it learnt from a request's ``kv_transfer_params``. After the
prefill's lease on that request expired, the same memory may hold another request's KV, so an address alone
proves nothing. Two mechanisms close that hole (docs/TRANSFER_BINDING.md has the argument):

* **compressed payloads** carry a 64-bit *transfer tag* in their header (FORMAT.md, "Transfer binding"),
  derived here from the prefill engine, the request, the TP rank, the payload index and a per-allocation nonce.
  Decode derives the tag it expects from what it was told to read; every codec backend rejects a payload whose
  tag differs before writing anything;
* **raw (direct) transfers** read the prefill's KV blocks, which carry no header. Each one gets a *ticket*: a
  random value in a small registered table on the prefill side that prefill zeroes before the blocks go back
  to vLLM. Decode reads the ticket after its data READ completed; an unchanged ticket proves the blocks were
  still this request's during the whole data read.

Nonces and ticket values stay below 2**52 so they survive JSON proxies that hold numbers as doubles.
"""
from __future__ import annotations

import hashlib
import secrets
import threading

import msgspec
import torch

_TAG_PERSON = b"splitzip-tag-v1"
_VALUE_BITS = 52
TICKET_BYTES = 8


def new_nonce() -> int:
    """A random non-zero value below 2**52 (per-allocation nonce, ticket value)."""
    return secrets.randbits(_VALUE_BITS) or 1


def transfer_tag(engine_id: str, request_id: str, tp_rank: int, index: int, nonce: int) -> int:
    """The 64-bit header tag of payload ``index`` of one prepared request (never 0: 0 means unbound)."""
    h = hashlib.blake2b(msgspec.msgpack.encode([engine_id, request_id, int(tp_rank), int(index), int(nonce)]),
                        digest_size=8, person=_TAG_PERSON)
    return int.from_bytes(h.digest(), "little") or 1


class TicketTableFullError(RuntimeError):
    """Every ticket slot is held by a request whose raw KV is still published."""


class TicketTable:
    """Fixed slots of 8 bytes in host memory; the caller registers :attr:`buffer` with its transport.

    Producer side: :meth:`issue` writes a fresh value into a free slot, :meth:`revoke` zeroes it (and must run
    before the request's blocks go back to vLLM). Consumer side: slots are landing places for ticket READs.
    """

    def __init__(self, slots: int):
        self.buffer = torch.zeros(slots, dtype=torch.int64)
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self.buffer.numel()

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def address(self, slot: int) -> int:
        return self.buffer.data_ptr() + TICKET_BYTES * slot

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise TicketTableFullError(f"all {self.slots} ticket slots are in use")
            return self._free.pop()

    def put(self, slot: int) -> None:
        self.buffer[slot] = 0
        with self._lock:
            self._free.append(slot)

    def issue(self) -> tuple[int, int]:
        """(slot, value): a slot holding a new ticket value."""
        slot = self.take()
        value = new_nonce()
        self.buffer[slot] = value
        return slot, value

    def revoke(self, slot: int) -> None:
        """Zero the ticket (any later read sees 0) and free the slot."""
        self.put(slot)

    def value(self, slot: int) -> int:
        return int(self.buffer[slot])
