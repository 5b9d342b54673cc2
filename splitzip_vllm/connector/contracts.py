"""Typed, versioned messages between prefill and decode (msgspec structs).

* :class:`Handshake` - what a prefill worker serves on the side channel, per TP rank;
* :class:`Manifest` - what a prefill worker published for one request (in ``kv_transfer_params``, as a dict);
* notifications (:class:`Want`, :class:`Consumed`, :class:`Done`, :class:`Heartbeat`, :class:`Rate`) - decode ->
  prefill over NIXL, msgpack behind :data:`NOTIF_PREFIX` (other traffic is ignored).

Protocol version history (``PROTOCOL_VERSION``; peers with another version are refused at the handshake):
  1: whole-request manifests with per-layer payload addresses (plain dicts).
  2: transfers bound to their request: payload tags from a per-allocation nonce, tickets for raw transfers.
  3: pieces (one KV head of one block of one layer) read on demand: decode asks for the pieces it needs
     (``Want``: its heads, the blocks it lacks), prefill encodes them into a bounded arena and lists them in
     a per-request piece index that decode polls; heterogeneous TP; typed structs.
  4: layer-wise transfers (docs/LAYERWISE.md): a transfer named by the proxy (``splitzip_transfer``) is
     published before prefill's forward pass, its manifest posted in a mailbox whose address the handshake
     carries (``mailbox_addr``); notices name it by that id.
"""
from __future__ import annotations

from typing import Union

import msgspec

PROTOCOL_VERSION = 4
NOTIF_PREFIX = b"SZ3:"   # unchanged in protocol 4: the messages did not change


class LayerSpec(msgspec.Struct, frozen=True, array_like=True):
    """Where one layer's KV tensor lives and how it is strided (elements)."""
    base: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class Handshake(msgspec.Struct, kw_only=True):
    protocol: int
    format_versions: tuple[int, int]     # lowest and highest wire-format version this worker reads
    engine_id: str
    tp_rank: int
    tp_size: int
    model: str
    model_fingerprint: str               # hash of the architecture config (see worker.model_fingerprint)
    kv_dtype: str                        # cache dtype string ("bfloat16", "fp8_e4m3", ...)
    two_level: bool = False              # prefill: may write EXP2L payloads; decode: its codec reads them
    kv_scales: str = ""                  # FP8: how scales are kept ("" when not FP8)
    block_size: int
    total_kv_heads: int
    head_size: int
    layout: str                          # kv_layout kind
    piece_order: str
    element_size: int
    layers: list[LayerSpec]
    agent_metadata: bytes
    mem_type: str
    device_id: int
    mailbox_addr: int = 0                # prefill: layer-wise mailbox (mailbox.py); 0 on decode


class Manifest(msgspec.Struct, kw_only=True):
    """One prefill TP rank's publication of one request.

    ``splitzip``: pieces are encoded on demand into the send arena and listed in the piece index at
    ``index_addr`` (see piece_index.py); every payload carries the tag derived from ``nonce``.
    ``direct``: raw pieces are read from the prefill KV blocks, then ``ticket = (address, value)`` is read to
    prove the blocks were still this request's (binding.py).
    """
    mode: str
    rank: int
    num_blocks: int
    raw_bytes: int
    nonce: int = 0
    index_addr: int = 0
    ticket: tuple[int, int] | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        try:
            return msgspec.convert(d, Manifest, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"malformed KV manifest in kv_transfer_params: {e}") from None


class Want(msgspec.Struct, tag="want", kw_only=True):
    """Decode reader ``reader`` of ``readers`` asks for pieces: all layers, local heads [head_lo, head_hi) of
    the prefill rank, blocks [block_lo, num_blocks)."""
    request_id: str
    reader: int
    readers: int
    head_lo: int
    head_hi: int
    block_lo: int


class Consumed(msgspec.Struct, tag="consumed", kw_only=True):
    """Pieces (index numbers) that decode has copied out of the send arena: their space may be reused."""
    request_id: str
    pieces: list[int]


class Done(msgspec.Struct, tag="done", kw_only=True):
    """Reader ``reader`` of ``readers`` finished with the request (read, or gave up)."""
    request_id: str
    reader: int
    readers: int


class Heartbeat(msgspec.Struct, tag="hb", kw_only=True):
    request_ids: list[str]


class Rate(msgspec.Struct, tag="rate", kw_only=True):
    """A finished load's measurements, for the prefill's "auto" compression policy."""
    wire_bytes: int
    transfer_s: float
    raw_bytes: int
    decode_s: float


Notification = Union[Want, Consumed, Done, Heartbeat, Rate]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Notification)


def encode_notification(msg: Notification) -> bytes:
    return NOTIF_PREFIX + _encoder.encode(msg)


def decode_notification(raw: bytes) -> Notification | None:
    """The message, or None for traffic that is not ours or not understood."""
    if not raw.startswith(NOTIF_PREFIX):
        return None
    try:
        return _decoder.decode(raw[len(NOTIF_PREFIX):])
    except msgspec.DecodeError:
        return None
